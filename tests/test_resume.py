"""Training checkpoints resume exactly, and load at another parallel layout.

Exactness: a run of 6 steps that saved at step 3, and a second run resumed from that step-3 checkpoint (its own
process, the same command), produce the same losses for steps 4-6 and the same final weights (fp32). The
learning rate is large and scheduled (warmup + cosine) so a lost Adam moment, scheduler step or data position
changes step 4 by far more than the tolerance. Layout change: a TP2 x PP2 checkpoint scored with
`orpo_megatron.evaluate` at TP2 x PP2 and at TP1 x PP1 gives the same metrics, and training resumed at TP1 says at
start-up that the optimizer state is not carried over.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from orpo_megatron import checkpoint_format, checkpointing, conversion

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "examples", "data", "capybara_style.jsonl")
LOSS_TOLERANCE = 1e-6  # fp32


@pytest.fixture(scope="module")
def converted(tiny_converted) -> str:
    return tiny_converted


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("data_cache"))


def train_args(load: str, save: str, data_cache: str, *layout: str, iters: int = 6, warmup: int = 2) -> list[str]:
    return ["--load", load, "--save", save, "--data-path", DATA, "--data-cache-dir", data_cache,
            "--max-length", "64", "--max-prompt-length", "48", "--micro-batch-size", "1", "--global-batch-size", "4",
            "--train-iters", str(iters), "--save-interval", "3", "--log-interval", "1",
            "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", str(warmup), *layout]


def losses(save_dir: str) -> dict[int, float]:
    rows = [json.loads(line) for line in open(os.path.join(save_dir, "metrics.jsonl"))]
    return {row["iteration"]: row["train/loss"] for row in rows if "train/loss" in row}


def all_weights(ckpt_dir: str) -> dict[str, torch.Tensor]:
    conversion.init_single_process()  # the full-tensor readers go through dist_checkpointing
    layers = checkpoint_format.read_metadata(ckpt_dir).model_config().num_layers
    weights = {f"outer.{k}": v for k, v in checkpoint_format.read_outer(ckpt_dir).items()}
    for layer in range(layers):
        weights.update({f"layer{layer}.{k}": v for k, v in checkpoint_format.read_layer(ckpt_dir, layer).items()})
    return weights


@pytest.mark.parametrize("layout", [
    pytest.param(["--pipeline-model-parallel-size", "2"], id="pp2"),
    pytest.param(["--expert-model-parallel-size", "2"], id="ep2_dp2"),
])
def test_resumed_run_matches_straight_run_losses_and_weights(torchrun, converted, data_cache, tmp_path, layout):
    straight = str(tmp_path / "straight")
    torchrun("-m orpo_megatron.train", 2, *train_args(converted, straight, data_cache, *layout))
    assert checkpointing.latest_iteration(straight) == 6

    # The step-3 checkpoint alone, as a run stopped after step 3 leaves it; the same command resumes from it.
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(checkpointing.iteration_dir(straight, 3), checkpointing.iteration_dir(resumed, 3))
    with open(os.path.join(resumed, checkpointing.TRACKER_FILE), "w") as f:
        f.write("3")
    proc = torchrun("-m orpo_megatron.train", 2, *train_args(converted, resumed, data_cache, *layout))
    output = proc.stdout + proc.stderr
    assert "resumed from iteration 3 (12 pairs consumed)" in output, output[-3000:]
    assert "Adam moments start from zero" not in output

    expected, got = losses(straight), losses(resumed)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6] and sorted(got) == [4, 5, 6]
    assert len({round(expected[i], 4) for i in (3, 4, 5, 6)}) == 4, "losses do not move; the test would be blind"
    for step in (4, 5, 6):
        assert abs(got[step] - expected[step]) <= LOSS_TOLERANCE, (step, got[step], expected[step])

    final_straight = all_weights(checkpointing.iteration_dir(straight, 6))
    final_resumed = all_weights(checkpointing.iteration_dir(resumed, 6))
    initial = all_weights(converted)
    assert final_straight.keys() == final_resumed.keys() == initial.keys()
    for name, value in final_straight.items():
        assert torch.equal(value, final_resumed[name]) or torch.allclose(value, final_resumed[name], rtol=0,
                                                                          atol=1e-6), name
    assert any(not torch.allclose(final_straight[name], initial[name]) for name in initial), "weights never moved"


def test_tp2_pp2_checkpoint_scores_the_same_at_tp1_pp1(torchrun, converted, data_cache, tmp_path):
    save = str(tmp_path / "train")
    tp2_pp2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    torchrun("-m orpo_megatron.train", 4, *train_args(converted, save, data_cache, *tp2_pp2, iters=1, warmup=0))
    assert checkpointing.latest_iteration(save) == 1
    pairs = tmp_path / "pairs.jsonl"  # 40 pairs keep the two scoring runs short
    pairs.write_text("".join(open(DATA).readlines()[:40]))

    def score(nproc: int, output: str, *layout: str) -> dict:
        torchrun("-m orpo_megatron.evaluate", nproc, "--load", save, "--data-path", str(pairs), "--data-cache-dir",
                 data_cache, "--max-length", "64", "--max-prompt-length", "48", "--micro-batch-size", "4",
                 "--output", output, *layout)
        return json.load(open(output + ".summary.json"))

    at_tp2_pp2 = score(4, str(tmp_path / "tp2pp2.jsonl"), *tp2_pp2)
    at_tp1 = score(1, str(tmp_path / "tp1.jsonl"))
    assert at_tp2_pp2["pairs"] == at_tp1["pairs"] == 40
    metric_names = [k for k, v in at_tp1.items() if isinstance(v, float)]
    assert {"loss", "nll_loss", "rewards/accuracies", "rewards/margins", "log_odds_ratio"} <= set(metric_names)
    for name in metric_names:
        assert at_tp2_pp2[name] == pytest.approx(at_tp1[name], rel=1e-5, abs=1e-6), name
    per_pair_tp2 = [json.loads(line) for line in open(tmp_path / "tp2pp2.jsonl")]
    per_pair_tp1 = [json.loads(line) for line in open(tmp_path / "tp1.jsonl")]
    for a, b in zip(per_pair_tp2, per_pair_tp1):
        assert a["index"] == b["index"]
        assert a["chosen_logps"] == pytest.approx(b["chosen_logps"], abs=1e-5)
        assert a["rejected_logps"] == pytest.approx(b["rejected_logps"], abs=1e-5)

    # Training on at TP1 x PP1: the weights reshard, the optimizer state cannot, and start-up says so.
    proc = subprocess.run([sys.executable, "-m", "orpo_megatron.train",
                           *train_args(converted, save, data_cache, iters=2, warmup=0)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "saved at layout [world=4 TP=2 PP=2 EP=1 DP=1 SP] and is loaded at [world=1 TP=1 PP=1 EP=1 DP=1]" in output
    assert "Adam moments start from zero" in output
    assert "resumed from iteration 1" in output and checkpointing.latest_iteration(save) == 2
