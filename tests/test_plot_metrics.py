"""tools/plot_metrics.py renders a run's metrics.jsonl to a PNG and fails clearly without usable metrics."""
import importlib.util
import json
import os
import struct

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("plot_metrics", os.path.join(REPO, "tools", "plot_metrics.py"))
plot_metrics = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_metrics)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_events(path, events) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in events)


def synthetic_run(run_dir, steps: int = 30) -> None:
    events = [{"iteration": 0, "consumed_pairs": 0, "data/train_rows": 100}]
    for step in range(1, steps + 1):
        events.append({"iteration": step, "consumed_pairs": 32 * step, "train/loss": 2.0 / step,
                       "train/nll_loss": 1.5 / step, "train/log_odds_chosen": 0.1 * step,
                       "train/rewards/margins": 0.01 * step, "train/rewards/accuracies": min(1.0, 0.5 + step / 60)})
        if step % 10 == 0:
            events.append({"iteration": step, "consumed_pairs": 32 * step, "eval/loss": 2.2 / step,
                           "eval/nll_loss": 1.6 / step, "eval/log_odds_chosen": 0.09 * step,
                           "eval/rewards/margins": 0.009 * step, "eval/rewards/accuracies": 0.5 + step / 100})
    os.makedirs(run_dir, exist_ok=True)
    write_events(os.path.join(run_dir, "metrics.jsonl"), events)


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == PNG_SIGNATURE and header[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", header[16:24])


@pytest.mark.parametrize("x_axis", ["iteration", "consumed_pairs"])
def test_renders_all_five_panels_to_a_png(tmp_path, capsys, x_axis):
    synthetic_run(tmp_path / "run")
    output = tmp_path / "curves.png"
    assert plot_metrics.main([str(tmp_path / "run"), "--output", str(output), "--x-axis", x_axis]) == 0
    assert "5 of 5 panels with data" in capsys.readouterr().out
    width, height = png_size(output)
    assert (width, height) == (800, 1300)  # 8 x 13 inches at 100 dpi: five stacked panels
    assert output.stat().st_size > 30_000  # curves, labels and legends, not a blank canvas


def test_default_output_is_next_to_the_metrics_file(tmp_path):
    synthetic_run(tmp_path / "run", steps=3)
    assert plot_metrics.main([str(tmp_path / "run")]) == 0
    png_size(tmp_path / "run" / "metrics.png")


@pytest.mark.parametrize("content, message", [
    (None, "metrics.jsonl: no such file"),
    ("", "no metrics yet (the file is empty)"),
    ('{"iteration": 1, "train/loss": 1.0}\n{"iteration": 2, "train/loss": \n{"iteration": 3, "train/loss": 0.5}\n',
     "metrics.jsonl:2: not a JSON object"),  # a cut-off last line is skipped (tests/test_user_errors.py)
    ('{"iteration": 1, "train/grad_norm": 1.0}\n', "has none of the plotted metrics"),
])
def test_missing_empty_or_unusable_metrics_file_is_a_clear_error(tmp_path, capsys, content, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if content is not None:
        (run_dir / "metrics.jsonl").write_text(content)
    assert plot_metrics.main([str(run_dir)]) == 1
    assert message in capsys.readouterr().err
    assert not (run_dir / "metrics.png").exists()


def moe_run(run_dir, steps: int = 12) -> dict:
    """A synthetic MoE run: 3 layers of 4 experts; expert 2 of layer 1 dies at step 5. Returns the loads logged,
    {(layer, expert): [load per step]}."""
    synthetic_run(run_dir, steps)
    path = os.path.join(run_dir, "metrics.jsonl")
    events = [json.loads(line) for line in open(path)]
    expected = {}
    for event in events:
        if "train/loss" not in event:
            continue
        step = event["iteration"]
        table = {}
        for layer in range(3):
            loads = [1.0 + 0.1 * ((layer + expert + step) % 3 - 1) for expert in range(4)]
            if layer == 1 and step >= 5:
                loads[2] = 0.0
            table[str(layer)] = loads
            for expert, load in enumerate(loads):
                expected.setdefault((layer, expert), []).append(load)
        event["train/moe/expert_load"] = table
        event["train/moe/max_load"] = max(max(v) for v in table.values())
        event["train/moe/min_load"] = min(min(v) for v in table.values())
    write_events(path, events)
    return expected


def test_moe_run_gets_the_expert_load_heat_map_beside_the_curves(tmp_path, capsys):
    expected = moe_run(tmp_path / "run")
    events = plot_metrics.read_events(str(tmp_path / "run" / "metrics.jsonl"))
    x, layers, rows = plot_metrics.expert_load_grid(events, "iteration")
    assert x == list(range(1, 13)) and layers == ["0", "1", "2"]
    assert rows == [expected[(layer, expert)] for layer in range(3) for expert in range(4)]
    assert rows[1 * 4 + 2][4:] == [0.0] * 8  # the dead expert's row

    output = tmp_path / "moe.png"
    assert plot_metrics.main([str(tmp_path / "run"), "--output", str(output)]) == 0
    assert "expert-load heat map of 3 layers" in capsys.readouterr().out
    assert png_size(output) == (1600, 1300)  # the curves' column and the heat map's
