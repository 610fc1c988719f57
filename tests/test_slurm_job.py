"""`sbatch examples/orpo_mixtral_8x22b.sh` on the CI SLURM cluster (fake GPUs), with tiny-model overrides.

Skipped unless SLURM_CONF is set (CI runs `bash .ci/slurm/start.sh` and sources its env file first).
1. One node, 8 tasks at TP2 x PP2 x EP2 (DP2): the job converts the tiny HF checkpoint, trains 3 steps, saves,
   exports to HF and exits 0; the recipe's defaults (beta, lr schedule, template, seed) reach the trainer; srun
   gets the job's CPUs per task (-c, which srun no longer inherits) and binds tasks to cores, and the trainer
   runs with CUDA_DEVICE_MAX_CONNECTIONS=1 and the rendezvous on the first host `scontrol show hostnames` gives.
2. The time-limit path, through the 8x7B wrapper: USR1 to the batch shell (what `--signal=B:USR1@900` sends)
   makes the trainer save and exit, the script requeue the job, and the requeued run resume and finish.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from orpo_megatron.checkpoint import format as checkpoint_format

from orpo_megatron.checkpoint import weights as checkpoint_weights
from orpo_megatron.checkpoint import training as checkpointing

pytestmark = pytest.mark.skipif(
    not os.environ.get("SLURM_CONF"), reason="no SLURM cluster (start one with: bash .ci/slurm/start.sh)"
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT_8X22B = os.path.join(REPO, "examples", "orpo_mixtral_8x22b.sh")
SCRIPT_8X7B = os.path.join(REPO, "examples", "orpo_mixtral_8x7b.sh")  # its own #SBATCH lines, then execs 8x22B
DATA = os.path.join(REPO, "examples", "data", "capybara_style.jsonl")
# Sizes for 8 processes on a 2-core runner; precision and memory features that need a GPU are off.
TINY = dict(DATA_PATH=DATA, BF16="0", RECOMPUTE="", OPTIMIZER_OFFLOAD="0", GLOBAL_BATCH="4", MAX_LENGTH="64",
            MAX_PROMPT_LENGTH="48", WARMUP="1", LOG_INTERVAL="1", DATA_WORKERS="1", CONVERT_DTYPE="fp32")


def job_env(**overrides: str) -> dict:
    # sbatch exports the submitting environment; a torchrun rendezvous there would mask SLURM's.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return dict(env, PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **TINY, **overrides)


def sbatch(script: str, tasks: int, output: str, env: dict, cwd: str, wait: bool = True,
           cpus_per_task: int = 1) -> subprocess.Popen:
    return subprocess.Popen(["sbatch", *(["--wait"] if wait else []), "--parsable", "-N", "1", f"--ntasks-per-node={tasks}",
                             f"--gpus-per-node={tasks}", f"--cpus-per-task={cpus_per_task}", "--time=01:00:00",
                             f"--output={output}", script],
                            env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sbatch_job_converts_trains_at_tp2_pp2_ep2_saves_and_exports(tiny_mixtral, tmp_path):
    run_dir, output = tmp_path / "run", tmp_path / "job.out"
    env = job_env(HF_DIR=tiny_mixtral, RUN_DIR=str(run_dir), TP="2", PP="2", EP="2", TRAIN_ITERS="3",
                  EVAL_FRACTION="0.1", EVAL_INTERVAL="2", SAVE_INTERVAL="2", EXTRA_ARGS="--eval-iters 1", EXPORT_HF="1")
    # 2 CPUs per task (the cluster declares 16 for 8 tasks); the script must hand them to srun itself.
    job = sbatch(SCRIPT_8X22B, 8, str(output), env, str(tmp_path), cpus_per_task=2)
    stdout, stderr = job.communicate(timeout=900)
    log = output.read_text() if output.exists() else "(no job output)"
    assert job.returncode == 0, f"sbatch --wait exited {job.returncode}: {stderr}\n{log[-5000:]}"

    # Told to stop EXIT_MARGIN_MINS (15) before the one-hour limit: the time left at launch (under 60 minutes,
    # the conversion having run first) less 15.
    exit_after = int(log.split("--exit-duration-in-mins ")[1].split()[0])
    assert 40 <= exit_after <= 44, exit_after

    # The rendezvous host is the first of SLURM's own expansion of the job's node list.
    nodelist = next(line for line in log.splitlines() if "8 tasks, TP=2 PP=2 EP=2 DP=2" in line).split(" on ")[1]
    first_host = subprocess.run(["scontrol", "show", "hostnames", nodelist.split(":")[0]], capture_output=True,
                                text=True, check=True).stdout.split()[0]
    assert f"8 tasks, TP=2 PP=2 EP=2 DP=2, rendezvous on {first_host}" in log
    srun_line = next(line for line in log.splitlines() if " srun " in line and "orpo_megatron.train" in line)
    assert " srun --kill-on-bad-exit=1 --cpus-per-task=2 --cpu-bind=cores " in srun_line, srun_line
    assert "launch: OMP_NUM_THREADS=1," in log and "CUDA_DEVICE_MAX_CONNECTIONS=1" in log  # what the tasks saw
    assert "world=8 TP=2 PP=2 EP=2 DP=2 SP, CPU/gloo" in log  # the trainer's own view of the layout
    assert checkpoint_format.describe(str(run_dir / "converted")).release  # converted, not trained

    save = str(run_dir / "train")
    assert checkpointing.latest_iteration(save) == 3
    for iteration in (2, 3):  # --save-interval 2, and the end
        folder = checkpointing.iteration_dir(save, iteration)
        assert checkpoint_format.read_common(folder)["iteration"] == iteration
        state = json.load(open(os.path.join(folder, checkpointing.TRAIN_STATE_FILE)))
        assert state["iteration"] == iteration and state["layout"] == "world=8 TP=2 PP=2 EP=2 DP=2 SP"
        assert "optimizer.state.exp_avg.embedding.word_embeddings.weight" in checkpoint_weights.stored_tensors(folder)

    events = [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl"))]
    train = [e for e in events if "train/loss" in e]
    evals = [e for e in events if "eval/loss" in e]
    assert [(e["iteration"], e["consumed_pairs"]) for e in train] == [(1, 4), (2, 8), (3, 12)]
    assert [e["iteration"] for e in evals] == [0, 2, 3]
    for name in ("loss", "nll_loss", "log_odds_ratio", "rewards/margins", "rewards/accuracies", "grad_norm", "lr",
                 "moe_load_balancing_loss", "tokens_per_second"):
        assert all(f"train/{name}" in e for e in train), name

    # The script's recipe defaults reached the trainer.
    config = json.load(open(os.path.join(save, "run_config.json")))["config"]
    assert (config["beta"], config["lr"], config["lr_decay_style"], config["chat_template"], config["seed"],
            config["micro_batch_size"], config["weight_decay"], config["clip_grad"]) == \
        (0.05, 5e-6, "inverse-square-root", "zephyr", 42, 1, 0.0, 1.0)

    exported = run_dir / "hf"
    assert (exported / "config.json").is_file() and (exported / "model.safetensors.index.json").is_file()


def test_time_limit_warning_saves_requeues_and_the_requeued_job_resumes(tiny_mixtral, tmp_path):
    run_dir, output = tmp_path / "run", tmp_path / "job.out"
    env = job_env(HF_DIR=tiny_mixtral, RUN_DIR=str(run_dir), TP="1", PP="1", EP="2", TRAIN_ITERS="30",
                  SAVE_INTERVAL="")
    # No --wait: sbatch --wait may return as soon as the job is requeued, so the test follows the job itself.
    submitted = sbatch(SCRIPT_8X7B, 2, str(output), env, str(tmp_path), wait=False)
    job_id = submitted.communicate(timeout=60)[0].strip()
    assert submitted.returncode == 0 and job_id.isdigit(), job_id

    def wait_for(text: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if output.exists() and text in output.read_text():
                return
            time.sleep(0.2)
        raise AssertionError(f"{text!r} not in the job output\n{output.read_text() if output.exists() else ''}")

    wait_for("train iter 2/")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    wait_for("requeueing job")
    # A requeued job becomes eligible again only after SLURM's requeue delay (about two minutes): forcing an
    # earlier StartTime starts it while the old job credential is still revoked, and SLURM kills it.
    deadline, shown = time.monotonic() + 600, ""
    while time.monotonic() < deadline:
        shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
        restarted = output.exists() and f"job {job_id} (restart 1)" in output.read_text()
        if restarted and any(f"JobState={state} " in shown for state in
                                         ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")):
            break
        time.sleep(1)
    log = output.read_text()
    assert "JobState=COMPLETED" in shown and "ExitCode=0:0" in shown, f"{shown}\n{log[-5000:]}"

    stopped_at = int(log.split("stopped by signal at iteration ")[1].split(";")[0])
    assert "run the same command to resume (exit status 3)" in log  # the status the script requeues on
    assert 2 <= stopped_at < 30
    assert f"job {job_id} (restart 1)" in log
    assert "in the background" in log  # the script's default --async-save: the stop's save completed before exit
    assert f"resumed from iteration {stopped_at} ({4 * stopped_at} pairs consumed)" in log
    save = str(run_dir / "train")
    assert checkpointing.latest_iteration(save) == 30
    iterations = [json.loads(line)["iteration"] for line in open(os.path.join(save, "metrics.jsonl"))
                  if "train/loss" in line]
    assert iterations == list(range(1, 31)), "each step logged once across the two runs"
