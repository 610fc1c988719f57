"""Predicted time of an ORPO training step per layout, from the step's exact work at assumed hardware rates.

Owns the timing assumptions and the schedule arithmetic behind `tools/estimate_memory.py`'s time columns; the
FLOPs and bytes are `step_work.py`'s, the micro-batch shapes `workload.py`'s. Per micro-batch on a pipeline stage:
  compute   training matmul FLOPs (+ the recomputed forward) / (matmul efficiency x peak); with flash attention the
            causal half of the attention products (`throughput.CAUSAL_ATTENTION_FRACTION`)
  TP / EP / PP   bytes of each collective / the bandwidth of the link its group uses: NVLink when every rank of
            the group is on one node (Megatron's rank order, `step_work.RankGrid`), else the network (per GPU);
            an all-to-all splits its bytes between both by where its peers are. Not overlapped with compute
            (no TP-communication or all-to-all overlap is configured).
DP ranks linked by Megatron's expert TP x EP groups (`RankGrid.synchronized_data_parallel_ranks`) wait for each
other at every dispatch, so a micro-batch takes the longest of them; the experts' rows are the groups' means
(balanced routing). 1F1B adds (PP - 1) / VP mean
micro-batch times of bubble. After the pipeline: the DP gradient reduce-scatter and parameter all-gather of
every DDP bucket, as far as they do not hide behind the pipeline flush or, with overlap (the trainer's GPU
default), the last backward / the next first forward (`_data_parallel_seconds`), the
GPU part of the optimizer at HBM bandwidth, and the offloaded part: host AdamW and transfers at the node's host
memory bandwidth shared by its GPUs, plus the PCIe transfers of each GPU (no D2H/H2D overlap, as configured).

Defaults are data-sheet peaks of a DGX H100 (NVIDIA DGX BasePOD reference architecture: 8 H100 SXM, NVLink 4
900 GB/s per GPU = 450 GB/s each way, 8 ConnectX-7 400 Gb/s = 50 GB/s per GPU, 2 Xeon Platinum 8480C with 8
channels of DDR5-4800 each = 614 GB/s, PCIe 5.0 x16 = 64 GB/s each way, HBM3 3.35 TB/s, 989 dense bf16 TFLOP/s).
Real links reach less than their peaks, so communication and host times are lower bounds. The matmul efficiency
is the fraction of the peak the matmuls alone reach; communication, bubble and optimizer are added on top, so it
is not a published end-to-end MFU (those already contain them). Default 0.53, fitted to the two published
Mixtral-8x7B points on 64 H100 (Megatron-LM's MoE README: TP1 PP4 VP8 EP8, sequences of 4096, 256 per step; 438
and 468 TFLOP/s with MCore v0.8 / v0.9 in its full S x S count, 5282 / 5643 tokens/s/GPU): to two digits, the
efficiency whose prediction of that layout is their geometric mean, 5460 (`benchmarks/planner_vs_published.py`). One efficiency
for every GEMM: grouped expert GEMMs with few rows per expert run below it. Replace it with a measurement
(`matmul_efficiency_from_layer_throughput`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from orpo_megatron.errors import ConfigError
from orpo_megatron.planning import step_work
from orpo_megatron.planning.memory import MemoryLayout
from orpo_megatron.model_config import HFModelConfig
from orpo_megatron.planning.step_work import RankGrid, balanced_expert_rows, micro_batch_work, optimizer_traffic
from orpo_megatron.throughput import CAUSAL_ATTENTION_FRACTION, causal_attention_positions, token_flops
from orpo_megatron.planning.workload import HANDBOOK_GPUS, HANDBOOK_SECONDS, StepShapes

GBPS = 1e9


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Rates the prediction assumes (see the module docstring for the sources). Bandwidths in GB/s."""

    gpus_per_node: int = 8
    peak_tflops: float = 989.0
    matmul_efficiency: float = 0.53
    nvlink_gbps: float = 450.0  # per GPU, each direction
    network_gbps: float = 50.0  # per GPU, each direction
    pcie_gbps: float = 64.0  # per GPU, each direction
    host_memory_gbps: float = 614.0  # per node, shared by its GPUs
    hbm_gbps: float = 3350.0


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What the trainer runs with besides the layout (whose `optimizer` and `overlap_grad_reduce` the prediction
    reads): DDP's overlapped parameter gathering (Megatron-LM's flag, on by default on a GPU like
    `overlap_grad_reduce`, which it needs) and the attention of packed rows."""

    overlap_param_gather: bool = True
    packed_attention: bool = True  # packed rows: attention per sequence (THD); padded rows: whole rows


@dataclasses.dataclass
class StepTime:
    """Mean seconds per step, by part (the critical DP rank's micro-batches)."""

    compute: float
    tp: float
    ep: float
    pp: float
    ep_wait: float  # waiting for the slowest DP rank linked by the expert groups
    bubble: float
    dp: float
    optimizer_gpu: float
    host_adam: float
    pcie: float

    @property
    def total(self) -> float:
        return sum(dataclasses.astuple(self))


def link_gbps(group: tuple[int, ...], hardware: Hardware) -> float:
    nodes = {rank // hardware.gpus_per_node for rank in group}
    return hardware.nvlink_gbps if len(nodes) == 1 else hardware.network_gbps


def all_to_all_seconds(group: tuple[int, ...], rank: int, nbytes, hardware: Hardware):
    """Bytes to the other ranks in equal shares: the shares to other nodes go over the network, the rest NVLink."""
    peers = [r for r in group if r != rank]
    remote = sum(r // hardware.gpus_per_node != rank // hardware.gpus_per_node for r in peers) / len(peers)
    return np.maximum(nbytes * (1 - remote) / (hardware.nvlink_gbps * GBPS),
                      nbytes * remote / (hardware.network_gbps * GBPS))


def traffic_seconds(traffic: dict, rank: int, hardware: Hardware) -> dict[str, object]:
    """Seconds per part ("tp", "ep", "pp") of a micro-batch's collectives; sends and receives run concurrently."""
    seconds = {"tp": 0, "ep": 0, "pp": 0}
    directional: dict = {}
    for (kind, group), nbytes in traffic.items():
        if kind.startswith("all-to-all"):
            directional.setdefault(("ep", group), []).append(all_to_all_seconds(group, rank, nbytes, hardware))
        elif kind in ("send", "recv"):
            directional.setdefault(("pp", group), []).append(nbytes / (link_gbps(group, hardware) * GBPS))
        else:
            seconds["tp"] = seconds["tp"] + nbytes / (link_gbps(group, hardware) * GBPS)
    for (part, _), both in directional.items():
        seconds[part] = seconds[part] + (np.maximum(*both) if len(both) == 2 else both[0])
    return seconds


def _data_parallel_mean(values: np.ndarray, share: np.ndarray) -> np.ndarray:
    """Per DP rank (axis 1), the mean of `values` over its group (`RankGrid.data_parallel_share`)."""
    return np.einsum("ij,sjm->sim", share, values)


def _synchronized_max(values: np.ndarray, synchronized: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """Per DP rank (axis 1), the largest of `values` over the DP ranks it waits for."""
    out = np.empty_like(values)
    for ranks in synchronized:
        out[:, ranks] = values[:, ranks].max(axis=1, keepdims=True)
    return out


def predict_step_time(hf: HFModelConfig, layout: MemoryLayout, shapes: StepShapes, hardware: Hardware,
                      settings: RunSettings = RunSettings()) -> StepTime:
    """Mean step time of `layout` over the steps of `shapes` (arrays over [steps, DP ranks, micro-batches])."""
    layout.validate(hf)
    if settings.overlap_param_gather and not layout.overlap_grad_reduce:
        raise ConfigError("overlapped parameter gathering needs overlapped gradient reduction (--overlap-param-gather "
                         "needs --overlap-grad-reduce)")
    if shapes.positions.shape[1] != layout.dp:
        raise ValueError(f"shapes are for DP={shapes.positions.shape[1]}, the layout has DP={layout.dp}")
    grid = RankGrid(layout)
    flop_seconds = 1.0 / (hardware.matmul_efficiency * hardware.peak_tflops * 1e12)
    attention = shapes.attention_sequences if settings.packed_attention else shapes.attention_rows
    if layout.flash_attention:  # causal kernels skip the masked half (the local spec computes all of it)
        attention = attention * CAUSAL_ATTENTION_FRACTION
    local = shapes.positions / layout.tp
    experts = balanced_expert_rows(hf, layout, local, _data_parallel_mean(local, grid.data_parallel_share("ep")),
                                   _data_parallel_mean(local, grid.data_parallel_share("tp-ep")))
    synchronized = grid.synchronized_data_parallel_ranks() if hf.is_moe else tuple((d,) for d in range(layout.dp))
    stages = sorted({0, min(1, layout.pp - 1), layout.pp - 1})  # first, a middle one, last
    per_stage = []
    for stage in stages:
        rank = grid.rank(pp=stage)
        work = micro_batch_work(hf, layout, grid, rank, shapes.positions, attention, experts, layout.recompute_full)
        parts = {"compute": work.training_flops(layout.recompute_full) * flop_seconds,
                 **traffic_seconds(work.traffic, rank, hardware)}
        parts = {name: np.where(shapes.valid, np.broadcast_to(value, shapes.positions.shape), 0.0)
                 for name, value in parts.items()}
        per_stage.append(parts)
    # The slowest stage paces the pipeline.
    totals = [sum(parts.values()) for parts in per_stage]
    slowest = per_stage[int(np.argmax([t.sum() for t in totals]))]
    micro_batch = sum(slowest.values())
    waiting = _synchronized_max(micro_batch, synchronized)
    pipeline = waiting.sum(axis=2)  # [steps, DP]
    counts = np.maximum(shapes.valid.sum(axis=2), 1)
    bubble = (layout.pp - 1) / layout.vp * pipeline / counts
    critical = np.argmax(pipeline + bubble, axis=1)  # the DP rank (and those it waits for) that ends last
    steps = np.arange(len(critical))

    def on_critical(values: np.ndarray) -> float:
        return float(values.sum(axis=2)[steps, critical].mean())

    # What DP collectives can hide behind: a micro-batch's backward (with its recomputed forward), the next step's
    # first forward.
    mean_micro_batch = float(micro_batch[shapes.valid].mean())
    last_backward = mean_micro_batch * (3 / 4 if layout.recompute_full else 2 / 3)
    first_forward = mean_micro_batch - last_backward
    dp_seconds = _data_parallel_seconds(hf, layout, grid, hardware, settings, last_backward, first_forward)
    optimizer = _optimizer_seconds(hf, layout, grid, hardware)
    return StepTime(
        compute=on_critical(slowest["compute"]), tp=on_critical(slowest["tp"]), ep=on_critical(slowest["ep"]),
        pp=on_critical(slowest["pp"]), ep_wait=on_critical(waiting - micro_batch),
        bubble=float(bubble[steps, critical].mean()), dp=dp_seconds, **optimizer)


def _data_parallel_seconds(hf, layout, grid, hardware, settings, last_backward, first_forward) -> float:
    """The longest exposed gradient reduce-scatter + parameter all-gather of any pipeline stage.

    Stage s ends its last backward s model-chunk backwards before the first stage does, so its reduction hides
    behind the rest of the pipeline flush (why Megatron-Core buckets only the first stage). Overlapped reduction
    (first stage) also hides behind the last backward, except the last bucket of each buffer (its gradients are
    ready last). Overlapped gathering hides behind the first forward, except that same bucket (its parameters,
    the first layers', are needed first; later stages have one bucket, all of it exposed)."""
    def seconds(traffic: dict, kind: str) -> float:
        return sum(v / (link_gbps(g, hardware) * GBPS) for (k, g), v in traffic.items() if k == kind)

    worst = 0.0
    for stage in range(layout.pp):
        rank = grid.rank(pp=stage)
        traffic = step_work.step_end_traffic(hf, layout, grid, rank, settings.overlap_param_gather)
        last = step_work.step_end_traffic(hf, layout, grid, rank, settings.overlap_param_gather, last_buckets=True)
        reduce, gather = seconds(traffic, "reduce-scatter"), seconds(traffic, "all-gather")
        if layout.overlap_grad_reduce:
            reduce = max(seconds(last, "reduce-scatter"), reduce - last_backward)
        reduce = max(0.0, reduce - stage * last_backward / layout.vp)  # a model chunk's backward per flush step
        if settings.overlap_param_gather:
            gather = max(seconds(last, "all-gather"), gather - first_forward)
        worst = max(worst, reduce + gather)
    return worst


def _optimizer_seconds(hf, layout, grid, hardware) -> dict[str, float]:
    """GPU Adam at HBM bandwidth; the offloaded part's host memory traffic (all GPUs of a node at once) and PCIe."""
    traffic = optimizer_traffic(layout.optimizer, layout.bf16)
    offload = layout.optimizer.offload_fraction
    elements = max(step_work.optimizer_shard_elements(hf, layout, grid, grid.rank(pp=stage))
                   for stage in range(layout.pp))
    node_gpus = min(hardware.gpus_per_node, layout.world_size)
    return {
        "optimizer_gpu": (1 - offload) * elements * traffic.gpu / (hardware.hbm_gbps * GBPS),
        "host_adam": offload * elements * (traffic.host_adam + traffic.host_copies) * node_gpus
        / (hardware.host_memory_gbps * GBPS),
        "pcie": offload * elements * (traffic.pcie_to_host + traffic.pcie_to_device) / (hardware.pcie_gbps * GBPS),
    }


@dataclasses.dataclass(frozen=True)
class RecipeTime:
    """A whole run of `steps` steps of `pairs_per_step` pairs on `gpus` GPUs, next to the alignment-handbook's."""

    step: StepTime
    steps: int
    pairs_per_step: int
    gpus: int
    checkpoint_seconds: float = 0.0  # the GPUs' wait for checkpoint saves over the whole run

    @property
    def seconds(self) -> float:
        return self.step.total * self.steps + self.checkpoint_seconds

    @property
    def hours(self) -> float:
        return self.seconds / 3600

    @property
    def gpu_hours(self) -> float:
        return self.hours * self.gpus

    @property
    def pairs_per_second_per_gpu(self) -> float:
        return self.steps * self.pairs_per_step / self.seconds / self.gpus

    @staticmethod
    def handbook_pairs_per_second_per_gpu(pairs: int, epochs: int) -> float:
        return pairs * epochs / HANDBOOK_SECONDS / HANDBOOK_GPUS


def matmul_efficiency_from_layer_throughput(hf: HFModelConfig, tokens_per_second: float, seq_length: int,
                                            num_layers: int, peak_tflops: float, gpus: int = 1) -> float:
    """The matmul efficiency a measured forward + backward throughput of `num_layers` transformer layers shaped
    like `hf`'s (sequences of `seq_length` tokens, no embedding or output layer, no communication) on `gpus` GPUs
    reached."""
    flops = token_flops(hf)
    attended = causal_attention_positions(seq_length) / seq_length  # per token
    per_token = 3 * num_layers * (flops.attention_projections + flops.attention_per_position * attended
                                  + flops.router + flops.feed_forward)
    return tokens_per_second * per_token / (gpus * peak_tflops * 1e12)
