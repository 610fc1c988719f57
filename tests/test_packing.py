"""Packed micro-batches train exactly like padded ones at every parallel layout, and no position attends across a
sequence boundary.

Each layout runs in `workers/packed_vs_padded.py` (those of one world size in one launch): one global batch of 8
bundled pairs built by the data layer both ways, one training pass each on the tiny Mixtral loaded from its HF
checkpoint. Compared in fp32:
- every gradient shard and every TRL metric but `logits/*` (TRL averages those over padding positions, which a
  packed row does not have; test_orpo_vs_transformers checks both definitions against transformers), in fp32
  and, at one process, in bf16;
- the query and key each core attention receives after RoPE, sequence by sequence: positions restart at 0 in
  a packed row (RoPE being relative, attention alone could not show it);
- perturbation: a new chosen completion for the first segment of a packed row changes that sequence's log-prob
  and nothing else's.
With pipelining a step's pairs are regrouped into fixed-length rows, so the router's load-balancing loss (a
statistic of each micro-batch's tokens, averaged over micro-batches) changes; those layouts compare gradients with
the coefficient at 0, and the world-1 run shows the change (`fixed_rows`).
"""
import glob
import json
import math
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

LAYOUTS = {  # name: (processes, flags)
    "tp1": (1, ["--fixed-rows-length", "1024"]),  # 8 pairs in one row; padded, 4 micro-batches of 2 pairs
    "tp2_sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2", "--moe-aux-loss-coeff", "0"]),
    # More micro-batches than stages (6-8 rows; padded, 4 micro-batches of 2), so the interleaved schedule reaches
    # its steady state.
    "pp2_vp2": (2, ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2",
                    "--moe-aux-loss-coeff", "0"]),
    # DP2 too: each rank packs its half of the batch. The model has a dead expert (`dead_expert_model`).
    "ep2_dp2": (2, ["--expert-model-parallel-size", "2", "--hf-dir", "<dead expert model>"]),
    "tp1_bf16": (1, ["--bf16"]),
}
METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"]
TOL = 1e-5  # fp32: relative for gradients and metrics of order 1, absolute below
# bf16 (8-bit mantissa): the two layouts multiply in different shapes, so gradients differ by a few bf16 ulps
# (2.6e-3 seen); the metrics are fp32 reductions of bf16 logits.
BF16_GRAD_TOL, BF16_METRIC_TOL = 1e-2, 1e-4


def run(torchrun, hf_dir, out_dir, nproc, layouts: dict) -> dict[str, list[dict]]:
    """Every layout of `layouts` (name: flags) in one launch of `nproc` processes; each layout's per-rank reports."""
    torchrun("packed_vs_padded.py", nproc, "--hf-dir", hf_dir, "--out", out_dir, "--data-path",
             "examples/data/capybara_style.jsonl", "--max-length", "256", "--max-prompt-length", "192",
             "--data-cache-dir", os.path.join(out_dir, "cache"), "--layouts", json.dumps(layouts))
    reports = {}
    for name in layouts:
        reports[name] = [json.load(open(path)) for path in sorted(glob.glob(os.path.join(out_dir, name, "rank*.json")))]
        assert len(reports[name]) == nproc
    return reports


def assert_rope_restarts(layers: list[dict], bf16: bool) -> None:
    """The first layer sees the same embeddings both ways, so its RoPE'd query and key must be equal: positions
    that did not restart at each sequence would rotate them by other angles, an O(|value|) difference. Deeper
    layers inherit the rounding of matmuls of other shapes, which in bf16 is a few ulps of |value| (2**-8 relative
    each; up to 3 ulps seen), far below that."""
    first, *deeper = layers
    assert first["difference"] <= 1e-5, layers
    for layer in deeper:
        assert layer["difference"] <= (2 ** -6 * layer["scale"] if bf16 else 1e-5), layers


def assert_metrics_equal(ours: dict, reference: dict, tol: float = TOL) -> None:
    for name in METRICS:
        assert abs(ours[name] - reference[name]) <= tol * max(abs(reference[name]), 1.0), (name, ours, reference)


DEAD_EXPERT = 3  # of layer 0


@pytest.fixture(scope="module")
def dead_expert_model(tiny_mixtral, tmp_path_factory) -> str:
    """The tiny Mixtral with expert 3 of layer 0 never routed to: hidden dimension 0 of layer 0's MoE input is
    positive for every token (positive embeddings there, and attention writes nothing to it), and that expert's
    router row weighs it by -1000."""
    out = tmp_path_factory.mktemp("dead_expert")
    for name in os.listdir(tiny_mixtral):
        shutil.copy(os.path.join(tiny_mixtral, name), out / name)
    tensors = load_file(out / "model.safetensors")
    tensors["model.embed_tokens.weight"][:, 0] = tensors["model.embed_tokens.weight"][:, 0].abs() + 1.0
    tensors["model.layers.0.self_attn.o_proj.weight"][0] = 0.0
    tensors["model.layers.0.post_attention_layernorm.weight"][0] = 1.0
    tensors["model.layers.0.block_sparse_moe.gate.weight"][DEAD_EXPERT, 0] = -1000.0
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return str(out)


@pytest.fixture(scope="module")
def reports_of(torchrun, tiny_mixtral, dead_expert_model, tmp_path_factory):
    """The worker's reports per layout; the layouts of one world size run in one launch (a launch costs seconds
    of imports per process), on first use."""
    runs = {}

    def get(name):
        nproc = LAYOUTS[name][0]
        if nproc not in runs:
            same_world = {n: [dead_expert_model if flag == "<dead expert model>" else flag for flag in flags]
                          for n, (world, flags) in LAYOUTS.items() if world == nproc}
            runs[nproc] = run(torchrun, tiny_mixtral, str(tmp_path_factory.mktemp(f"world{nproc}")), nproc, same_world)
        return runs[nproc][name]

    return get


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_packed_step_equals_padded_step(name, reports_of):
    flags = LAYOUTS[name][1]
    reports = reports_of(name)
    pipelined = "--pipeline-model-parallel-size" in flags
    grad_tol, metric_tol = (BF16_GRAD_TOL, BF16_METRIC_TOL) if "--bf16" in flags else (TOL, TOL)
    for report in reports:
        assert report["grads"] <= grad_tol, report
        if pipelined:  # fixed-length rows, as many on every DP rank, more than the 2 stages (steady state)
            assert len({tuple(shape) for shape in report["rows"]}) == 1
            assert len(report["rows"]) > 2, report["rows"]
        else:
            assert_rope_restarts(report["rope"], bf16="--bf16" in flags)
        perturbation = report["perturbation"]
        assert perturbation["others_change"] <= 1e-6, report
    last_stage = [r for r in reports if r["metrics"]["packed"] is not None]
    assert last_stage
    for report in last_stage:
        assert_metrics_equal(report["metrics"]["packed"], report["metrics"]["padded"], metric_tol)
        if not pipelined:
            balancing = report["load_balancing"]
            assert abs(balancing["packed"] - balancing["padded"]) <= metric_tol * balancing["padded"], balancing
    # The perturbed pair lives on DP rank 0's last stage: its log-prob really moved.
    assert max(r["perturbation"]["perturbed_change"] for r in last_stage) > 1e-2


def test_fixed_rows_change_only_the_load_balancing_statistic(reports_of):
    """Fixed-length rows regroup the pairs into other micro-batches: the ORPO metrics stay those of the global
    batch, while the router's load-balancing loss, computed per micro-batch over its tokens, moves."""
    (report,) = reports_of("tp1")
    fixed = report["fixed_rows"]
    assert fixed["rows"] < 4  # 8 pairs regrouped into fewer, longer micro-batches than the 4 padded ones
    assert_metrics_equal(fixed["metrics"], report["metrics"]["padded"])
    assert abs(fixed["load_balancing"] - fixed["padded_load_balancing"]) > 1e-4 * fixed["padded_load_balancing"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_routing_metrics_count_the_real_tokens_each_expert_gets(name, reports_of):
    """The routing metrics of both training passes (packed, padded) against transformers' router on the same
    sequences, one at a time (no padding to leave out): each layer's expert loads (token counts over their mean),
    the busiest and idlest expert, dead experts and the router's mean softmax entropy. Counts are exact in fp32;
    in bf16 our hidden states round differently, so a few near-tied tokens may pick another expert."""
    reports = reports_of(name)
    by_dp_rank = {report["data_parallel_rank"]: report["reference_routing"] for report in reports}
    reference = [[sum(table[layer][column] for table in by_dp_rank.values()) for column in range(6)]
                 for layer in range(4)]
    bf16 = "--bf16" in LAYOUTS[name][1]
    for report in reports:
        for kind in ("packed", "padded"):
            ours = report["routing"][kind]
            for layer, row in enumerate(reference):
                counts, entropy, tokens = row[:4], row[4], row[5]
                mean = sum(counts) / len(counts)
                expected_loads = [count / mean for count in counts]
                loads = ours["moe/expert_load"][str(layer)]
                prefix = f"moe/layer_{layer}"
                if bf16:
                    assert max(abs(a - b) for a, b in zip(loads, expected_loads)) <= 0.05, (layer, loads, counts)
                    assert ours[f"{prefix}/router_entropy"] == pytest.approx(entropy / tokens, rel=1e-2)
                    continue
                assert loads == pytest.approx(expected_loads, rel=1e-12), (kind, layer, loads, counts)
                assert ours[f"{prefix}/max_load"] == pytest.approx(max(expected_loads), rel=1e-12)
                assert ours[f"{prefix}/min_load"] == pytest.approx(min(expected_loads), rel=1e-12)
                assert ours[f"{prefix}/dead_experts"] == sum(count == 0 for count in counts)
                assert ours[f"{prefix}/router_entropy"] == pytest.approx(entropy / tokens, rel=1e-5)
            layers = range(len(reference))
            assert ours["moe/max_load"] == max(ours[f"moe/layer_{layer}/max_load"] for layer in layers)
            assert ours["moe/dead_experts"] == sum(ours[f"moe/layer_{layer}/dead_experts"] for layer in layers)
            if "moe_load_balancing_loss" in ours:
                assert ours["moe_load_balancing_loss"] == pytest.approx(
                    math.fsum(ours[f"moe/layer_{layer}/load_balancing_loss"] for layer in layers), rel=1e-9)
    if name == "ep2_dp2":  # the forced-dead expert shows, and is the only one
        assert reference[0][DEAD_EXPERT] == 0 and min(reference[0][:DEAD_EXPERT]) > 0
        assert reports[0]["routing"]["packed"]["moe/layer_0/dead_experts"] == 1
