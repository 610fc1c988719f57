"""A stopped run leaves a checkpoint that resumes: SIGTERM saves and exits cleanly, SIGKILL during a save never
leaves the `latest` pointer naming an unfinished iteration.

One scenario, three launches of the same command (torchrun, 2 ranks, EP2 x DP2, 12 steps, a save every 2):
1. SIGTERM to rank 1 only, after step 3: every rank finishes the step, the run saves and exits non-zero (3 on
   every rank, "stopped early, checkpoint saved"; torchrun reports a non-zero worker as its own 1).
2. The same command resumes from it; SIGKILL to the whole process group as soon as a `.iter_*.partial` folder
   appears, i.e. inside a save.
3. The same command with `--async-save` resumes from the newest complete iteration; SIGKILL to every process
   (the background writers too) as soon as its first save is being written in the background: the pointer still
   names the iteration it resumed from, which stays complete.
4. The same command (`--async-save`) resumes from it and finishes, its last save complete.
"""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import free_port
from orpo_megatron.checkpoint import format as checkpoint_format
from orpo_megatron.checkpoint import weights as checkpoint_weights
from orpo_megatron.checkpoint import training as checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "examples", "data", "capybara_style.jsonl")
TRAIN_ITERS = 12


@pytest.fixture(scope="module")
def converted(tiny_converted) -> str:
    return tiny_converted


def start_run(converted: str, save: str, data_cache: str, *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "orpo_megatron.train", "--load", converted, "--save", save, "--data-path", DATA,
           "--data-cache-dir", data_cache, "--max-length", "64", "--max-prompt-length", "48",
           "--micro-batch-size", "1", "--global-batch-size", "4", "--expert-model-parallel-size", "2",
           "--train-iters", str(TRAIN_ITERS), "--save-interval", "2", "--log-interval", "1", "--lr", "1e-4", *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def worker_pids(launcher_pid: int, world_size: int = 2) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (each in its own session, so a process-group kill misses them)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ranks = _ranks_of_children(launcher_pid)
        if len(ranks) == world_size:
            return ranks
        time.sleep(0.1)
    raise AssertionError(f"torchrun (pid {launcher_pid}) did not start {world_size} workers")


def _children(pid: int) -> list[int]:
    children = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(child) for child in f.read().split()]
    except FileNotFoundError:  # it (or a thread) has just exited
        pass
    return children


def descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        for child in _children(stack.pop()):
            found.append(child)
            stack.append(child)
    return found


def kill_all(launcher_pid: int) -> None:
    """SIGKILL torchrun, its workers and the processes they fork (the checkpoint writers), as a node failure would."""
    for pid in [*descendants(launcher_pid), launcher_pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _ranks_of_children(launcher_pid: int) -> dict[int, int]:
    ranks = {}
    for pid in _children(launcher_pid):
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        rank = [entry.split(b"=", 1)[1] for entry in environ if entry.startswith(b"RANK=")]
        if rank:
            ranks[int(rank[0])] = pid
    return ranks


def assert_complete(save: str, iteration: int) -> None:
    folder = checkpointing.iteration_dir(save, iteration)
    assert os.path.isfile(os.path.join(folder, "metadata.json"))  # megatron-core writes it last
    assert checkpoint_format.read_common(folder)["iteration"] == iteration
    assert json.load(open(os.path.join(folder, checkpointing.TRAIN_STATE_FILE)))["iteration"] == iteration
    stored = checkpoint_weights.stored_tensors(folder)
    assert "optimizer.state.exp_avg.decoder.layers.mlp.experts.experts.linear_fc1.weight" in stored


def test_sigterm_saves_and_exits_and_a_kill_during_save_keeps_latest_complete(converted, tmp_path):
    save, data_cache = str(tmp_path / "train"), str(tmp_path / "data_cache")

    # 1. SIGTERM to one rank after step 3.
    run = start_run(converted, save, data_cache)
    output = []
    for line in run.stdout:
        output.append(line)
        if line.startswith("train iter 3/"):
            os.kill(worker_pids(run.pid)[1], signal.SIGTERM)
            break
    output += run.stdout.readlines()
    log = "".join(output)
    assert run.wait(timeout=300) != 0, log[-4000:]
    assert "exitcode  : 3 " in log, log[-4000:]  # torchrun's failure report of each worker
    stopped = re.search(r"stopped by signal at iteration (\d+); .*: run the same command to resume \(exit status 3\)",
                        log)
    assert stopped, log[-4000:]
    stopped_at = int(stopped.group(1))
    assert 3 <= stopped_at < TRAIN_ITERS
    assert checkpointing.latest_iteration(save) == stopped_at
    assert_complete(save, stopped_at)
    assert not [name for name in os.listdir(save) if name.endswith(".partial")]

    # 2. The same command resumes; SIGKILL everything while a later iteration is being written.
    run = start_run(converted, save, data_cache)
    worker_pids(run.pid)  # both workers have started
    partial = None
    deadline = time.monotonic() + 300
    while partial is None and run.poll() is None and time.monotonic() < deadline:
        partial = next((name for name in os.listdir(save) if name.startswith(".iter_") and name.endswith(".partial")),
                       None)
        if partial is None:
            time.sleep(0.002)
    kill_all(run.pid)
    log = run.stdout.read()
    run.wait(timeout=60)
    assert partial is not None, f"no save started before the run ended\n{log[-4000:]}"
    assert f"resumed from iteration {stopped_at}" in log, log[-4000:]
    killed_in = int(partial[len(".iter_"):-len(".partial")])
    assert os.path.isdir(os.path.join(save, partial)), "the kill landed after the save finished"
    latest = checkpointing.latest_iteration(save)
    assert stopped_at <= latest < killed_in
    assert_complete(save, latest)
    assert checkpointing.resolve(save).folder == checkpointing.iteration_dir(save, latest)

    # 3. With --async-save: SIGKILL everything while the first save is written in the background.
    run = start_run(converted, save, data_cache, "--async-save")
    output = []
    for line in run.stdout:
        output.append(line)
        if re.match(r"saving checkpoint .* in the background", line):
            kill_all(run.pid)
            break
    output += run.stdout.readlines()
    run.wait(timeout=60)
    log = "".join(output)
    in_flight = re.search(r"saving checkpoint .*iter_(\d+) in the background", log)
    assert in_flight and f"resumed from iteration {latest}" in log, log[-4000:]
    assert os.path.isdir(os.path.join(save, f".iter_{int(in_flight.group(1)):07d}.partial"))
    assert checkpointing.latest_iteration(save) == latest
    assert_complete(save, latest)

    # 4. The same command resumes from it and finishes.
    run = start_run(converted, save, data_cache, "--async-save")
    log = run.communicate(timeout=300)[0]
    assert run.returncode == 0, log[-4000:]
    assert f"resumed from iteration {latest}" in log, log[-4000:]
    assert checkpointing.latest_iteration(save) == TRAIN_ITERS
    assert_complete(save, TRAIN_ITERS)
    assert not [name for name in os.listdir(save) if name.endswith(".partial")]
