"""Faults during training lose no work and say what happened: bad flags and unusable output folders stop the run
before any work; a changed LR schedule on resume is refused or applied as asked (Megatron-LM's rule); a signal
ends the run with a status that says whether a checkpoint was saved; a full disk during a save keeps the previous
checkpoint the latest; a non-finite gradient is never applied.

`test_trainer_faults_are_named_and_lose_nothing` is one table: each case is a command line, the exit status, the
one line it must print, and what must be left as it was. The other tests compare numbers: the skipped step's
weights and Adam state, and the resumed LR schedule against Megatron-Core's scheduler computed directly.
"""
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from orpo_megatron import evaluate, train
from orpo_megatron.checkpoint import training as checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "examples", "data", "capybara_style.jsonl")
SCHEDULE = ["--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1"]
TRAIN_ITERS = 6


def train_args(load: str, data_cache: str, *extra: str) -> list[str]:
    return ["--load", load, "--data-path", DATA, "--data-cache-dir", data_cache, "--max-length", "64",
            "--max-prompt-length", "48", "--micro-batch-size", "1", "--global-batch-size", "2", "--log-interval", "1",
            *extra]


def run_train(args: list[str], stop_after_iter: int | None = None, mount_tmpfs: str | None = None,
              copy_out: tuple[str, str] | None = None) -> subprocess.CompletedProcess:
    """The trainer at world size 1 (no torchrun, so its own exit status comes back). `stop_after_iter`: SIGTERM
    once that iteration is logged. `mount_tmpfs` "SIZE:DIR": run in a mount namespace with a tmpfs of SIZE on
    DIR ('ro' for a read-only one), whose contents `copy_out` (src, dst) copies out before it goes away."""
    command = [sys.executable, "-m", "orpo_megatron.train", *args]
    if mount_tmpfs:
        size, folder = mount_tmpfs.split(":")
        options = "ro" if size == "ro" else f"size={size}"
        script = f"mkdir -p {folder} && mount -t tmpfs -o {options} tmpfs {folder} && {subprocess.list2cmdline(command)}"
        script += f"; status=$?; cp -a {copy_out[0]} {copy_out[1]}; exit $status" if copy_out else ""
        command = ["unshare", "-rm", "sh", "-c", script]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    if stop_after_iter is not None:
        for line in proc.stdout:
            output.append(line)
            if line.startswith(f"train iter {stop_after_iter}/"):
                proc.send_signal(signal.SIGTERM)
                break
    output += proc.stdout.readlines()
    proc.wait(timeout=300)
    return subprocess.CompletedProcess(command, proc.returncode, "".join(output), "")


def namespaces_available() -> bool:
    """Whether this machine lets an unprivileged process mount a tmpfs in its own namespace (disk-full and
    read-only folders without root)."""
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1M tmpfs /mnt"], capture_output=True).returncode == 0


def folder_state(path: str) -> dict:
    """Every file under `path` with its size and modification time (what a failed run must not change)."""
    state = {}
    for root, _, files in os.walk(path):
        for name in files:
            stat = os.stat(os.path.join(root, name))
            state[os.path.relpath(os.path.join(root, name), path)] = (stat.st_size, stat.st_mtime_ns)
    return state


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture(scope="module")
def finished_run(tiny_converted, data_cache, tmp_path_factory) -> str:
    """The save folder of a finished 6-step run (world 1), saved at 6 only."""
    save = str(tmp_path_factory.mktemp("finished") / "train")
    proc = run_train(train_args(tiny_converted, data_cache, "--save", save, "--train-iters", str(TRAIN_ITERS),
                                *SCHEDULE))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert checkpointing.latest_iteration(save) == TRAIN_ITERS
    return save


@dataclasses.dataclass
class Case:
    flags: list[str]  # after the common flags; {save} {file} {ro} {finished} are filled in
    status: int
    message: str  # in the output, with the same placeholders
    stop_after_iter: int | None = None
    mount_tmpfs: str | None = None  # see run_train
    save: str = "fresh"  # "fresh": a new --save folder under the test's tmp; "finished": a copy of finished_run
    evaluate: bool = False  # the evaluator instead of the trainer
    in_process: bool = False  # only the flags are checked: parse_args in this process (argparse's exit 2)


CASES = {
    "min_lr_above_lr": Case(["--lr", "1e-4", "--min-lr", "1e-3"], 2,
                            "error: --min-lr 0.001 is above --lr 0.0001: the schedule decays from --lr to --min-lr", in_process=True),
    "log_interval_0": Case(["--log-interval", "0"], 2, "error: --log-interval must be >= 1, got 0", in_process=True),
    "negative_lr": Case(["--lr", "-0.5"], 2, "error: --lr must be >= 0, got -0.5", in_process=True),
    "both_scheduler_flags": Case(["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"], 2,
                                 "error: argument --use-checkpoint-opt_param-scheduler: not allowed with argument "
                                 "--override-opt_param-scheduler", in_process=True),
    "save_under_a_file": Case(["--save", "{file}/run"], 2, "error: --save {file}/run: {file} is a file, not a folder", in_process=True),
    "tensorboard_dir_under_a_file": Case(["--tensorboard-dir", "{file}/tb"], 2,
                                         "error: --tensorboard-dir {file}/tb: {file} is a file, not a folder",
                                         in_process=True),
    "save_read_only": Case(["--save", "{ro}/run", "--log-dir", "{save}"], 2,
                           "error: --save {ro}/run: cannot write there (Read-only file system)", mount_tmpfs="ro:{ro}"),
    "evaluate_output_under_a_file": Case(["--output", "{file}/scores.jsonl"], 2,
                                         "error: --output {file}/scores.jsonl: {file} is a file, not a folder",
                                         evaluate=True, in_process=True),
    "global_batch_not_divisible": Case(["--save", "{save}", "--micro-batch-size", "2", "--global-batch-size", "3",
                                        "--train-iters", "2"], 1,
                                       "error: --global-batch-size 3 must be a multiple of --micro-batch-size 2 x "
                                       "data-parallel size 1"),
    "resume_longer_schedule": Case(["--save", "{save}", "--train-iters", "8", *SCHEDULE], 1,
                                   "error: the LR schedule differs from the resumed checkpoint's: --lr-decay-iters "
                                   "(default: the training length) gives 8, the checkpoint has 6. Pass "
                                   "--override-opt_param-scheduler to use the flags' schedule or "
                                   "--use-checkpoint-opt_param-scheduler to keep the checkpoint's", save="finished"),
    "resume_other_decay_style": Case(["--save", "{save}", "--train-iters", "6", *SCHEDULE[:4],
                                      "--lr-decay-style", "constant", *SCHEDULE[6:]], 1,
                                     "--lr-decay-style gives constant, the checkpoint has cosine", save="finished"),
    "resume_other_seed": Case(["--save", "{save}", "--train-iters", "6", *SCHEDULE, "--seed", "7"], 1,
                              "error: cannot resume the data order: the checkpoint's seed is 1234, this run's is 7",
                              save="finished"),
    "sigterm_without_save": Case(["--train-iters", "50"], 4,
                                 "of 50 steps left; nothing saved (no --save): these steps are lost (exit status 4)",
                                 stop_after_iter=1),
    "sigterm_with_save": Case(["--save", "{save}", "--train-iters", "50"], 3,
                              ": run the same command to resume (exit status 3)",
                              stop_after_iter=1),
    "disk_full_during_save": Case(["--save", "{tmpfs}/run", "--log-dir", "{save}", "--train-iters", "2",
                                   "--save-interval", "1"], 1,
                                  "error: saving iteration 2 to {tmpfs}/run failed: no space left on device",
                                  mount_tmpfs="10M:{tmpfs}"),
}


@pytest.mark.parametrize("name", CASES)
def test_trainer_faults_are_named_and_lose_nothing(name, tiny_converted, finished_run, data_cache, tmp_path, capsys):
    case = CASES[name]
    if case.mount_tmpfs and not namespaces_available():
        pytest.skip("no unprivileged mount namespaces here (unshare -rm)")
    places = {"save": str(tmp_path / "save"), "file": str(tmp_path / "a_file"), "ro": str(tmp_path / "ro"),
              "tmpfs": str(tmp_path / "tmpfs")}
    with open(places["file"], "w") as f:
        f.write("not a folder\n")
    if case.save == "finished":
        shutil.copytree(finished_run, places["save"])
    before = folder_state(places["save"]) if os.path.isdir(places["save"]) else {}
    flags = [flag.format(**places) for flag in case.flags]
    if case.in_process:
        parse_args = (evaluate if case.evaluate else train).parse_args
        with pytest.raises(SystemExit) as exit_info:
            parse_args(["--load", tiny_converted, "--data-path", DATA, *flags])
        proc = subprocess.CompletedProcess([], exit_info.value.code, capsys.readouterr().err, "")
    else:
        copy_out = (f"{places['tmpfs']}/run", str(tmp_path / "tmpfs_copy")) if name == "disk_full_during_save" else None
        proc = run_train(train_args(tiny_converted, data_cache, *flags), case.stop_after_iter,
                         case.mount_tmpfs.format(**places) if case.mount_tmpfs else None, copy_out)
    assert proc.returncode == case.status, proc.stdout[-3000:]
    assert case.message.format(**places) in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout

    # Nothing lost.
    assert open(places["file"]).read() == "not a folder\n"
    if case.save == "finished":  # refused before the model was built: checkpoints and metrics untouched
        assert folder_state(places["save"]) == before
    if case.stop_after_iter:  # the signal lands in the step after the one logged, or the next
        stopped_at = int(re.search(r"stopped by signal at iteration (\d+); (\d+) of 50", proc.stdout).group(1))
        assert case.stop_after_iter <= stopped_at <= case.stop_after_iter + 1
        if case.save == "fresh" and "--save" in case.flags:
            assert f"saved {places['save']}/iter_{stopped_at:07d}: run the same command" in proc.stdout
            assert checkpointing.latest_iteration(places["save"]) == stopped_at
    if name == "disk_full_during_save":  # iteration 1 fit in 10 MB, iteration 2 did not
        kept = str(tmp_path / "tmpfs_copy")
        assert checkpointing.latest_iteration(kept) == 1
        assert f"{places['tmpfs']}/run/iter_0000001 stays the latest checkpoint" in proc.stdout
        assert sorted(os.listdir(kept)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]


def checkpoint_tensors(folder: str, tmp_path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (model and optimizer state), read with torch's own DCP reader."""
    target = tmp_path / (os.path.basename(folder) + ".pt")
    dcp_to_torch_save(folder, target)
    return {k: v for k, v in torch.load(target, weights_only=False).items() if isinstance(v, torch.Tensor)}


def test_skipped_nonfinite_step_leaves_weights_and_adam_state_bit_identical(tiny_converted, data_cache, tmp_path):
    # Step 1 with lr 1e30 and no clipping moves the weights to ~1e30: finite, but step 2's forward overflows, so
    # its gradient is NaN. Megatron-Core's own step (no grad scaler in bf16/fp32) would apply it.
    save = str(tmp_path / "train")
    proc = run_train(train_args(tiny_converted, data_cache, "--save", save, "--save-interval", "1",
                                "--train-iters", "2", "--lr", "1e30", "--clip-grad", "0", "--skip-nonfinite-steps", "1"))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert ("WARNING: skipped iteration 2: grad norm nan, weights and optimizer state left as they were (1/1 skips)"
            in proc.stdout)
    logged = {row["iteration"]: row for row in map(json.loads, open(os.path.join(save, "metrics.jsonl")))
              if "train/loss" in row}
    assert torch.isfinite(torch.tensor(logged[1]["train/loss"])) and torch.isnan(torch.tensor(logged[2]["train/loss"]))

    initial = checkpoint_tensors(os.path.join(tiny_converted, "release"), tmp_path)
    step1 = checkpoint_tensors(checkpointing.iteration_dir(save, 1), tmp_path)
    step2 = checkpoint_tensors(checkpointing.iteration_dir(save, 2), tmp_path)
    assert step1.keys() == step2.keys()
    assert any(key.startswith("optimizer.state.exp_avg_sq.") for key in step2)
    for key, value in step2.items():
        assert torch.isfinite(value).all(), key
        assert torch.equal(value, step1[key]), key  # weights, fp32 main params and both moments
    assert any(not torch.equal(step1[key], value) for key, value in initial.items() if key in step1), \
        "step 1 must have moved the weights"
    for iteration in (1, 2):  # Adam's step count: 1, the skipped step did not count
        common = torch.load(os.path.join(checkpointing.iteration_dir(save, iteration), "common.pt"),
                            weights_only=False)
        assert param_group_steps(common["optimizer"]) == {1}, iteration


def param_group_steps(tree) -> set:
    """The `step` of every param group anywhere in a saved optimizer state (one optimizer, or a chain)."""
    if isinstance(tree, dict):
        steps = {group["step"] for group in tree.get("param_groups", []) if "step" in group}
        return steps.union(*(param_group_steps(value) for key, value in tree.items() if key != "param_groups"))
    if isinstance(tree, (list, tuple)):
        return set().union(*(param_group_steps(value) for value in tree))
    return set()


def reference_lrs(train_iters: int, decay_iters: int, iterations: list[int]) -> list[float]:
    """The lr logged after each of `iterations` by Megatron-Core's scheduler built directly for the schedule."""
    param = torch.nn.Parameter(torch.zeros(1))
    scheduler = OptimizerParamScheduler(torch.optim.SGD([param], lr=0.0), init_lr=0.0, max_lr=1e-3, min_lr=1e-4,
                                        lr_warmup_steps=1, lr_decay_steps=decay_iters, lr_decay_style="cosine",
                                        start_wd=0.0, end_wd=0.0, wd_incr_steps=train_iters, wd_incr_style="constant")
    lrs, done = [], 0
    for iteration in iterations:
        scheduler.step(increment=iteration - done)
        done = iteration
        lrs.append(scheduler.get_lr({}))
    return lrs


@pytest.mark.parametrize("flag, decay_iters", [("--override-opt_param-scheduler", 8),
                                               ("--use-checkpoint-opt_param-scheduler", 6)])
def test_resume_with_a_longer_run_follows_the_chosen_schedule(finished_run, tiny_converted, data_cache, tmp_path,
                                                              flag, decay_iters):
    save = str(tmp_path / "train")
    shutil.copytree(finished_run, save)
    proc = run_train(train_args(tiny_converted, data_cache, "--save", save, "--train-iters", "8", *SCHEDULE, flag))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "resumed from iteration 6" in proc.stdout
    source = "the flags (--override-opt_param-scheduler)" if decay_iters == 8 else \
        "the checkpoint (--use-checkpoint-opt_param-scheduler)"
    assert (f"LR schedule from {source}: cosine, peak 0.001, min 0.0001, warmup 1 and decay over {decay_iters} steps"
            in proc.stdout)
    logged = {row["iteration"]: row["train/lr"] for row in map(json.loads, open(os.path.join(save, "metrics.jsonl")))
              if "train/lr" in row}
    expected = reference_lrs(8, decay_iters, [7, 8])
    assert [logged[7], logged[8]] == pytest.approx(expected, rel=1e-12)
    if decay_iters == 8:
        assert expected[0] > 1e-4 * 1.01, "a fresh 8-step schedule has not reached --min-lr at step 7"
    else:
        assert expected == pytest.approx([1e-4, 1e-4])  # the 6-step schedule ended at --min-lr
    config = json.load(open(os.path.join(save, "run_config.json")))["config"]
    assert (config["lr_decay_iters"], config["lr_decay_style"], config["lr"]) == (decay_iters, "cosine", 1e-3)
