"""The memory estimator against the real allocation of the tiny model, transformers' parameter counts, and its CLI."""
import json
import os
import re

import pytest
import torch
from megatron.core.parallel_state import RankGenerator

from orpo_megatron.planning.memory import (
    NCCL_COMMUNICATOR_BYTES,
    MemoryLayout,
    busiest_rank,
    chunk_parameters,
    communicating_groups,
    nccl_buffer_bytes,
    rank_memory,
)
from orpo_megatron.model_config import HFModelConfig
from orpo_megatron.optimizer import OptimizerMode
from orpo_megatron.planning import estimator as estimate_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The worker's layouts and optimizer modes (world 2), as the estimator describes them.
OFFLOADED = dict(precision_aware=True, offload_fraction=1.0)
HALF_OFFLOADED = dict(precision_aware=True, offload_fraction=0.5)
LAYOUTS = {
    "tp2": dict(tensor_model_parallel_size=2, data_parallel_size=1),
    "ep2": dict(expert_model_parallel_size=2, data_parallel_size=2),
    "dp2_fp32": dict(data_parallel_size=2, bf16=False),
    "pp2": dict(pipeline_model_parallel_size=2, data_parallel_size=1),
    "tp2_etp1": dict(tensor_model_parallel_size=2, data_parallel_size=1, expert_model_parallel_size=2,
                     expert_tensor_parallel_size=1),
    "ep2_offload": dict(expert_model_parallel_size=2, data_parallel_size=2, optimizer=OptimizerMode(**OFFLOADED)),
    "ep2_offload_half": dict(expert_model_parallel_size=2, data_parallel_size=2,
                             optimizer=OptimizerMode(**HALF_OFFLOADED)),
    "tp2_offload_half_bf16_grads": dict(tensor_model_parallel_size=2, data_parallel_size=1,
                                        optimizer=OptimizerMode(**HALF_OFFLOADED, main_grads_dtype="bf16")),
    "dp2_buckets": dict(data_parallel_size=2, overlap_grad_reduce=True, ddp_bucket_size=5000),
}
# Megatron offloads whole parameter shards until the fraction is reached; the estimate takes the fraction exactly.
# Per chained optimizer (dense, experts) the split can differ by up to one parameter's shard, 16 B per element.
OFFLOAD_GRANULARITY_BYTES_PER_ELEMENT = 16
# Activations are a rough formula: the bytes autograd really saved must be within this factor of it.
ACTIVATION_FACTOR = 1.5


@pytest.fixture(scope="module")
def real_allocation(tiny_mixtral, torchrun, tmp_path_factory):
    out = tmp_path_factory.mktemp("memory")
    torchrun("memory_allocation.py", 2, "--hf-dir", tiny_mixtral, "--out", str(out), "--layouts", *LAYOUTS)
    return [result for rank in range(2) for result in json.loads((out / f"rank{rank}.json").read_text())]


def estimator_layout(name: str, micro_batch: dict) -> MemoryLayout:
    options = dict(overlap_grad_reduce=False) | LAYOUTS[name]  # the worker's DDP reduces without buckets
    return MemoryLayout.planned(**options, micro_batch_size=micro_batch["pairs"], seq_length=micro_batch["seq_length"],
                        flash_attention=False)  # the CPU local spec materializes S x S scores


def test_params_grads_and_optimizer_state_equal_the_real_allocation(tiny_mixtral, real_allocation):
    hf = HFModelConfig.from_file(tiny_mixtral)
    assert {r["layout"] for r in real_allocation} == set(LAYOUTS) and len(real_allocation) == 2 * len(LAYOUTS)
    for real in real_allocation:
        where = f"{real['layout']} rank {real['rank']}"
        layout = estimator_layout(real["layout"], real["micro_batch"])
        assert (layout.dp, layout.expert_data_parallel_size) == (real["dp_size"], real["expert_dp_size"]), where
        params = chunk_parameters(hf, layout, real["pp_rank"])
        assert [(p.name, p.numel, p.expert) for p in params] == [
            (p["name"], p["numel"], p["expert"]) for p in real["params"]], where
        estimate = rank_memory(hf, layout, real["pp_rank"], real["dp_rank"], real["expert_dp_rank"])
        assert estimate.param_bytes == sum(real["param_buffer_bytes"].values()), where
        assert estimate.grad_bytes == sum(real["grad_buffer_bytes"].values()), where
        fraction = layout.optimizer.offload_fraction
        # Whole parameter shards move: at fraction 0 or 1 the split is exact, in between within one shard per
        # chained optimizer (the largest parameter bounds a shard).
        slack = 0 if fraction in (0.0, 1.0) else 2 * OFFLOAD_GRANULARITY_BYTES_PER_ELEMENT * max(
            p["numel"] for p in real["params"])
        for field in ("main_param_bytes", "optimizer_state_bytes", "host_bytes"):
            assert abs(getattr(estimate, field) - real[field]) <= slack, (where, field, getattr(estimate, field),
                                                                          real[field])
    # The DP ranks' shards really differ (padding), and the estimate follows each one.
    ep2 = {r["rank"]: r["optimizer_state_bytes"] for r in real_allocation if r["layout"] == "ep2"}
    assert ep2[0] != ep2[1]
    # Small buckets really split the buffers (and pad each bucket), and the estimate follows.
    buckets = {r["layout"]: r["buckets"] for r in real_allocation if r["rank"] == 0}
    assert buckets["ep2"] == 2 and buckets["dp2_buckets"] > 5
    # Offloading really moves state to the host: all of it at fraction 1, part of it at 0.5.
    by_layout = {(r["layout"], r["rank"]): r for r in real_allocation}
    for rank in (0, 1):
        full, half = by_layout["ep2_offload", rank], by_layout["ep2_offload_half", rank]
        assert full["main_param_bytes"] == full["optimizer_state_bytes"] == 0 and full["host_bytes"] > 0
        assert 0 < half["host_bytes"] < full["host_bytes"] and half["optimizer_state_bytes"] > 0


def test_activations_are_within_the_stated_factor_of_the_saved_tensors(tiny_mixtral, real_allocation):
    hf = HFModelConfig.from_file(tiny_mixtral)
    measured = [r for r in real_allocation if r["activation_bytes"] is not None]
    assert len(measured) == 8
    for real in measured:
        layout = estimator_layout(real["layout"], real["micro_batch"])
        ratio = real["activation_bytes"] / rank_memory(hf, layout, real["pp_rank"]).activation_bytes
        assert 1 / ACTIVATION_FACTOR <= ratio <= ACTIVATION_FACTOR, (real["layout"], real["rank"], ratio)


@pytest.mark.parametrize("config", ["tiny", "tiny_qwen3_moe", "tiny_qwen2_moe", "mixtral-8x22b.json",
                                    "mixtral-8x7b.json"])
def test_parameter_count_equals_transformers_model(config, request):
    """Mixtral; Qwen3-MoE (experts' own FFN size, per-head q/k norms) and Qwen2-MoE (shared expert and its gate,
    QKV bias)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fixture = {"tiny": "tiny_mixtral"}.get(config, config)
    path = request.getfixturevalue(fixture) if config.startswith("tiny") else os.path.join(REPO, "tools", "configs",
                                                                                             config)
    hf = HFModelConfig.from_file(path)
    with torch.device("meta"):  # shapes only: 8x22B has 141B parameters
        reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    # No vocabulary padding, one rank: the estimator's parameters are the HF model's.
    layout = MemoryLayout.planned(make_vocab_size_divisible_by=1)
    assert sum(p.numel for p in chunk_parameters(hf, layout, 0)) == sum(p.numel() for p in reference.parameters())


def test_pipeline_split_puts_embedding_first_and_output_last_and_sums_to_the_model():
    hf = HFModelConfig.from_file(os.path.join(REPO, "tools", "configs", "mixtral-8x22b.json"))
    whole = sum(p.numel for p in chunk_parameters(hf, MemoryLayout.planned(), 0))
    layout = MemoryLayout.planned(pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=2)
    stages = [[p for vp in range(2) for p in chunk_parameters(hf, layout, pp, vp)] for pp in range(4)]
    assert sum(p.numel for stage in stages for p in stage) == whole
    assert [any(p.name.startswith("embedding.") for p in s) for s in stages] == [True, False, False, False]
    assert [any(p.name == "output_layer.weight" for p in s) for s in stages] == [False, False, False, True]


def test_offload_without_the_precision_aware_optimizer_is_refused_naming_the_flags(tiny_mixtral, capsys):
    # Megatron-Core would keep every fp32 main param on the GPU in that mode; neither tool offers it.
    with pytest.raises(SystemExit) as exit_info:
        estimate_memory.main(["--hf-config", tiny_mixtral, "--optimizer-cpu-offload"])
    assert exit_info.value.code == 2
    assert "--optimizer-cpu-offload needs --use-precision-aware-optimizer" in capsys.readouterr().err


def test_full_recompute_keeps_far_fewer_activations():
    hf = HFModelConfig.from_file(os.path.join(REPO, "tools", "configs", "mixtral-8x22b.json"))
    base = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=4, expert_model_parallel_size=4,
                data_parallel_size=4)
    stored = busiest_rank(hf, MemoryLayout.planned(**base)).activation_bytes
    recomputed = busiest_rank(hf, MemoryLayout.planned(**base, recompute_full=True)).activation_bytes
    assert recomputed < stored / 5


def test_cli_reports_breakdown_and_fit_verdict_leaving_min_free(tiny_mixtral, capsys):
    args = ["--hf-config", os.path.join(tiny_mixtral, "config.json"), "--tp", "2", "--dp", "2",
            "--micro-batch-size", "1", "--max-length", "64", "--reserve-gb", "0"]
    assert estimate_memory.main(args + ["--gpu-memory-gb", "100"]) == 0
    out = capsys.readouterr().out
    for part in ("weights", "gradients", "main params", "optim. state", "activations", "NCCL", "of 100 GiB",
                 "(at least 4 needed): fits"):
        assert part in out, part
    budgeted = float(re.search(r"budgeted +([\d.]+) GiB", out).group(1))
    # Fits only when the budget leaves --min-free-gb free: 0.3 GiB over the budget is too little for 0.5 free.
    for capacity, min_free, verdict in ((budgeted + 0.3, 0.5, "does NOT fit"), (budgeted + 0.7, 0.5, "fits"),
                                        (budgeted + 3, None, "does NOT fit")):
        extra = ["--gpu-memory-gb", f"{capacity:.2f}"] + (["--min-free-gb", str(min_free)] if min_free else [])
        assert estimate_memory.main(args + extra) == 0
        assert re.search(rf"needed\): {verdict}$", capsys.readouterr().out, re.M), (capacity, min_free, verdict)


@pytest.mark.parametrize("tp, pp, ep, dp", [(2, 2, 2, 2), (8, 4, 1, 1), (4, 1, 8, 16), (1, 1, 1, 1)])
def test_nccl_groups_have_megatron_cores_sizes(tp, pp, ep, dp):
    """The process groups the estimate counts NCCL buffers for, sized as Megatron-Core's rank generators make
    them (megatron/core/parallel_state.py, order tp-cp-ep-dp-pp)."""
    layout = MemoryLayout.planned(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                          expert_model_parallel_size=ep, data_parallel_size=dp)
    dense = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    experts = RankGenerator(tp=tp, ep=ep, dp=tp * dp // (tp * ep), pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    size = lambda generator, group: len(generator.get_ranks(group)[0])  # noqa: E731
    expected = {"world": tp * pp * dp, "tensor": size(dense, "tp"), "pipeline": size(dense, "pp"),
                "data": size(dense, "dp"), "model": size(dense, "tp-pp"), "expert": size(experts, "ep"),
                "expert-data": size(experts, "dp"), "expert-model": size(experts, "tp-ep-pp")}
    assert communicating_groups(layout, moe=True) == expected
    assert nccl_buffer_bytes(layout, moe=True) == NCCL_COMMUNICATOR_BYTES * sum(v > 1 for v in expected.values())
    assert set(communicating_groups(layout, moe=False)) == {"world", "tensor", "pipeline", "data", "model"}


@pytest.mark.parametrize("extra, message", [
    (["--ep", "3"], "4 experts are not divisible by EP=3"),
    (["--tp", "3"], "8 heads / 2 KV groups are not divisible by TP=3"),
])
def test_cli_rejects_impossible_layouts_naming_the_numbers(tiny_mixtral, capsys, extra, message):
    assert estimate_memory.main(["--hf-config", tiny_mixtral] + extra) == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_an_offload_fraction_outside_0_1(tiny_mixtral, capsys):
    with pytest.raises(SystemExit) as exit_info:
        estimate_memory.main(["--hf-config", tiny_mixtral, "--use-precision-aware-optimizer", "--optimizer-cpu-offload",
                              "--optimizer-offload-fraction", "1.5"])
    assert exit_info.value.code == 2
    assert "--optimizer-offload-fraction must be in [0, 1], got 1.5" in capsys.readouterr().err


def test_cli_names_a_missing_config(tmp_path, capsys):
    assert estimate_memory.main(["--hf-config", str(tmp_path / "nope.json")]) == 2
    assert "nope.json: no such file" in capsys.readouterr().err


def test_checkpoint_cost_counts_each_save_in_place_and_only_the_unhidden_part_in_the_background(tiny_mixtral,
                                                                                                   capsys):
    """10 steps of 2 s saving every 3 (at 3, 6, 9 and the end): in place each save stops the GPUs for its whole
    write; with --async-save only the copy to host, what of a write outlasts the 6 s until the next save, and the
    last write the run's end waits for. The stored size is checked against a real save in test_checkpoint_format."""
    from orpo_megatron.planning import capacity

    def stall(*flags: str):
        args = estimate_memory.parse_args(["--hf-config", tiny_mixtral, "--save-interval", "3", *flags])
        layout = estimate_memory.make_layout(args, 1, 1, 2, 2, False, OptimizerMode())
        return capacity.checkpoint_stall(HFModelConfig.from_file(tiny_mixtral), layout, args,
                                         capacity.hardware(HFModelConfig.from_file(tiny_mixtral), args), 2.0, 10)

    in_place = stall("--checkpoint-write-gbps", "0.0005")
    write = in_place.stored_bytes / 0.5e6
    assert in_place.saves == 4 and in_place.write_seconds == pytest.approx(write)
    assert in_place.seconds == pytest.approx(4 * write)
    background = stall("--checkpoint-write-gbps", "0.0005", "--async-save", "--pcie-gbps", "0.001")
    copy = in_place.stored_bytes / 2 / 1e6  # each of the 2 GPUs (EP2 x DP2) copies its half to host
    assert write > 6.0  # so each write outlasts the interval by write - 6 s
    assert background.seconds == pytest.approx(4 * copy + 3 * (write - 6.0) + write)
    hidden = stall("--checkpoint-write-gbps", "0.01", "--async-save", "--pcie-gbps", "0.001")
    assert hidden.seconds == pytest.approx(4 * copy + hidden.write_seconds)  # each write fits its interval
    assert estimate_memory.main(["--hf-config", tiny_mixtral, "--ep", "2", "--dp", "2", "--global-batch-size", "4",
                                 "--train-pairs", "40", "--epochs", "1", "--save-interval", "3",
                                 "--checkpoint-write-gbps", "0.0005"]) in (0, 1)
    assert re.search(r"checkpoints +[\d.]+ min waiting for 4 save\(s\)", capsys.readouterr().out)


def test_routed_expert_activations_follow_expert_tp_below_tp(tiny_mixtral, real_allocation):
    """TP2 with experts at ETP1 (EP2): each rank's experts compute the top-k copies of its own N/TP tokens at full
    FFN width instead of all-gathering its TP peer's rows at half width, so autograd saves fewer bytes than at TP2
    (ETP2); the estimate moves by what the saved tensors really moved, within the activation factor."""
    hf = HFModelConfig.from_file(tiny_mixtral)
    measured = {(r["layout"], r["rank"]): r["activation_bytes"] for r in real_allocation
                if r["layout"] in ("tp2", "tp2_etp1")}
    estimated = {name: rank_memory(hf, estimator_layout(name, real_allocation[0]["micro_batch"]), 0).activation_bytes
                 for name in ("tp2", "tp2_etp1")}
    for rank in (0, 1):
        real_change = measured["tp2", rank] - measured["tp2_etp1", rank]
        estimated_change = estimated["tp2"] - estimated["tp2_etp1"]
        assert real_change > 0, (rank, measured)
        assert 1 / ACTIVATION_FACTOR <= estimated_change / real_change <= ACTIVATION_FACTOR, (
            rank, estimated_change, real_change)
