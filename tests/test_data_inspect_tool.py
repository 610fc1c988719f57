"""tools/inspect_data.py reports what training would do with the data."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "inspect_data.py")
EXAMPLES = os.path.join(REPO, "examples", "data")


def _run(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_inspect_reports_counts_percentiles_and_a_marked_example(tmp_path, tiny_mixtral):
    rows = [json.loads(line) for line in open(os.path.join(EXAMPLES, "plain.jsonl"), encoding="utf-8")][:40]
    rows[5] = dict(rows[5], rejected=rows[5]["chosen"])
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    proc = _run("--data-path", str(data), "--tokenizer", tiny_mixtral, "--data-cache-dir", str(tmp_path / "cache"),
                "--max-length", "40", "--max-prompt-length", "20", "--example", "0", "--max-bad-row-fraction", "0.01")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "40 rows, 39 pairs kept" in out
    assert "chosen_equals_rejected" in out and "e.g. row 5:" in out
    assert "training would STOP: 2.5% bad > --max-bad-row-fraction 0.01" in out
    assert "p50" in out and "sequence_length_after" in out
    after = next(line for line in out.splitlines() if line.startswith("sequence_length_after"))
    assert int(after.split()[-1]) <= 40
    assert "[[<s>" in out and "]]" in out and "Tokenizing" in proc.stderr  # the datasets progress bar


def test_inspect_without_tokenizer_or_with_missing_data_exits_nonzero(tmp_path, tiny_mixtral):
    proc = _run("--data-path", os.path.join(EXAMPLES, "plain.jsonl"))
    assert proc.returncode == 2 and "--tokenizer is required" in proc.stderr
    proc = _run("--data-path", str(tmp_path / "missing.jsonl"), "--tokenizer", tiny_mixtral)
    assert proc.returncode == 1 and "no such file or folder" in proc.stderr
