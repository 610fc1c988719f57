"""The GPU acceptance command's --dry-run on CPU: it says first how to run it on a machine without internet, every
line is present, the CPU-runnable ones pass with their figures, the GPU-only ones say why they are skipped (after
running what of them runs on CPU), nothing fails."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "acceptance", "gpu.py")


def test_help_says_how_to_run_it_offline():
    proc = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "--budget-minutes" in proc.stdout and "pip install -q --no-index --find-links .whl" in proc.stdout


def test_dry_run_prints_one_table_with_passes_and_reasoned_skips(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--work-dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=900, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    output = proc.stdout
    assert proc.returncode == 0, (output + proc.stderr)[-4000:]
    assert output.startswith("How to run this on a lent GPU machine without internet")
    assert "pip download" in output and "megatron-core==0.16.1" in output and "datasets==" in output
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
            ("(b) trainer", "adam: bf16 keeps loaded weights"), ("(b) trainer", "adam: save + exact resume"),
            ("(c) packing", "packed = --no-packing (same pairs)")} <= passes
    assert rows["(b) trainer", "adam: bf16 keeps loaded weights"].split("pass", 1)[1].strip().startswith("held-out loss")
    assert "worst metric" in rows["(c) packing", "packed = --no-packing (same pairs)"]
    assert re.match(r"[\d,]+ tok/s", rows["(f) throughput", "2 Mixtral-8x22B layers"])
    assert re.match(r"\d+\.\d\dx\s+on [\d,]+ tok/s, off", rows["(f) throughput", "overlap_grad_reduce on/off"])
    # What needs a GPU or Transformer Engine says so, after the part that runs on CPU ran.
    for key in [("(a) parity", "te spec, bf16"), ("(b) trainer", "precision-aware: save + exact resume"),
                ("(b) trainer", "offload 1.0: save + exact resume"), ("(c) packing", "batches on the device"),
                ("(c) packing", "no host sync from orpo_megatron/"),
                ("(c) packing", "packed FP8 hybrid pass (rows to 16)"),
                ("(d) checkpoints", "TE spec keys = local spec keys"),
                ("(d) checkpoints", "saved on one spec, loaded on another"),
                ("(d) checkpoints", "FP8 delayed: fp8_meta back after a load"),
                ("(e) memory", "optimizer memory"), ("(f) throughput", "moe_grouped_gemm on/off"),
                ("(g) FP8", "delayed: steps, save, resume with FP8 state"),
                ("(g) FP8", "tensorwise: steps, save, resume with FP8 state"),
                ("(g) FP8", "evaluator with --fp8-format")]:
        assert rows[key].startswith("skipped: ") and len(rows[key]) > len("skipped: ") + 5, (key, rows[key])
    assert re.search(r"rows (\d+ \(\d+ real\), )*\d+ \(\d+ real\): \d+ of \d+ padded to a multiple of 16",
                     rows["(c) packing", "packed FP8 hybrid pass (rows to 16)"])
    assert "local -> local ran: weights bitwise equal" in rows["(d) checkpoints",
                                                              "saved on one spec, loaded on another"]
    assert "DEVICE_FIELDS lists every tensor field" in rows["(c) packing", "batches on the device"]
    assert re.search(r"local: \d+ tensors, \d+ objects \(\d+ _extra_state\)",
                     rows["(d) checkpoints", "TE spec keys = local spec keys"])


def test_backward_sync_detector_wraps_our_autograd_backward_and_names_the_line(monkeypatch):
    """The host-sync line's second detector on CPU: orpo_megatron's autograd backward runs under sync debug mode
    'error' inside a real backward pass, and an error raised there comes back with the frames that locate it.
    CUDA's sync detection itself is stood in for (no CUDA here): entering 'error' mode raises as a sync would."""
    monkeypatch.syspath_prepend(REPO)
    import acceptance.workers as acceptance_workers
    import torch

    from orpo_megatron import objective

    modes, syncing = [], []

    def set_sync_debug_mode(mode):
        modes.append(mode)
        if mode == "error" and syncing:
            raise RuntimeError("called a synchronizing CUDA operation")

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_sync_debug_mode)
    original = objective._VocabParallelTokenLogProbs.backward

    def step():
        logits = torch.randn(2, 5, 11, requires_grad=True)
        objective.vocab_parallel_logps(logits, torch.randint(0, 11, (2, 5)), 11).sum().backward()

    assert objective._VocabParallelTokenLogProbs in acceptance_workers.orpo_autograd_functions()
    assert acceptance_workers.first_backward_sync(step, plant=False) is None
    assert modes == ["error", "default"]  # the mode was on while our backward ran, and set back
    syncing.append(True)
    frames = acceptance_workers.first_backward_sync(step, plant=False)
    assert frames and frames[-2].name == "backward_raising_on_sync"
    assert objective._VocabParallelTokenLogProbs.backward is original
