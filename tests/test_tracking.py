"""Metrics tracking: metrics.jsonl, run_config.json, the offline W&B run (read back independently), ranks."""
import argparse
import collections
import importlib.util
import json
import os
import subprocess

import pytest

from orpo_megatron.tracking import MetricsTracker, TrackingConfig, add_logging_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("read_wandb", os.path.join(REPO, "tools", "read_wandb.py"))
read_wandb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(read_wandb)

ORPO_METRICS = ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
                "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm", "lr")
DATA_STATS = {"data/train_rows": 120, "data/train_bad_rows/empty_completion": 3, "data/eval_rows": 20}


def fake_metrics(step: int) -> dict[str, float]:
    # Values with long binary expansions, so any rounding on the way into W&B shows up.
    return {name: (index + 1) / 7 + step / 3 for index, name in enumerate(ORPO_METRICS)} | {
        "tokens_per_second": 1234.5 + step, "tflops_per_gpu": 0.1 / 3, "mfu": 1 / 30}


def run_fake_training(run_dir, steps: int = 4, **config_kwargs) -> None:
    tracker = MetricsTracker(TrackingConfig(run_dir=str(run_dir), **config_kwargs), enabled=True,
                             total_iters=steps)
    tracker.log_config({"lr": 5e-6, "micro_batch_size": 1, "data_path": ["a.jsonl"]},
                       layout="world=8 TP=2 PP=2 EP=2 DP=2", data_stats=DATA_STATS)
    tracker.log({"loss": 2.5, "rewards/accuracies": 0.5}, 0, 0, prefix="eval")
    for step in range(1, steps + 1):
        tracker.log(fake_metrics(step), step, 32 * step, prefix="train")
    tracker.log({"loss": 1 / 3, "rewards/accuracies": 0.75, "rewards/margins": 0.01 / 3}, steps, 32 * steps,
                prefix="eval")
    tracker.finish()


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture()
def offline_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


def test_offline_wandb_history_equals_metrics_jsonl(tmp_path, offline_env):
    run_dir = tmp_path / "run"
    run_fake_training(run_dir, wandb_project="orpo-test", wandb_exp_name="fake-run")
    events = read_jsonl(run_dir / "metrics.jsonl")
    history = read_wandb.read_history(str(run_dir))

    # One JSONL event per log call: data stats, eval at 0, 4 train steps, eval at the end.
    assert [e["iteration"] for e in events] == [0, 0, 1, 2, 3, 4, 4]
    assert len(history) == len(events)
    for event, row in zip(events, history):
        assert {k: v for k, v in row.items() if not k.startswith("_")} == event
    train_keys = set(events[2])
    assert {f"train/{name}" for name in ORPO_METRICS} <= train_keys
    assert {"train/tokens_per_second", "train/tflops_per_gpu", "train/mfu", "train/memory/max_rss_gb"} <= train_keys
    assert {"eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"} <= set(events[-1])
    assert events[0] == {"iteration": 0, "consumed_pairs": 0, **DATA_STATS}
    assert events[3]["consumed_pairs"] == 64 and events[3]["train/loss"] == fake_metrics(2)["loss"]

    # Every namespace is plotted against the iteration axis; consumed_pairs rides along as a metric.
    definitions = {r.metric.glob_name or r.metric.name: r.metric.step_metric
                   for r in read_wandb.records(read_wandb.find_run_file(str(run_dir)))
                   if r.WhichOneof("record_type") == "metric"}
    assert definitions["train/*"] == definitions["eval/*"] == definitions["consumed_pairs"] == "iteration"

    # Our record reader against W&B's own CLI reader of the same file.
    leet = subprocess.run(["wandb", "leet", "inspect", os.path.dirname(read_wandb.find_run_file(str(run_dir))),
                           "--json"], capture_output=True, text=True, timeout=120)
    assert leet.returncode == 0, leet.stderr
    leet_history = [json.loads(line)["history"]["item"] for line in leet.stdout.splitlines()
                    if '"type":"history"' in line]
    assert leet_history == history


def test_run_config_json_and_wandb_config_record_flags_and_layout(tmp_path, offline_env):
    run_dir = tmp_path / "run"
    run_fake_training(run_dir, steps=1, wandb_project="orpo-test")
    with open(run_dir / "run_config.json", encoding="utf-8") as f:
        recorded = json.load(f)
    assert recorded == {"config": {"lr": 5e-6, "micro_batch_size": 1, "data_path": ["a.jsonl"]},
                        "parallel_layout": "world=8 TP=2 PP=2 EP=2 DP=2"}
    config = read_wandb.read_config(str(run_dir))
    assert {k: config[k] for k in ("lr", "micro_batch_size", "data_path", "parallel_layout")} == {
        "lr": 5e-6, "micro_batch_size": 1, "data_path": ["a.jsonl"], "parallel_layout": "world=8 TP=2 PP=2 EP=2 DP=2"}
    assert {k: read_wandb.read_summary(str(run_dir))[k] for k in DATA_STATS} == DATA_STATS


def test_without_wandb_project_no_wandb_run_is_created(tmp_path, offline_env):
    run_fake_training(tmp_path / "run", steps=2)
    assert sorted(os.listdir(tmp_path / "run")) == ["metrics.jsonl", "run_config.json"]


def test_only_the_logging_rank_writes(tmp_path, offline_env, capsys):
    run_dir = tmp_path / "run"
    tracker = MetricsTracker(TrackingConfig(run_dir=str(run_dir), wandb_project="orpo-test"), enabled=False)
    tracker.log_config({"lr": 1.0}, layout="world=2", data_stats=DATA_STATS)
    tracker.log(fake_metrics(1), 1, 32)
    tracker.finish()
    assert not run_dir.exists()
    assert capsys.readouterr().out == ""


def test_wandb_start_failure_warns_and_metrics_still_reach_jsonl(tmp_path, offline_env, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the W&B folder should go")
    run_dir = tmp_path / "run"
    run_fake_training(run_dir, steps=2, wandb_project="orpo-test", wandb_save_dir=str(blocker / "sub"))
    err = capsys.readouterr().err
    assert "WARNING: W&B could not start" in err and str(run_dir / "metrics.jsonl") in err
    assert [e["iteration"] for e in read_jsonl(run_dir / "metrics.jsonl")] == [0, 0, 1, 2, 2]


def test_resume_drops_events_after_the_checkpoint_and_appends(tmp_path, offline_env):
    run_dir = tmp_path / "run"
    run_fake_training(run_dir, steps=5)
    tracker = MetricsTracker(TrackingConfig(run_dir=str(run_dir)), enabled=True, total_iters=5, resume_iteration=3)
    tracker.log(fake_metrics(4), 4, 128)
    tracker.finish()
    events = read_jsonl(run_dir / "metrics.jsonl")
    assert [e["iteration"] for e in events] == [0, 0, 1, 2, 3, 4]
    assert events[-1]["train/loss"] == fake_metrics(4)["loss"]


def test_resume_drops_a_line_cut_short_by_a_kill(tmp_path, offline_env, capsys):
    run_dir = tmp_path / "run"
    run_fake_training(run_dir, steps=3)
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"iteration": 4, "consumed_pairs": 12')
    tracker = MetricsTracker(TrackingConfig(run_dir=str(run_dir)), enabled=True, resume_iteration=3)
    tracker.log(fake_metrics(4), 4, 128)
    tracker.finish()
    assert [e["iteration"] for e in read_jsonl(run_dir / "metrics.jsonl")] == [0, 0, 1, 2, 3, 3, 4]
    assert "metrics.jsonl:7: dropped an incomplete metrics line" in capsys.readouterr().err


def test_a_new_run_in_the_same_folder_replaces_old_metrics(tmp_path, offline_env, capsys):
    run_dir = tmp_path / "run"
    run_fake_training(run_dir, steps=3)
    run_fake_training(run_dir, steps=2)
    assert [e["iteration"] for e in read_jsonl(run_dir / "metrics.jsonl")] == [0, 0, 1, 2, 2]
    assert "from an earlier run is replaced" in capsys.readouterr().err


def test_resumed_run_continues_the_same_wandb_run_and_a_fresh_one_does_not(tmp_path, offline_env):
    run_dir = tmp_path / "run"
    run_fake_training(run_dir, steps=2, wandb_project="orpo-test")
    resumed = MetricsTracker(TrackingConfig(run_dir=str(run_dir), wandb_project="orpo-test"), enabled=True,
                             resume_iteration=2)
    resumed.finish()
    run_fake_training(run_dir, steps=1, wandb_project="orpo-test")
    # offline-run-<date>_<time>-<id>[-n]: W&B adds -n when two runs start in the same second.
    ids = collections.Counter(name.split("-")[3] for name in os.listdir(run_dir / "wandb")
                              if name.startswith("offline-run-"))
    fresh_id = (run_dir / "wandb_run_id").read_text().strip()
    assert ids[fresh_id] == 1 and sorted(ids.values()) == [1, 2]


def test_console_line_shows_progress_metrics_and_eta(tmp_path, capsys):
    tracker = MetricsTracker(TrackingConfig(run_dir=None), enabled=True, total_iters=10)
    tracker.log({"loss": 0.5, "nll_loss": 0.4, "log_odds_chosen": 1.25, "rewards/accuracies": 0.75,
                 "rewards/margins": 0.02, "tokens_per_second": 2048.0, "mfu": 0.25}, 2, 64)
    tracker.finish()
    line = capsys.readouterr().out.strip()
    for part in ("train iter 2/10", "pairs 64", "loss 0.5000", "nll 0.4000", "log-odds 1.250", "acc 0.750",
                 "margin 0.0200", "tok/s 2048", "MFU 25.0%", "ETA "):
        assert part in line, (part, line)


def test_non_numeric_metric_is_a_clear_error(tmp_path):
    tracker = MetricsTracker(TrackingConfig(run_dir=str(tmp_path)), enabled=True)
    with pytest.raises(TypeError, match="metric 'loss' must be a number"):
        tracker.log({"loss": "low"}, 1, 1)
    with pytest.raises(ValueError, match="prefix must be 'train' or 'eval'"):
        tracker.log({"loss": 1.0}, 1, 1, prefix="test")
    tracker.finish()


def test_logging_flags_have_megatron_names_defaults_and_help():
    parser = argparse.ArgumentParser()
    add_logging_args(parser)
    args = parser.parse_args([])
    assert (args.wandb_project, args.wandb_exp_name, args.wandb_save_dir, args.log_interval) == (None, None, None, 10)
    for action in parser._actions[1:]:
        assert action.help and len(action.help) > 20, action.option_strings
    args = parser.parse_args(["--wandb-project", "p", "--log-dir", "/x", "--log-interval", "5"])
    assert TrackingConfig.from_args(args) == TrackingConfig(run_dir="/x", wandb_project="p")
