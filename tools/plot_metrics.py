"""Plot a run's ORPO curves from its `metrics.jsonl`, for people without W&B.

    python tools/plot_metrics.py RUN_DIR [--output PNG] [--x-axis iteration|consumed_pairs]

Renders loss, NLL, log-odds (`log_odds_chosen`, ORPO runs only), reward margin and reward accuracy, training
and (where present) evaluation, one panel each, to RUN_DIR/metrics.png by default. For MoE runs, beside them: the
expert-load heat map (every layer's experts over the logged steps, each expert's token count over the layer's
mean: 1 is balanced, 0 a dead expert) and the busiest and idlest expert's load.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orpo_megatron.errors import UserError  # noqa: E402

METRICS_FILE = "metrics.jsonl"  # written by orpo_megatron.tracking
PANELS = (
    ("loss", "loss (the --loss-type objective)"),
    ("nll_loss", "NLL (chosen)"),
    ("log_odds_chosen", "log-odds ratio (chosen vs rejected)"),
    ("rewards/margins", "reward margin"),
    ("rewards/accuracies", "reward accuracy"),
)


EXPERT_LOAD = "train/moe/expert_load"  # {layer: [load of each expert]} per logged step


class MetricsFileError(UserError, ValueError):
    """A metrics file that cannot be plotted, with the file and line named."""


def read_events(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise MetricsFileError(f"{path}: no such file; expected the metrics.jsonl a training run writes "
                               "into its run folder (--log-dir, or --save)")
    events = []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(number, line) for number, line in enumerate(f, start=1) if line.strip()]
    for number, line in lines:
        try:
            event = json.loads(line)
        except json.JSONDecodeError as err:
            if number == lines[-1][0]:  # cut short by a run killed mid-write; the trainer drops it on resume too
                print(f"warning: {path}:{number}: skipped the incomplete last line", file=sys.stderr)
                break
            raise MetricsFileError(f"{path}:{number}: not a JSON object ({err})") from None
        if not isinstance(event, dict) or "iteration" not in event:
            raise MetricsFileError(f"{path}:{number}: expected an object with an 'iteration' key")
        events.append(event)
    if not events:
        raise MetricsFileError(f"{path}: no metrics yet (the file is empty)")
    return events


def series(events: list[dict], key: str, x_axis: str) -> tuple[list[float], list[float]]:
    """(x, y) of one metric over the events that have it, skipping non-finite values."""
    points = [(e[x_axis], e[key]) for e in events
              if key in e and isinstance(e[key], (int, float)) and math.isfinite(e[key])]
    return [x for x, _ in points], [y for _, y in points]


def expert_load_grid(events: list[dict], x_axis: str) -> tuple[list[float], list[str], list[list[float]]]:
    """The heat map's data: the x of each logged step with expert loads, the layers (in order), and one row per
    (layer, expert) holding that expert's load at each of those steps."""
    logged = [e for e in events if isinstance(e.get(EXPERT_LOAD), dict)]
    layers = sorted({layer for e in logged for layer in e[EXPERT_LOAD]}, key=int)
    rows = []
    for layer in layers:
        num_experts = max(len(e[EXPERT_LOAD].get(layer, [])) for e in logged)
        for expert in range(num_experts):
            rows.append([e[EXPERT_LOAD][layer][expert] if layer in e[EXPERT_LOAD] else math.nan for e in logged])
    return [e[x_axis] for e in logged], layers, rows


def plot_expert_load(ax, events: list[dict], x_axis: str) -> int:
    """The expert-load heat map on `ax`; returns the number of layers drawn."""
    x, layers, rows = expert_load_grid(events, x_axis)
    half_step = (x[-1] - x[0]) / (len(x) - 1) / 2 if len(x) > 1 else 0.5  # each cell centred on its step
    image = ax.imshow(rows, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=0.0, vmax=2.0,
                      extent=(x[0] - half_step, x[-1] + half_step, len(rows), 0))
    per_layer = len(rows) // len(layers)
    for boundary in range(per_layer, len(rows), per_layer):
        ax.axhline(boundary, color="black", linewidth=0.5)
    step = max(1, len(layers) // 16)  # at most 16 layer labels
    ax.set_yticks([per_layer * (i + 0.5) for i in range(0, len(layers), step)],
                  [f"layer {layers[i]}" for i in range(0, len(layers), step)], fontsize=7)
    ax.set_title("expert load (tokens over the layer's mean; one row per expert)", fontsize=9)
    ax.set_xlabel(x_axis.replace("_", " "))
    ax.figure.colorbar(image, ax=ax, fraction=0.04)
    return len(layers)


def plot(events: list[dict], output: str, title: str, x_axis: str = "iteration") -> tuple[int, int]:
    """Write the panels to `output`; returns how many curve panels had data and how many layers the expert-load
    heat map shows (0: not an MoE run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routed = any(isinstance(e.get(EXPERT_LOAD), dict) for e in events)
    rows = len(PANELS) + (1 if routed else 0)
    fig = plt.figure(figsize=(16 if routed else 8, 2.6 * len(PANELS)))
    grid = fig.add_gridspec(rows, 2 if routed else 1)
    axes = [fig.add_subplot(grid[0, 0])]
    axes += [fig.add_subplot(grid[i, 0], sharex=axes[0]) for i in range(1, rows)]
    drawn = 0
    for ax, (metric, label) in zip(axes, PANELS):
        for split, style, color in (("train", "-", "C0"), ("eval", "o-", "C1")):
            x, y = series(events, f"{split}/{metric}", x_axis)
            if x:
                ax.plot(x, y, style, color=color, label=split, markersize=4)
        if ax.lines:
            drawn += 1
            ax.legend(loc="best")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    layers = 0
    if routed:
        for metric, label in (("moe/max_load", "busiest expert"), ("moe/min_load", "idlest expert")):
            axes[-1].plot(*series(events, f"train/{metric}", x_axis), label=label)
        axes[-1].axhline(1.0, color="gray", linewidth=0.5)
        axes[-1].set_ylabel("expert load (all layers)", fontsize=8)
        axes[-1].legend(loc="best")
        axes[-1].grid(alpha=0.3)
        layers = plot_expert_load(fig.add_subplot(grid[:, 1]), events, x_axis)
    axes[-1].set_xlabel(x_axis.replace("_", " "))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return drawn, layers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="A run folder holding metrics.jsonl (or the metrics.jsonl file itself).")
    parser.add_argument("--output", default=None, help="PNG to write. Default: RUN_DIR/metrics.png.")
    parser.add_argument("--x-axis", choices=["iteration", "consumed_pairs"], default="iteration",
                        help="Horizontal axis: optimizer steps or training pairs consumed. Default: iteration.")
    args = parser.parse_args(argv)
    path = args.run_dir if args.run_dir.endswith(".jsonl") else os.path.join(args.run_dir, METRICS_FILE)
    output = args.output or os.path.join(os.path.dirname(path), "metrics.png")
    try:
        events = read_events(path)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not any(series(events, f"{split}/{metric}", args.x_axis)[0]
               for metric, _ in PANELS for split in ("train", "eval")):
        print(f"error: {path} has none of the plotted metrics "
              f"({', '.join('train/' + m for m, _ in PANELS)}, or eval/...)", file=sys.stderr)
        return 1
    drawn, layers = plot(events, output, title=os.path.basename(os.path.dirname(os.path.abspath(path))),
                         x_axis=args.x_axis)
    heat_map = f", expert-load heat map of {layers} layers" if layers else ""
    print(f"wrote {output} ({drawn} of {len(PANELS)} panels with data{heat_map}, {len(events)} events)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
