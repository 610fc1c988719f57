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


def train(torchrun, converted, save, nproc, flags):
    args = ["--load", converted, "--data-path", "examples/data/capybara_style.jsonl", "--eval-fraction", "0",
            "--max-length", "256", "--max-prompt-length", "192", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", "5", "--lr", "1e-3", "--lr-warmup-iters", "0",
            "--lr-decay-style", "constant", "--log-interval", "1", "--save", save, *flags]
    torchrun("-m orpo_megatron.train", nproc, *args)
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
    for row, ref in zip(rows, single_process):
        assert relative(row["train/loss"], ref["train/loss"]) <= FIVE_STEP_TOL, (row["iteration"], row, ref)
        assert relative(row["train/grad_norm"], ref["train/grad_norm"]) <= FIVE_STEP_TOL
