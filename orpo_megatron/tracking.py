"""Metrics tracking: one rank writes every log event to the console, `metrics.jsonl` and (optionally) TensorBoard
and W&B.

Owns the logging flags, the run folder's `metrics.jsonl` and `run_config.json`, the console line, the TensorBoard
writer and the W&B run (offline mode included). It computes no metric itself except the ETA and the process's memory: the
trainer passes finished numbers (ORPO metrics from `objective.py`, throughput from `throughput.py`).

Every event is one JSON line `{"iteration": i, "consumed_pairs": n, "train/loss": ..., ...}` with keys
namespaced `train/`, `eval/` or `data/`; the W&B history gets the same dict, with `iteration` as the step
axis of all metrics and `consumed_pairs` logged alongside so any panel can use it as its x axis; TensorBoard gets
each scalar under the same name at step `iteration`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import time
import uuid
from typing import Any, Mapping

METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "run_config.json"
WANDB_ID_FILE = "wandb_run_id"

# Console columns: (metric key without prefix, label, format).
CONSOLE_COLUMNS = (
    ("loss", "loss", "{:.4f}"),
    ("nll_loss", "nll", "{:.4f}"),
    ("log_odds_chosen", "log-odds", "{:.3f}"),
    ("rewards/accuracies", "acc", "{:.3f}"),
    ("rewards/margins", "margin", "{:.4f}"),
    ("grad_norm", "grad", "{:.3f}"),
    ("lr", "lr", "{:.3g}"),
    ("tokens_per_second", "tok/s", "{:.0f}"),
    ("real_token_fraction", "real", "{:.1%}"),
    ("tflops_per_gpu", "TFLOP/s/GPU", "{:.1f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("moe/max_load", "expert load max", "{:.2f}"),
    ("moe/min_load", "min", "{:.2f}"),
    ("moe/dead_experts", "dead experts", "{}"),
)


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("--log-interval", type=int, default=10,
                       help="Log training metrics every N optimizer steps (averaged over those steps' batches "
                            "as each step's global batch). Default: 10 (the Zephyr-141B recipe's logging_steps).")
    group.add_argument("--log-dir", default=None,
                       help="Run folder for metrics.jsonl and run_config.json (plot with tools/plot_metrics.py). "
                            "Default: the --save folder; with neither, metrics go to the console only.")
    group.add_argument("--wandb-project", default=None,
                       help="Weights & Biases project. Default: none (no W&B run is created).")
    group.add_argument("--wandb-exp-name", default=None,
                       help="W&B run name. Default: the run folder's name.")
    group.add_argument("--wandb-save-dir", default=None,
                       help="Folder in which W&B writes its local `wandb/` folder (offline runs land there). "
                            "Default: the run folder, or the working directory without one.")
    group.add_argument("--tensorboard-dir", default=None,
                       help="Write every logged scalar to TensorBoard event files in this folder too, under the "
                            "names of metrics.jsonl, at step = iteration (Megatron-LM's flag). Default: none.")
    group.add_argument("--wandb-mode", choices=["online", "offline", "disabled"], default=None,
                       help="W&B mode. Default: the WANDB_MODE environment variable, else online; 'offline' "
                            "writes a run to sync later with `wandb sync`.")


@dataclasses.dataclass
class TrackingConfig:
    """Where and how metrics are written. `run_dir` None: console (and W&B if a project is set) only."""

    run_dir: str | None = None
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    wandb_save_dir: str | None = None
    wandb_mode: str | None = None  # None: WANDB_MODE from the environment, else W&B's default (online)
    tensorboard_dir: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrackingConfig":
        return cls(
            run_dir=getattr(args, "log_dir", None) or getattr(args, "save", None),
            wandb_project=args.wandb_project,
            wandb_exp_name=args.wandb_exp_name,
            wandb_save_dir=args.wandb_save_dir,
            wandb_mode=args.wandb_mode,
            tensorboard_dir=getattr(args, "tensorboard_dir", None),
        )


def _warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _jsonable(value: Any) -> Any:
    """Config values as JSON: numbers, strings, lists and dicts stay; anything else becomes its repr."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _scalar(name: str, value: Any) -> float | int:
    """A metric as a plain number (tensors and numpy scalars included); a clear error for anything else."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric '{name}' must be a number, got {type(value).__name__}: {value!r}")
    return value


def memory_metrics() -> dict[str, float]:
    """This process's memory in GB: CUDA allocated / peak allocated / reserved, or peak RSS on CPU."""
    import torch

    if torch.cuda.is_available():
        return {
            "memory/allocated_gb": torch.cuda.memory_allocated() / 2**30,
            "memory/max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
            "memory/reserved_gb": torch.cuda.memory_reserved() / 2**30,
        }
    # ru_maxrss is in KiB on Linux.
    return {"memory/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class MetricsTracker:
    """Writes log events from the logging rank; every method is a no-op on the other ranks.

    The trainer picks the logging rank (the first rank of the last pipeline stage, which holds the loss) and
    passes `enabled` accordingly. `resume_iteration` > 0 keeps the run folder's earlier events up to that
    iteration (the checkpoint resumed from) and drops later ones, which the resumed run logs again; 0 starts
    a fresh metrics.jsonl.
    """

    def __init__(self, config: TrackingConfig, enabled: bool, total_iters: int | None = None,
                 resume_iteration: int = 0):
        self.config = config
        self.enabled = enabled
        self.total_iters = total_iters
        self._wandb_run = None
        self._tensorboard = None
        self._metrics_file = None
        self._started = time.perf_counter()
        self._start_iteration = resume_iteration
        if not enabled:
            return
        if config.run_dir:
            os.makedirs(config.run_dir, exist_ok=True)
            path = os.path.join(config.run_dir, METRICS_FILE)
            self._keep_events_up_to(path, resume_iteration)
            self._metrics_file = open(path, "a", encoding="utf-8")
        if config.wandb_project:
            self._wandb_run = self._init_wandb()
        if config.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run's events after its checkpoint are hidden, as metrics.jsonl drops them.
            self._tensorboard = SummaryWriter(config.tensorboard_dir,
                                              purge_step=resume_iteration + 1 if resume_iteration else None)

    @classmethod
    def from_args(cls, args: argparse.Namespace, enabled: bool, total_iters: int | None = None,
                  resume_iteration: int = 0) -> "MetricsTracker":
        return cls(TrackingConfig.from_args(args), enabled, total_iters, resume_iteration)

    @property
    def metrics_path(self) -> str | None:
        return os.path.join(self.config.run_dir, METRICS_FILE) if self.config.run_dir else None

    @staticmethod
    def _keep_events_up_to(path: str, iteration: int) -> None:
        if not os.path.exists(path):
            return
        if iteration == 0:  # a new run from scratch in this folder: the old curves are not its history
            _warn(f"{path} from an earlier run is replaced (this run starts at iteration 0)")
            os.remove(path)
            return
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        kept = []
        for number, line in enumerate(lines, start=1):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:  # a line cut short when the previous run was killed mid-write
                _warn(f"{path}:{number}: dropped an incomplete metrics line from the previous run")
                continue
            if event["iteration"] <= iteration:
                kept.append(line if line.endswith("\n") else line + "\n")
        if kept != lines:
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(kept)

    def _init_wandb(self):
        config = self.config
        # W&B writes into a `wandb/` folder inside `dir`.
        save_dir = config.wandb_save_dir or config.run_dir or os.getcwd()
        name = config.wandb_exp_name or (os.path.basename(os.path.normpath(config.run_dir)) if config.run_dir else None)
        try:
            import wandb

            os.makedirs(save_dir, exist_ok=True)
            run = wandb.init(project=config.wandb_project, name=name, dir=save_dir, mode=config.wandb_mode,
                             id=self._wandb_run_id(), resume="allow")
            run.define_metric("iteration")
            run.define_metric("consumed_pairs", step_metric="iteration")
            for prefix in ("train", "eval", "data"):
                run.define_metric(f"{prefix}/*", step_metric="iteration")
            return run
        except Exception as err:  # a run must not die because W&B is unreachable; it must say so
            _warn(f"W&B could not start ({type(err).__name__}: {err}); metrics go to the console"
                  + (f" and {self.metrics_path}" if self.metrics_path else "") + " only.")
            return None

    def _wandb_run_id(self) -> str:
        """One W&B run per run folder: a resumed (e.g. requeued) job continues the same W&B run."""
        if not self.config.run_dir:
            return uuid.uuid4().hex[:8]
        path = os.path.join(self.config.run_dir, WANDB_ID_FILE)
        if self._start_iteration > 0 and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return f.read().strip()
        run_id = uuid.uuid4().hex[:8]
        with open(path, "w", encoding="utf-8") as f:
            f.write(run_id + "\n")
        return run_id

    def _write(self, event: dict[str, Any], file_only: Mapping[str, Any] | None = None) -> None:
        """`event` to metrics.jsonl, TensorBoard and W&B; `file_only` (tables, not scalars) to metrics.jsonl
        alone."""
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps({**event, **(file_only or {})}) + "\n")
            self._metrics_file.flush()
        if self._tensorboard is not None:
            for name, value in event.items():
                if name != "iteration":
                    self._tensorboard.add_scalar(name, value, global_step=event["iteration"])
        if self._wandb_run is not None:
            try:
                self._wandb_run.log(event)
            except Exception as err:
                _warn(f"W&B logging failed ({type(err).__name__}: {err}); W&B is off for the rest of the run.")
                self._wandb_run = None

    def log_config(self, config: Mapping[str, Any], layout: Any = None,
                   data_stats: Mapping[str, int] | None = None) -> None:
        """Record the run's flags and parallel layout (run_config.json, W&B config); log `data_stats` if given."""
        if not self.enabled:
            return
        record = {"config": _jsonable(dict(config)), "parallel_layout": _jsonable(layout)}
        if self._tensorboard is not None:
            self._tensorboard.add_text("config", "```\n" + json.dumps(record, indent=2, sort_keys=True) + "\n```",
                                       global_step=self._start_iteration)
        if self.config.run_dir:
            with open(os.path.join(self.config.run_dir, RUN_CONFIG_FILE), "w", encoding="utf-8") as f:
                json.dump(record, f, indent=2, sort_keys=True)
        if self._wandb_run is not None:
            self._wandb_run.config.update({**record["config"], "parallel_layout": record["parallel_layout"]},
                                          allow_val_change=True)
        if data_stats is not None:
            self.log_data_stats(data_stats, iteration=self._start_iteration)

    def log_data_stats(self, stats: Mapping[str, int], iteration: int = 0, consumed_pairs: int = 0) -> None:
        """Data-set counts (rows, bad rows by reason, truncations) as one event, keys under `data/`."""
        if not self.enabled:
            return
        counts = {(name if name.startswith("data/") else f"data/{name}"): _scalar(name, value)
                  for name, value in stats.items()}
        self._write({"iteration": iteration, "consumed_pairs": consumed_pairs, **counts})
        if self._wandb_run is not None:
            self._wandb_run.summary.update(counts)
        print("data: " + ", ".join(f"{name.removeprefix('data/')} {value}" for name, value in counts.items()),
              flush=True)

    def log(self, metrics: Mapping[str, Any], iteration: int, consumed_pairs: int, prefix: str = "train") -> None:
        """One event: `metrics` (unprefixed names, e.g. 'loss', 'rewards/margins') under `prefix/`.

        Training events also get this process's memory figures (`train/memory/...`). A metric whose value is a
        mapping (a table, such as the per-layer expert loads) goes to metrics.jsonl only.
        """
        if not self.enabled:
            return
        if prefix not in ("train", "eval"):
            raise ValueError(f"prefix must be 'train' or 'eval', got {prefix!r}")
        tables = {f"{prefix}/{name}": _jsonable(value) for name, value in metrics.items() if isinstance(value, Mapping)}
        values = {name: _scalar(name, value) for name, value in metrics.items() if not isinstance(value, Mapping)}
        if prefix == "train":
            values.update(memory_metrics())
        event = {"iteration": int(iteration), "consumed_pairs": int(consumed_pairs),
                 **{f"{prefix}/{name}": value for name, value in values.items()}}
        self._write(event, file_only=tables)
        print(self._console_line(prefix, values, iteration, consumed_pairs), flush=True)

    def _console_line(self, prefix: str, values: Mapping[str, float], iteration: int, consumed_pairs: int) -> str:
        total = f"/{self.total_iters}" if self.total_iters else ""
        parts = [f"{prefix:5s} iter {iteration}{total}", f"pairs {consumed_pairs}"]
        for key, label, fmt in CONSOLE_COLUMNS:
            if key in values and values[key] is not None:
                value = values[key]
                parts.append(f"{label} {fmt.format(value) if math.isfinite(value) else value}")
        done = iteration - self._start_iteration
        if prefix == "train" and self.total_iters and done > 0:
            elapsed = time.perf_counter() - self._started
            parts.append(f"ETA {format_duration(elapsed / done * max(self.total_iters - iteration, 0))}")
        return " | ".join(parts)

    def finish(self) -> None:
        """Close the metrics file and the W&B run (flushes an offline run to disk)."""
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            try:
                import wandb

                self._wandb_run.finish()
                # finish() can return before wandb-core has written the run's records (seen with 0.31 offline:
                # a 7-byte .wandb file); teardown waits for the service, so the run is complete on disk.
                wandb.teardown()
            except Exception as err:
                _warn(f"W&B run did not finish cleanly ({type(err).__name__}: {err})")
            self._wandb_run = None
