"""The GPU acceptance command's --dry-run on CPU: every line present, the CPU-runnable ones pass with their
figures, the GPU-only ones say why they are skipped, nothing fails."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_prints_one_table_with_passes_and_reasoned_skips(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_acceptance.py"), "--dry-run",
                           "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    output = proc.stdout
    assert proc.returncode == 0, (output + proc.stderr)[-4000:]
    table = output[output.index("\nsection "):]
    rows = {}
    for line in table.splitlines()[2:]:
        if not line.strip() or re.match(r"\d+ lines in", line):
            continue
        section, check, rest = re.split(r"\s{2,}", line.strip(), maxsplit=2)
        rows[section, check] = rest
    assert not [row for row in rows.values() if row.startswith("FAIL")], rows
    passes = {key for key, rest in rows.items() if rest.startswith("pass")}
    assert {("(a) parity", "local spec, fp32"), ("(a) parity", "local spec, bf16"),
            ("(b) trainer", "adam: bf16 keeps loaded weights"), ("(b) trainer", "adam: save + exact resume")} <= passes
    assert rows["(b) trainer", "adam: bf16 keeps loaded weights"].split("pass", 1)[1].strip().startswith("held-out loss")
    assert re.match(r"[\d,]+ tok/s", rows["(d) throughput", "2 Mixtral-8x22B layers"])
    assert re.match(r"\d+\.\d\dx\s+on [\d,]+ tok/s, off", rows["(d) throughput", "overlap_grad_reduce on/off"])
    # What needs a GPU or Transformer Engine says so.
    for key in [("(a) parity", "te spec, bf16"), ("(b) trainer", "precision-aware: save + exact resume"),
                ("(c) FP8", "delayed: steps, save, resume with FP8 state"),
                ("(c) FP8", "tensorwise: steps, save, resume with FP8 state"),
                ("(d) throughput", "moe_grouped_gemm on/off"), ("(b) trainer", "batches on the device")]:
        assert rows[key].startswith("skipped: ") and len(rows[key]) > len("skipped: ") + 5, (key, rows[key])
