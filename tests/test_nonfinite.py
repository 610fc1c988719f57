"""A non-finite gradient norm beyond --skip-nonfinite-steps stops the run, naming the step and the last good
checkpoint (the skipping itself: test_training_faults.py)."""
import os
import subprocess
import sys


def test_diverging_run_stops_naming_step_and_last_checkpoint(tiny_converted, tmp_path):
    save = str(tmp_path / "run")
    # An absurd learning rate without clipping: step 1 is finite, its update overflows the weights.
    proc = subprocess.run(
        [sys.executable, "-m", "orpo_megatron.train", "--load", tiny_converted, "--save", save, "--save-interval", "1",
         "--data-path", "examples/data/plain.jsonl", "--max-length", "256", "--max-prompt-length", "192",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "10", "--lr", "1e30",
         "--clip-grad", "0", "--data-cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    last_good = os.path.join(save, "iter_0000001")
    assert f"non-finite grad norm at iteration 2 (nan), step not applied; last good checkpoint: {last_good}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == "1"
