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
