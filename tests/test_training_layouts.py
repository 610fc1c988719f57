"""The ORPO training step is layout-invariant: same first-step loss and grad norm at every parallel layout.

The real trainer (`python -m orpo_megatron.train`) runs 5 steps of 8 pairs (micro-batches of 2) from the same
converted checkpoint and data at each layout; the per-step metrics of `metrics.jsonl` are compared with the
single-process run. The loss is normalized over the global batch and the MoE router ignores padding, so the
micro-batch split, padding for sequence parallelism and the DP split must not change anything.
"""
import json
import os

import pytest

LAYOUTS = {  # name: (processes, flags)
    "tp2_sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2_4_micro_batches": (2, ["--pipeline-model-parallel-size", "2"]),
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
    return train(torchrun, tiny_converted, str(tmp_path_factory.mktemp("tp1") / "run"), 1, [])


def relative(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def mixed(a, b):
    """Relative for values of order 1 and above, absolute below: log-odds and margins are small differences."""
    return abs(a - b) / max(abs(b), 1.0)


def test_single_process_trains(single_process):
    assert [row["iteration"] for row in single_process] == [1, 2, 3, 4, 5]
    assert single_process[-1]["train/loss"] < single_process[0]["train/loss"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_first_step_and_five_steps_match_single_process(name, torchrun, tiny_converted, tmp_path, single_process):
    nproc, flags = LAYOUTS[name]
    rows = train(torchrun, tiny_converted, str(tmp_path / "run"), nproc, flags)
    assert [row["iteration"] for row in rows] == [1, 2, 3, 4, 5]
    first, reference = rows[0], single_process[0]
    for key in ("train/loss", "train/grad_norm"):
        assert relative(first[key], reference[key]) <= FIRST_STEP_TOL, (key, first[key], reference[key])
    for key in ("train/nll_loss", "train/log_odds_chosen", "train/rewards/margins", "train/moe_load_balancing_loss"):
        assert mixed(first[key], reference[key]) <= FIRST_STEP_TOL, (key, first[key], reference[key])
    for row, ref in zip(rows, single_process):
        assert relative(row["train/loss"], ref["train/loss"]) <= FIVE_STEP_TOL, (row["iteration"], row, ref)
        assert relative(row["train/grad_norm"], ref["train/grad_norm"]) <= FIVE_STEP_TOL
