"""The step-work model against real CPU training steps: bytes per collective, matmul FLOPs, host optimizer bytes.

The worker (`tests/workers/step_traffic.py`) runs one trainer step per layout at world 2 (TP2+SP, EP2xDP2 with the
alltoall dispatcher, PP2, DP2 in fp32, TP2+SP and EP2 with full recomputation, all without DDP overlap as the
trainer runs on a CPU; EP2xDP2 with the GPU default, overlapped reduction and gathering, in small buckets) and
records what torch.distributed was asked to move, the FLOPs torch dispatched, the shapes the model was called
with and the router's choices. The model gets those shapes (and, for the all-to-all, the recorded routing) and
must predict every byte and FLOP exactly.
"""
import json

import pytest

from orpo_megatron.planning.memory import MemoryLayout, optimizer_bytes_per_element, stage_buffers
from orpo_megatron.model_config import HFModelConfig, padded_vocab_size
from orpo_megatron.optimizer import OptimizerMode
from orpo_megatron.planning.step_work import (
    HOST_ADAM_BYTES, KINDS, MicroBatchShape, RankGrid, micro_batch_work, optimizer_traffic, routed_expert_rows,
    stage_layers, step_end_traffic,
)
from orpo_megatron.throughput import training_flops

TRAFFIC_LAYOUTS = ["tp2", "ep2", "pp2", "dp2", "tp2_recompute", "ep2_recompute", "ep2_overlap"]
LAYOUTS = TRAFFIC_LAYOUTS + ["offload"]
# All-reduces (loss and metric reductions, norm/router weight gradients, grad norm) are left out of the model.
ALL_REDUCE_SHARE = 0.05


@pytest.fixture(scope="module")
def real_steps(tiny_mixtral, torchrun, tmp_path_factory):
    out = tmp_path_factory.mktemp("step_traffic")
    torchrun("step_traffic.py", 2, "--hf-dir", tiny_mixtral, "--out", str(out), "--layouts", *LAYOUTS)
    results = [r for rank in range(2) for r in json.loads((out / f"rank{rank}.json").read_text())]
    return {name: [r for r in results if r["layout"] == name] for name in LAYOUTS}


def model_layout(record: dict) -> MemoryLayout:
    """The layout the worker ran, with the DDP settings its trainer flags resolved to."""
    parallel = record["parallel"]
    tp = parallel.get("tensor_model_parallel_size", 1)
    pp = parallel.get("pipeline_model_parallel_size", 1)
    return MemoryLayout.planned(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                        expert_model_parallel_size=parallel.get("expert_model_parallel_size", 1),
                        data_parallel_size=record["world_size"] // (tp * pp), bf16=record["bf16"],
                        recompute_full=record["recompute"], overlap_grad_reduce=record["ddp"]["overlap_grad_reduce"],
                        ddp_bucket_size=record["ddp"]["bucket_size"])


def predicted_step(hf: HFModelConfig, records: list[dict], rank: int) -> tuple[dict, float]:
    """The model's bytes per (kind, group) and training FLOPs of `rank`'s step, from the shapes each rank's model
    was called with and the token copies each rank's router sent to each expert."""
    layout = model_layout(records[0])
    grid = RankGrid(layout)
    mine = next(r for r in records if r["rank"] == rank)
    copies = {(r["rank"], route["micro_batch"], route["layer"]): route["copies"]
              for r in records for route in r["routing"]}
    first_layer = grid.index("pp", rank) * stage_layers(hf, layout) + 1
    traffic, flops = {}, 0.0
    for micro_batch, (rows, length) in enumerate(mine["calls"]):
        experts = [routed_expert_rows(hf, grid, rank, {r: copies[r, micro_batch, layer]
                                                       for r in range(layout.world_size)
                                                       if (r, micro_batch, layer) in copies})
                   for layer in range(first_layer, first_layer + stage_layers(hf, layout))]
        work = micro_batch_work(hf, layout, grid, rank, rows * length, rows * length**2, experts,
                                layout.recompute_full)
        flops += work.training_flops(layout.recompute_full)
        for key, value in work.traffic.items():
            traffic[key] = traffic.get(key, 0) + value
    for key, value in step_end_traffic(hf, layout, grid, rank, records[0]["ddp"]["overlap_param_gather"]).items():
        traffic[key] = traffic.get(key, 0) + value
    return {key: value for key, value in traffic.items() if value}, flops


@pytest.mark.parametrize("layout", TRAFFIC_LAYOUTS)
def test_collective_bytes_and_flops_of_a_step_equal_the_real_run(tiny_mixtral, real_steps, layout):
    hf = HFModelConfig.from_file(tiny_mixtral)
    records = real_steps[layout]
    for real in records:
        predicted, flops = predicted_step(hf, records, real["rank"])
        measured = {(kind, tuple(group)): value for kind, group, value in real["traffic"]}
        assert predicted.keys() == measured.keys(), (layout, real["rank"], sorted(predicted), sorted(measured))
        for key, value in measured.items():
            assert predicted[key] == value, (layout, real["rank"], key, predicted[key], value)
        assert flops == real["flops"], (layout, real["rank"])
        assert real["all_reduce_bytes"] < ALL_REDUCE_SHARE * sum(measured.values()), (layout, real["all_reduce_bytes"])


def test_layouts_exercise_every_collective_kind_and_uneven_routing(tiny_mixtral, real_steps):
    kinds = {kind for name in TRAFFIC_LAYOUTS for r in real_steps[name] for kind, _, _ in r["traffic"]}
    assert kinds == set(KINDS)
    # The router's choices are uneven: balanced routing would predict other all-to-all volumes, so the exact
    # check above really follows the routing.
    hf = HFModelConfig.from_file(tiny_mixtral)
    real = real_steps["ep2"][0]
    layout = model_layout(real)
    grid = RankGrid(layout)
    balanced = sum(micro_batch_work(hf, layout, grid, real["rank"], rows * length, rows * length**2)
                   .traffic["all-to-all send", (0, 1)] for rows, length in real["calls"])
    measured = {(kind, tuple(group)): value for kind, group, value in real["traffic"]}["all-to-all send", (0, 1)]
    assert measured != balanced


def test_flops_equal_the_sum_over_real_sequences_packed_and_unpacked(tiny_mixtral, real_steps):
    """Each real sequence alone through the model: its FLOPs are what the step-work model computes for that
    length, and the model FLOPs of that length once the masked half of its attention products (which the local
    spec computes, Megatron-LM does not count) is taken off; a packed row computes whole-row attention on the
    local spec and per-sequence attention (THD) sums to the sequences'."""
    hf = HFModelConfig.from_file(tiny_mixtral)
    for real in real_steps["dp2"]:
        layout = model_layout(real)
        grid = RankGrid(layout)
        lengths = [n for row in real["lengths"] for n in row]
        assert len(real["single_sequence_flops"]) == len(lengths) > 1 and len(set(lengths)) > 1
        vocab = padded_vocab_size(hf.vocab_size, 128, 1)
        for n, measured, attention in zip(lengths, real["single_sequence_flops"],
                                          real["single_sequence_attention_flops"]):
            alone = MicroBatchShape(length=n, sequences=((n,),))
            work = micro_batch_work(hf, layout, grid, real["rank"], alone.positions, alone.attention_positions(False))
            assert work.training_flops(recompute=False) == measured
            assert 0 < attention < measured and training_flops(hf, 1, n, vocab) == measured - attention / 2
        packed = MicroBatchShape(length=sum(lengths), sequences=(tuple(lengths),))
        row = micro_batch_work(hf, layout, grid, real["rank"], packed.positions, packed.attention_positions(False))
        assert row.training_flops(recompute=False) == real["packed_row_flops"]
        per_sequence = micro_batch_work(hf, layout, grid, real["rank"], packed.positions,
                                        packed.attention_positions(per_sequence=True))
        assert per_sequence.training_flops(recompute=False) == sum(real["single_sequence_flops"])
        # The padded step computed more than its real tokens.
        assert real["flops"] > sum(real["single_sequence_flops"])


def test_cpu_runs_overlap_nothing_and_the_gpu_default_buckets_and_gathers_once(tiny_mixtral, real_steps):
    """The trainer's flags resolve to no DDP overlap on a CPU. With the GPU default (overlap) the small buckets
    really split the buffers into as many buckets as the model's, and the parameters are gathered once instead of
    once per optimizer of the chain: the exact check above, which the overlap run passes, would fail for a model
    that gathered twice."""
    assert not any(r["ddp"]["overlap_grad_reduce"] or r["ddp"]["overlap_param_gather"]
                   for name in LAYOUTS if name != "ep2_overlap" for r in real_steps[name])
    hf = HFModelConfig.from_file(tiny_mixtral)
    for real in real_steps["ep2_overlap"]:
        assert real["ddp"]["overlap_grad_reduce"] and real["ddp"]["overlap_param_gather"]
        layout = model_layout(real)
        grid, rank = RankGrid(layout), real["rank"]
        assert real["buckets"] == sum(len(buffer.buckets) for buffer, _ in stage_buffers(hf, layout, 0)[1]) > 2
        group = grid.group("dp", rank)
        gathered_once = step_end_traffic(hf, layout, grid, rank, overlap_param_gather=True)
        gathered_twice = step_end_traffic(hf, layout, grid, rank, overlap_param_gather=False)
        assert gathered_twice["all-gather", group] == 2 * gathered_once["all-gather", group] > 0


def test_host_optimizer_bytes_per_element_equal_what_the_offloading_optimizer_keeps_and_moves(real_steps):
    """Offload with the precision-aware optimizer (the mode the trainer runs): per element of the host part, what
    is kept (the memory estimate's host bytes), what the AdamW kernel reads and writes, and the host side of the
    device<->host copies."""
    mode = OptimizerMode(precision_aware=True, offload_fraction=1.0)
    traffic = optimizer_traffic(mode, bf16=True)
    kept = optimizer_bytes_per_element(mode, bf16=True).host
    for real in real_steps["offload"]:
        host = real["host_optimizer"]
        elements = host["elements"]
        assert elements > 0
        assert host["kept_bytes"] == kept * elements
        assert host["adam_bytes"] == traffic.host_adam * elements == HOST_ADAM_BYTES * elements
        assert host["to_host_bytes"] == traffic.pcie_to_host * elements
        assert host["to_device_bytes"] == traffic.pcie_to_device * elements
