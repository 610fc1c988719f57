"""What one optimizer step makes each GPU do: matmul FLOPs, bytes per collective, optimizer-state traffic.

Owns the exact accounting behind the step-time model (`step_time.py`), as functions of the parallel layout
(`memory.MemoryLayout`) and of the shapes the model is called with, whatever the batching (rows padded
to one length, or packed rows holding several sequences). It assumes no hardware and times nothing. The
quantities may be numbers or numpy arrays (the step-time model evaluates many micro-batches at once).

Groups are Megatron-Core's: its `RankGenerator` with the default order "tp-cp-ep-dp-pp" places the ranks, dense
groups from (TP, DP, PP), expert groups from (expert TP, EP, expert DP, PP); expert TP is TP unless set apart.
Sequence parallelism is on whenever TP > 1 (forced for MoE; what one runs with TP > 1 anyway).

Bytes of a collective on one rank, by kind:
  all-gather      received: the gathered output minus this rank's own input
  reduce-scatter  sent: the input minus this rank's own output
  all-to-all send / all-to-all recv   rows to / from the other ranks of the group
  send / recv     pipeline point-to-point
All-reduces are not counted: within a step they reduce per-token scalars of the loss, metric sums, the gradients
of norm and router weights and the grad norm, a small share of the bytes (checked by the test against real runs).

Per micro-batch of N positions (n = N/TP per rank under SP), hidden h, activation bytes b:
  TP   embedding: reduce-scatter forward, all-gather backward (first stage); each attention: 3 all-gathers and
       2 reduce-scatters of n*h*b-sized shards (QKV gathers its input forward and again for the weight gradient,
       the projection reduce-scatters its output); output layer: 2 all-gathers, 1 reduce-scatter (last stage)
  MoE  with TP > 1 the routed rows of the expert-TP ranks are all-gathered (tokens in b, router probs in fp32)
       and the experts' output reduce-scattered in fp32; backward mirrors it. An all-gather of the int64
       tokens-per-expert counts over the expert TP x EP group precedes each dispatch.
  EP   all-to-all of the routed token copies (dispatch, combine; both again in backward) and of their fp32 probs
       (dispatch and its backward)
  PP   one activation forward and one gradient backward per micro-batch and model-chunk boundary
  DP   per DDP bucket (dense over DP, experts over expert DP): reduce-scatter of the gradients (in the layout's
       gradient dtype), all-gather of the parameters after the step. Without overlapped parameter gathering
       each optimizer of Megatron's chain (dense, experts) gathers every buffer of the model, so with EP > 1
       parameters are gathered twice.
Full recomputation repeats the transformer layers' forward work and collectives in backward.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np
from megatron.core.parallel_state import RankGenerator

from orpo_megatron.planning.memory import MemoryLayout, owned_elements, stage_buffers
from orpo_megatron.model_config import HFModelConfig, padded_vocab_size
from orpo_megatron.optimizer import DTYPES, OptimizerMode
from orpo_megatron.throughput import token_flops

MEGATRON_RANK_ORDER = "tp-cp-ep-dp-pp"
FP32, INT64 = 4, 8
KINDS = ("all-gather", "reduce-scatter", "all-to-all send", "all-to-all recv", "send", "recv")


@dataclasses.dataclass(frozen=True)
class MicroBatchShape:
    """A micro-batch as the model computes it: `rows` x `length` positions, and each row's real sequences (one
    per row when padded, several in a packed row)."""

    length: int
    sequences: tuple[tuple[int, ...], ...]

    @property
    def rows(self) -> int:
        return len(self.sequences)

    @property
    def positions(self) -> int:
        return self.rows * self.length

    @property
    def real_tokens(self) -> int:
        return sum(sum(row) for row in self.sequences)

    def attention_positions(self, per_sequence: bool) -> int:
        """Query x key positions the attention products span: whole rows (padded rows; a packed row on the local
        spec, which masks but computes), or each sequence alone (packed rows on Transformer Engine's THD)."""
        if per_sequence:
            return sum(s * s for row in self.sequences for s in row)
        return self.rows * self.length**2


class RankGrid:
    """Megatron-Core's process groups of a layout: which ranks each collective spans."""

    DENSE = ("tp", "dp", "pp")
    EXPERT = {"etp": "tp", "ep": "ep", "edp": "dp", "tp-ep": "tp-ep"}

    def __init__(self, layout: MemoryLayout):
        self.layout = layout
        self.dense = RankGenerator(tp=layout.tp, ep=1, dp=layout.dp, pp=layout.pp, cp=1, order=MEGATRON_RANK_ORDER)
        self.expert = RankGenerator(tp=layout.etp, ep=layout.ep, dp=layout.expert_data_parallel_size, pp=layout.pp,
                                    cp=1, order=MEGATRON_RANK_ORDER)

    @functools.cache
    def groups(self, kind: str) -> tuple[tuple[int, ...], ...]:
        if kind in self.DENSE:
            return tuple(tuple(g) for g in self.dense.get_ranks(kind))
        return tuple(tuple(g) for g in self.expert.get_ranks(self.EXPERT[kind]))

    @functools.cache
    def _membership(self, kind: str) -> dict[int, tuple[int, ...]]:
        return {rank: group for group in self.groups(kind) for rank in group}

    def group(self, kind: str, rank: int) -> tuple[int, ...]:
        return self._membership(kind)[rank]

    def index(self, kind: str, rank: int) -> int:
        """This rank's position in its group of `kind` (its TP rank, DP rank, pipeline stage, ...)."""
        return self.group(kind, rank).index(rank)

    @functools.cache
    def _ranks(self) -> dict[tuple[int, int, int], int]:
        return {(self.index("tp", r), self.index("dp", r), self.index("pp", r)): r
                for r in range(self.layout.world_size)}

    def rank(self, tp: int = 0, dp: int = 0, pp: int = 0) -> int:
        """The global rank at these dense coordinates."""
        return self._ranks()[tp, dp, pp]

    def data_parallel_share(self, kind: str) -> np.ndarray:
        """[DP, DP]: row d, the fraction of the `kind` group of DP rank d (its TP rank 0, first stage) on each DP
        rank. With expert-TP apart from TP an expert group may hold TP ranks of one DP rank, or span DP ranks
        that are not consecutive: `share @ values` is each DP rank's group mean of per-DP-rank values."""
        share = np.zeros((self.layout.dp, self.layout.dp))
        for d in range(self.layout.dp):
            group = self.group(kind, self.rank(dp=d))
            for member in group:
                share[d, self.index("dp", member)] += 1 / len(group)
        return share

    def synchronized_data_parallel_ranks(self) -> tuple[tuple[int, ...], ...]:
        """The DP ranks whose micro-batches wait for each other: linked by the expert TP x EP groups (each MoE
        layer's dispatch exchanges within one), transitively, over the ranks of a pipeline stage."""
        component = list(range(self.layout.dp))

        def root(d: int) -> int:
            while component[d] != d:
                d = component[d]
            return d

        for group in self.groups("tp-ep"):
            indices = [self.index("dp", member) for member in group if self.index("pp", member) == 0]
            for d in indices[1:]:
                component[root(d)] = root(indices[0])
        members: dict[int, list[int]] = {}
        for d in range(self.layout.dp):
            members.setdefault(root(d), []).append(d)
        return tuple(tuple(m) for m in members.values())

    def local_experts(self, hf: HFModelConfig, rank: int) -> range:
        per_rank = hf.num_experts // self.layout.ep
        return range(self.index("ep", rank) * per_rank, (self.index("ep", rank) + 1) * per_rank)


@dataclasses.dataclass(frozen=True)
class ExpertRows:
    """One MoE layer's routed token copies on one rank for one micro-batch (rows of the hidden size)."""

    sent: float  # dispatched to the other EP ranks
    received: float  # dispatched to this rank by the other EP ranks
    gathered: float  # received by the other expert-TP ranks of this rank's experts (all-gathered here)
    computed: float  # rows this rank's experts compute: its own received plus its own kept plus `gathered`


def balanced_expert_rows(hf: HFModelConfig, layout: MemoryLayout, local_tokens, ep_local_tokens=None,
                         expert_group_local_tokens=None) -> ExpertRows:
    """Routing spread evenly over the experts: every rank's `top_k` copies of its `local_tokens` (N/TP) go to
    each EP rank in equal shares. `ep_local_tokens`: the mean over this rank's EP group; `expert_group_local_tokens`:
    over its expert TP x EP group, whose EP groups send to this rank's expert-TP peers (defaults: the same)."""
    k, ep, etp = hf.num_experts_per_tok, layout.ep, layout.etp
    peer = local_tokens if ep_local_tokens is None else ep_local_tokens
    group = peer if expert_group_local_tokens is None else expert_group_local_tokens
    arriving = k * peer  # rows this rank's experts get from its EP group (its own share included)
    computed = etp * k * group  # and its expert-TP peers' arrivals, all-gathered here
    return ExpertRows(sent=k * local_tokens * (ep - 1) / ep, received=k * peer * (ep - 1) / ep,
                      gathered=computed - arriving, computed=computed)


def routed_expert_rows(hf: HFModelConfig, grid: RankGrid, rank: int, copies: dict[int, Sequence[float]]) -> ExpertRows:
    """The rows of `rank` for one MoE layer and micro-batch from each rank's per-expert token copies (the
    router's choices: `copies[r][e]` copies of rank r's local tokens routed to expert e)."""
    def arriving(at: int) -> float:
        experts = grid.local_experts(hf, at)
        return sum(copies[peer][e] for peer in grid.group("ep", at) for e in experts)

    mine = grid.local_experts(hf, rank)
    own = copies[rank]
    sent = sum(own) - sum(own[e] for e in mine)
    received = arriving(rank) - sum(own[e] for e in mine)
    gathered = sum(arriving(peer) for peer in grid.group("etp", rank) if peer != rank)
    return ExpertRows(sent=sent, received=received, gathered=gathered, computed=arriving(rank) + gathered)


@dataclasses.dataclass
class MicroBatchWork:
    """Forward matmul FLOPs of one rank's pipeline stage for one micro-batch (training does 3x, plus a repeated
    forward of the layers under full recompute), and the bytes of every collective of forward + backward."""

    layer_flops: object  # transformer layers, experts included
    expert_flops: object  # the experts' part of `layer_flops`
    output_flops: object  # output layer (last stage)
    traffic: dict  # (kind, group ranks) -> bytes

    def training_flops(self, recompute: bool):
        return 3 * (self.layer_flops + self.output_flops) + (self.layer_flops if recompute else 0)


def _add(traffic: dict, kind: str, group: tuple[int, ...], value) -> None:
    if len(group) > 1:
        traffic[kind, group] = traffic.get((kind, group), 0) + value


def stage_layers(hf: HFModelConfig, layout: MemoryLayout) -> int:
    """Transformer layers on each pipeline rank (all its model chunks)."""
    return hf.num_layers // layout.pp


def micro_batch_work(hf: HFModelConfig, layout: MemoryLayout, grid: RankGrid, rank: int, positions,
                     attention_positions, experts: Sequence[ExpertRows] | ExpertRows | None = None,
                     recompute: bool = False) -> MicroBatchWork:
    """`rank`'s work on one micro-batch of `positions` tokens (rows x length) whose attention products span
    `attention_positions` (`MicroBatchShape.attention_positions`). `experts`: the routed rows per MoE layer of
    this stage (or one for all layers); default: balanced routing of this micro-batch alone."""
    tp, h, b = layout.tp, hf.hidden_size, layout.param_size  # activations in the params' dtype
    layers = stage_layers(hf, layout)
    stage = grid.index("pp", rank)
    first, last = stage == 0, stage == layout.pp - 1
    local = positions / tp  # SP: each TP rank holds 1/TP of the sequence between the matmuls
    shard = (tp - 1) * local * h * b  # one SP all-gather (received) or reduce-scatter (sent)
    flops = token_flops(hf, padded_vocab_size(hf.vocab_size, layout.make_vocab_size_divisible_by, tp))
    traffic: dict = {}
    tp_group = grid.group("tp", rank)
    forward_passes = 2 if recompute else 1  # the layers' forward collectives happen again in backward

    attention_flops = (flops.attention_projections * positions
                       + flops.attention_per_position * attention_positions) / tp
    _add(traffic, "all-gather", tp_group, layers * (3 + forward_passes - 1) * shard)
    _add(traffic, "reduce-scatter", tp_group, layers * (2 + forward_passes - 1) * shard)
    if first:  # the vocabulary-parallel embedding reduce-scatters its output
        _add(traffic, "reduce-scatter", tp_group, shard)
        _add(traffic, "all-gather", tp_group, shard)
    output_flops = 0
    if last:
        output_flops = flops.output_layer * positions / tp
        _add(traffic, "all-gather", tp_group, 2 * shard)
        _add(traffic, "reduce-scatter", tp_group, shard)

    if hf.is_moe:
        # (rows, number of layers with them): one entry for all layers unless given per layer
        per_layer = [(rows, 1) for rows in experts] if isinstance(experts, Sequence) else [(experts, layers)]
        per_layer = [(rows or balanced_expert_rows(hf, layout, local), count) for rows, count in per_layer]
        router_flops = flops.router * local * layers
        expert_flops = (sum(rows.computed * count for rows, count in per_layer)
                        * flops.feed_forward / hf.num_experts_per_tok / layout.etp)
        for rows, count in per_layer:
            _moe_traffic(hf, layout, grid, rank, rows, count, forward_passes, traffic)
    else:
        router_flops = 0
        expert_flops = flops.feed_forward * positions / tp * layers
    layer_flops = attention_flops * layers + router_flops + expert_flops

    chunk_act = local * h * b  # the pipeline sends [length/TP, rows, hidden] in the params' dtype
    chunks = layout.vp
    for chunk in range(chunks):
        index = chunk * layout.pp + stage
        pp_group = grid.group("pp", rank)
        if index < chunks * layout.pp - 1:
            _add(traffic, "send", pp_group, chunk_act)  # activation forward
            _add(traffic, "recv", pp_group, chunk_act)  # its gradient
        if index > 0:
            _add(traffic, "recv", pp_group, chunk_act)
            _add(traffic, "send", pp_group, chunk_act)
    return MicroBatchWork(layer_flops, expert_flops, output_flops, traffic)


def _moe_traffic(hf, layout, grid, rank, rows: ExpertRows, layers: int, forward_passes: int, traffic: dict) -> None:
    """The MoE collectives of `layers` layers routing `rows` each."""
    h, b = hf.hidden_size, layout.param_size
    etp_group, ep_group = grid.group("etp", rank), grid.group("ep", rank)
    counts = (len(grid.group("tp-ep", rank)) - 1) * hf.num_experts * INT64
    # forward (again when recomputed): dispatch sends tokens + probs out, combine brings the tokens back
    forward = layers * forward_passes
    _add(traffic, "all-gather", grid.group("tp-ep", rank), forward * counts)
    _add(traffic, "all-to-all send", ep_group, forward * (rows.sent * (h * b + FP32) + rows.received * h * b))
    _add(traffic, "all-to-all recv", ep_group, forward * (rows.received * (h * b + FP32) + rows.sent * h * b))
    _add(traffic, "all-gather", etp_group, forward * rows.gathered * (h * b + FP32))
    _add(traffic, "reduce-scatter", etp_group, forward * rows.gathered * h * FP32)
    # backward: the gradients retrace both exchanges (token gradients in b, combine gradient in fp32)
    _add(traffic, "all-to-all send", ep_group, layers * (rows.received * (h * b + FP32) + rows.sent * h * b))
    _add(traffic, "all-to-all recv", ep_group, layers * (rows.sent * (h * b + FP32) + rows.received * h * b))
    _add(traffic, "reduce-scatter", etp_group, layers * rows.gathered * (h * b + FP32))
    _add(traffic, "all-gather", etp_group, layers * rows.gathered * h * FP32)


def chained_optimizers(layout: MemoryLayout) -> int:
    """Megatron-Core builds one distributed optimizer per parameter kind: dense, and experts when EP > 1."""
    return 2 if layout.ep > 1 else 1


def step_end_traffic(hf: HFModelConfig, layout: MemoryLayout, grid: RankGrid, rank: int,
                     overlap_param_gather: bool = False, last_buckets: bool = False) -> dict:
    """The data-parallel collectives of a step on `rank`: per DDP bucket (`memory.BufferLayout`: one
    per buffer, or Megatron's buckets with `layout.overlap_grad_reduce`), a reduce-scatter of its gradients and an
    all-gather of its parameters, each over the whole bucket with its padding. `last_buckets`: only each buffer's
    last bucket (the first parameters: gradients ready last in backward, parameters needed first in forward)."""
    gathers = 1 if overlap_param_gather else chained_optimizers(layout)
    traffic: dict = {}
    for buffer, is_expert in stage_buffers(hf, layout, grid.index("pp", rank))[1]:
        group = grid.group("edp" if is_expert else "dp", rank)
        buckets = buffer.buckets[-1:] if last_buckets else buffer.buckets
        # Each bucket is padded to a multiple of the group size; a rank keeps 1/size of it.
        elsewhere = sum((end - start) // len(group) * (len(group) - 1) for start, end, _ in buckets)
        _add(traffic, "reduce-scatter", group, elsewhere * layout.grad_size)
        _add(traffic, "all-gather", group, gathers * elsewhere * layout.param_size)
    return traffic


def optimizer_shard_elements(hf: HFModelConfig, layout: MemoryLayout, grid: RankGrid, rank: int) -> int:
    """Parameter elements in `rank`'s distributed-optimizer shards (dense over DP, experts over expert DP)."""
    dense, expert = owned_elements(hf, layout, grid.index("pp", rank))
    return dense[grid.index("dp", rank)] + expert[grid.index("edp", rank)]


@dataclasses.dataclass(frozen=True)
class OptimizerTraffic:
    """Bytes per element of an optimizer shard moved in one step, by where they move (what stays where is
    `memory.optimizer_bytes_per_element`'s).

    gpu            HBM read + written by the GPU part of the step (Adam, main-param and gradient copies)
    host_adam      host memory read + written by the host AdamW kernel
    host_copies    host memory read + written by the transfers (DMA into pinned buffers, pageable staging)
    pcie_to_host / pcie_to_device   bytes crossing PCIe per offloaded element
    Host and PCIe figures are per element of the offloaded part, `gpu` per element of the rest.
    """

    gpu: float
    host_adam: float = 0.0
    host_copies: float = 0.0
    pcie_to_host: float = 0.0
    pcie_to_device: float = 0.0


# torch's fused CPU AdamW reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg, exp_avg_sq (fp32).
HOST_ADAM_BYTES = 7 * FP32


def optimizer_traffic(mode: OptimizerMode, bf16: bool = True) -> OptimizerTraffic:
    """Per-element traffic of Megatron-Core 0.16.1's optimizer in `mode` (one of `OptimizerMode.problems`'s
    allowed modes).

    - Plain (distributed optimizer): fp32 main params, grads and moments, read and written (28 B), then in bf16
      the main params copied to the bf16 model params (4 + 2).
    - Precision-aware without offload (TE FusedAdam with master weights, no param remainders): the master param
      read and written in its dtype (fp32: 4 + 4) and the bf16 param written (2), the grad read, both moments
      read and written in their dtypes.
    - Offload (precision-aware, bf16; HybridDeviceOptimizer, torch's fused AdamW on the host, no D2H/H2D overlap
      as configured): per host element, the fp32 gradient is copied into a pinned host buffer (4 B over PCIe and
      into host memory), AdamW runs on fp32 host copies (28 B), and the fp32 host param goes back to the GPU (4 B
      over PCIe, converted to bf16 on the GPU). Megatron-Core makes those host params pageable (`.float()` copies
      of pinned clones), so the driver stages them through a pinned buffer (4 B read + 4 B written more); the
      trainer pins them (`optimizer.pin_host_copies`), which these 8 B still count, an upper bound. The GPU part
      steps fp32 copies of the bf16 shard (bf16 main grads converted to an fp32 copy first) and copies the
      result to the bf16 model param.
    """
    size = {name: dtype.itemsize for name, dtype in DTYPES.items()}
    main_to_model = 4 + 2 if bf16 else 0
    if mode.offload:
        grad_copy = size[mode.main_grads_dtype] + FP32 if mode.main_grads_dtype != "fp32" else 0
        return OptimizerTraffic(gpu=grad_copy + HOST_ADAM_BYTES + main_to_model, host_adam=HOST_ADAM_BYTES,
                                host_copies=4 + 4 + 8, pcie_to_host=4, pcie_to_device=4)
    if mode.precision_aware:
        return OptimizerTraffic(gpu=2 * size[mode.main_params_dtype] + 2 + size[mode.main_grads_dtype]
                                + 2 * (size[mode.exp_avg_dtype] + size[mode.exp_avg_sq_dtype]))
    return OptimizerTraffic(gpu=HOST_ADAM_BYTES + main_to_model)
