"""The real trainer's offline W&B run and its TensorBoard events hold the same metrics as its metrics.jsonl, from
one rank only.

A 2-rank run (EP2 x DP2) with held-out evaluation logs to W&B in offline mode; the run is read back with
`tools/read_wandb.py`'s record reader (W&B's own transaction log, not our JSONL writer) and compared event by
event with metrics.jsonl.
"""
import glob
import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "examples", "data", "capybara_style.jsonl")
_spec = importlib.util.spec_from_file_location("read_wandb", os.path.join(REPO, "tools", "read_wandb.py"))
read_wandb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(read_wandb)

ORPO_METRICS = ["loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
                "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen",
                "logits/rejected"]
TRAIN_ONLY = ["grad_norm", "lr", "tokens_per_second", "moe_load_balancing_loss", "memory/max_rss_gb", "moe/max_load",
              "moe/layer_0/dead_experts", "moe/layer_3/router_entropy", "moe/layer_3/load_balancing_loss"]
FILE_ONLY = ["train/moe/expert_load"]  # tables: metrics.jsonl only


def test_offline_wandb_run_of_the_trainer_matches_metrics_jsonl(torchrun, tiny_converted, tmp_path):
    converted = tiny_converted
    save, wandb_dir = str(tmp_path / "run"), str(tmp_path / "wandb_save")
    torchrun("-m orpo_megatron.train", 2, "--load", converted, "--save", save, "--data-path", DATA,
             "--data-cache-dir", str(tmp_path / "data_cache"), "--eval-fraction", "0.1", "--eval-iters", "2",
             "--max-length", "64", "--max-prompt-length", "48", "--micro-batch-size", "1", "--global-batch-size", "4",
             "--expert-model-parallel-size", "2", "--train-iters", "3", "--log-interval", "1", "--eval-interval", "2",
             "--wandb-project", "orpo-ci", "--wandb-exp-name", "tiny-ep2", "--wandb-mode", "offline",
             "--wandb-save-dir", wandb_dir, "--tensorboard-dir", str(tmp_path / "tensorboard"))

    runs = glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*"))
    assert len(runs) == 1, f"expected one W&B run (one logging rank), found {runs}"
    history = read_wandb.read_history(runs[0])
    events = [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl"))]

    train = [e for e in events if "train/loss" in e]
    evals = [e for e in events if "eval/loss" in e]
    assert [e["iteration"] for e in train] == [1, 2, 3]
    assert [e["iteration"] for e in evals] == [0, 2, 3]  # before training, every 2 steps, at the end
    for name in ORPO_METRICS + TRAIN_ONLY:
        assert f"train/{name}" in train[0], name
    for name in ORPO_METRICS:
        assert f"eval/{name}" in evals[0], name
    assert any(key.startswith("data/") for key in events[0])

    assert all(len(train[0][name]) == 4 for name in FILE_ONLY)  # one list of expert loads per layer

    # Event by event: the same keys and the same values (JSON round trip of the same floats), tables aside.
    assert len(history) == len(events)
    for row, event in zip(history, events):
        logged = {k: v for k, v in row.items() if not k.startswith("_")}
        assert logged == {k: v for k, v in event.items() if k not in FILE_ONLY}

    # TensorBoard: every scalar of every event, at its iteration (float32 in the event file).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    expected = {}
    for event in events:
        for key, value in event.items():
            if key not in FILE_ONLY + ["iteration"]:
                expected.setdefault(key, []).append((event["iteration"], value))
    assert sorted(board.Tags()["scalars"]) == sorted(expected)
    for key, points in expected.items():
        logged = [(scalar.step, scalar.value) for scalar in board.Scalars(key)]
        assert [step for step, _ in logged] == [step for step, _ in points], key
        assert [value for _, value in logged] == pytest.approx([value for _, value in points], rel=1e-6), key

    config = read_wandb.read_config(runs[0])
    assert config["parallel_layout"] == "world=2 TP=1 PP=1 EP=2 DP=2"
    assert config["beta"] == 0.1 and config["train_iters"] == 3 and config["global_batch_size"] == 4
