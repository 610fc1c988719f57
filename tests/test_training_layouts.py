"""The ORPO training step is layout-invariant: same first-step loss and grad norm at every parallel layout, packed
or not.

The real trainer (`python -m orpo_megatron.train`) runs 5 steps of 8 pairs (micro-batches of 2) from the same
converted checkpoint and data at each layout, packing its micro-batches (the default); the per-step metrics of
`metrics.jsonl` are compared with the single-process run with `--no-packing`. The loss is normalized over the
global batch, the MoE router ignores padding and packed sequences attend only to themselves, so neither the
micro-batch split, padding, packing nor the DP split may change anything. One exception: with pipelining a step's
pairs are regrouped into fixed-length rows, and the router's load-balancing loss is a statistic of each
micro-batch's tokens, so its value (and its small share of the gradient) moves there.
"""
import json
import os

import pytest

from orpo_megatron.checkpoint import training as checkpointing
from orpo_megatron.train import parse_args as trainer_args
from orpo_megatron.data.pipeline import build_preference_data
from orpo_megatron.data.batching import batch_layout
from orpo_megatron.parallel import ParallelLayout

LAYOUTS = {  # name: (processes, flags)
    "packed": (1, []),
    "tp2_sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    # Pipelining packs a step into fixed-length rows: other micro-batches, so another load-balancing statistic;
    # compared without it (coefficient 0 on both sides).
    "pp2_4_micro_batches": (2, ["--pipeline-model-parallel-size", "2", "--moe-aux-loss-coeff", "0"]),
    # The interleaved schedule with more micro-batches than the 2 stages, so it reaches its steady state (where
    # one exchange carries an activation and a gradient to the same peer at PP=2). Packed: 8 pairs of 82-218
    # tokens in rows of 256 are 6 rows, 6 micro-batches. Padded: 4 micro-batches of 2 pairs, the same
    # micro-batches as the single-process run, so the load-balancing loss is compared too.
    "pp2_vp2_packed": (2, ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2",
                           "--packed-length", "256", "--moe-aux-loss-coeff", "0"]),
    "pp2_vp2_no_packing": (2, ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2",
                               "--no-packing"]),
    "ep2": (2, ["--expert-model-parallel-size", "2"]),
    "dp2": (2, []),
    "full_recompute": (1, ["--recompute-granularity", "full"]),
}
FIRST_STEP_TOL = 1e-5  # fp32, relative
FIVE_STEP_TOL = 1e-4  # fp32, relative


def trainer_flags(converted: str) -> list[str]:
    return ["--load", converted, "--data-path", "examples/data/capybara_style.jsonl", "--eval-fraction", "0",
            "--max-length", "256", "--max-prompt-length", "192", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", "5", "--lr", "1e-3", "--lr-warmup-iters", "0",
            "--lr-decay-style", "constant", "--log-interval", "1"]


def train(torchrun, converted, save, nproc, flags):
    torchrun("-m orpo_megatron.train", nproc, *trainer_flags(converted), "--save", save, *flags)
    rows = [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl"))]
    return [row for row in rows if "train/loss" in row]


@pytest.fixture(scope="module")
def single_process(torchrun, tiny_converted, tmp_path_factory):
    return train(torchrun, tiny_converted, str(tmp_path_factory.mktemp("tp1") / "run"), 1, ["--no-packing"])


@pytest.fixture(scope="module")
def single_process_without_load_balancing(torchrun, tiny_converted, tmp_path_factory):
    return train(torchrun, tiny_converted, str(tmp_path_factory.mktemp("tp1_no_aux") / "run"), 1,
                 ["--no-packing", "--moe-aux-loss-coeff", "0"])


def relative(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def mixed(a, b):
    """Relative for values of order 1 and above, absolute below: log-odds and margins are small differences."""
    return abs(a - b) / max(abs(b), 1.0)


def test_single_process_trains(single_process):
    assert [row["iteration"] for row in single_process] == [1, 2, 3, 4, 5]
    assert single_process[-1]["train/loss"] < single_process[0]["train/loss"]


def test_real_token_fraction_counts_the_padding_the_schedule_adds(single_process, tiny_converted):
    """With --no-packing the step's micro-batches run as one shape (`pipeline.schedule_groups`): every row is
    padded to the step's longest, more than each micro-batch's own padding."""
    args = trainer_args(trainer_flags(tiny_converted) + ["--no-packing"])
    layout = batch_layout(False, None, ParallelLayout(), False)
    pairs, _, _ = build_preference_data(args, checkpointing.resolve(tiny_converted).hf_files, 0, 1, 2, 8, layout,
                                        args.seed)
    micro_batches = next(pairs).micro_batches
    real = sum(batch.num_real_tokens for batch in micro_batches)
    rows = sum(batch.input_ids.shape[0] for batch in micro_batches)
    longest = max(batch.input_ids.shape[1] for batch in micro_batches)
    assert sum(batch.num_positions for batch in micro_batches) < rows * longest  # the micro-batches differ
    assert single_process[0]["train/real_token_fraction"] == pytest.approx(real / (rows * longest), rel=1e-9)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_first_step_and_five_steps_match_single_process(name, torchrun, tiny_converted, tmp_path, request):
    nproc, flags = LAYOUTS[name]
    without_load_balancing = "--moe-aux-loss-coeff" in flags
    single_process = request.getfixturevalue(
        "single_process_without_load_balancing" if without_load_balancing else "single_process")
    rows = train(torchrun, tiny_converted, str(tmp_path / "run"), nproc, flags)
    assert [row["iteration"] for row in rows] == [1, 2, 3, 4, 5]
    first, reference = rows[0], single_process[0]
    for key in ("train/loss", "train/grad_norm"):
        assert relative(first[key], reference[key]) <= FIRST_STEP_TOL, (key, first[key], reference[key])
    for key in ("train/nll_loss", "train/log_odds_chosen", "train/rewards/margins", "train/logps/chosen",
                "train/logps/rejected", "train/log_odds_ratio", "train/rewards/accuracies") + (
                () if without_load_balancing else ("train/moe_load_balancing_loss",)):
        assert mixed(first[key], reference[key]) <= FIRST_STEP_TOL, (key, first[key], reference[key])
    assert 0.5 < first["train/real_token_fraction"] <= 1.0
    # The first step routes the same real tokens with the same weights at every layout: the routing metrics
    # (each rank counting its own tokens, summed; the recomputed pass counted once) are the single process's.
    assert first["train/moe/expert_load"] == pytest.approx(reference["train/moe/expert_load"], rel=1e-12)
    for layer in range(4):
        for metric in ("max_load", "min_load", "dead_experts", "router_entropy"):
            key = f"train/moe/layer_{layer}/{metric}"
            assert relative(first[key], reference[key]) <= FIRST_STEP_TOL, (key, first[key], reference[key])
    for row, ref in zip(rows, single_process):
        assert relative(row["train/loss"], ref["train/loss"]) <= FIVE_STEP_TOL, (row["iteration"], row, ref)
        assert relative(row["train/grad_norm"], ref["train/grad_norm"]) <= FIVE_STEP_TOL
