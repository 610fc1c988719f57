"""GPU acceptance: one command on a machine with an NVIDIA GPU, one table of what works there and how fast.

    python acceptance/gpu.py              # one or more GPUs, no internet; under 10 minutes
    python acceptance/gpu.py --dry-run    # CPU: the same code at tiny sizes (CI runs this)

It first prints how to run it on a machine without internet (`HOW_TO_RUN`, also in --help). Needs this
repository's requirements; transformers for the parity lines, transformer-engine for the TE, FP8 and
fused-kernel lines. A line whose piece is missing says "skipped: why", never a fake pass; a failed check says
FAIL with the error, and the command exits 1. The lines, most important first, with the time each check is
estimated to take on an H200 (a check starts only if its estimate fits in what is left of --budget-minutes, and
every wait ends at that deadline: a check that overruns says FAIL "did not finish in time", the later ones say
"skipped: time budget", and the table is printed within the budget):
(a) parity, ~30 s: forward and backward of the tiny Mixtral against transformers' Mixtral, fp32 and bf16, on the
    local spec and (with TE) the TE spec: per-sequence completion log-probs and the gradients of the embedding
    and output weights;
(b) trainer, ~90 s: for each optimizer mode (Adam; offloaded, the examples' partial fraction and the flag's
    default 1.0; precision-aware), a bf16 run from a converted checkpoint at lr 1e-9 keeps the loaded weights
    (held-out loss unchanged after a step), and a run saved at step 2 resumes to the same losses at steps 3-6
    (its optimizer state through the reshardable checkpoint; a lost step count shows from step 5 on; the saving
    run writes with --async-save, so its state copied to host while training went on is what resumes);
(c) packing, ~30 s: the trainer's first step on the tiny Mixtral in bf16 on the machine's spec: every tensor the
    model and the loss read is on the GPU after the move and a packed forward/backward runs there; packed equals
    --no-packing on the same pairs (on TE: THD attention, fused THD RoPE); no host sync from orpo_megatron/ in
    its forward/backward (megatron-core's own are listed); a packed FP8 hybrid pass raises no TE divisibility
    assertion;
(d) checkpoints, ~35 s: the TE spec, with grouped-GEMM and with sequential experts, saves the local spec's tensor
    and `_extra_state` keys; a save on each spec loads on each other one with the same weights and logits; TE's
    delayed-scaling FP8 state (amax histories, scales) comes back from a save through a load;
(e) memory, ~30 s: for each optimizer mode, the GPU bytes the optimizer really allocates (CUDA allocator, after
    its first step) against `memory_estimate`'s figure, on a 4-layer Mixtral-shaped model; with offload, its
    host params are pinned;
(f) throughput, ~90 s: tokens/s and MFU of two Mixtral-8x22B-shaped layers (real hidden size, heads, experts,
    FFN; bf16; one pair of 2048-token sequences per micro-batch, 2 micro-batches; forward, backward and the
    data-parallel communication, not the optimizer's arithmetic), with every fused kernel on, then each one off
    (on/off ratio), and the DP communication overlaps on/off (with 2+ GPUs; one GPU has none);
(g) FP8, ~135 s (TE, compute capability 8.9+): for each recipe, steps, a save and a resume that continues with the
    saved FP8 scaling state; the evaluator with --fp8-format.
The work behind (a) and (c)-(f) runs in `workers.py`, a process per section; on the tiny model a
process is mostly start-up, so the workers of (a), (c) and (d) start together at the beginning and independent
trainer runs start together (never beside (e) or (f), which measure). Adding a line: write a function that yields
`Line`s (raise `Skip("why")` for a missing piece) and decorate it with `@check(section, seconds)`; checks run in
the order they are defined, and their processes' output is in WORK/logs/ (kept with --work-dir).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Iterator

ACCEPTANCE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(ACCEPTANCE)
sys.path.insert(0, REPO)

import torch  # noqa: E402

from acceptance.workers import (  # noqa: E402
    DATA,
    OFFLOAD,
    PACKED_GRAD_TOL,
    PACKED_METRIC_TOL,
    SHAPES,
    data_cache,
    fixture,
    fp8_unavailable,
)

WORKERS = os.path.join(ACCEPTANCE, "workers.py")
# What a machine without internet needs carried (the versions CI runs); its image has the rest of their needs.
WHEELS = ["megatron-core==0.16.1", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19"]
HOW_TO_RUN = f"""\
How to run this on a lent GPU machine without internet (one NVIDIA GPU; Python 3.12 with torch, transformers and
sentencepiece installed). megatron-core and datasets travel as wheels; Transformer Engine cannot, so its lines
say "skipped" there.
  1. Here, in the repository root (pip reaches PyPI here), once:
       echo /.whl/ >> .git/info/exclude
       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
         --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \\
         -d .whl {' '.join(WHEELS)}
  2. There, from the repository root (device tool: run with carry [".whl"] and timeout_s 600):
       python3 -m pip install -q --no-index --find-links .whl --no-deps --target /tmp/site \\
         {' '.join(WHEELS)} && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 \\
         python3 acceptance/gpu.py 2>&1 | tee $OUT/acceptance.log
     (datasets 5.2.0 needs pyarrow >= 24: if `python3 -m pip show pyarrow` there says older, add its wheel.)
"""
OPTIMIZER_MODES = {
    "adam": [],
    "offload 0.5": OFFLOAD,
    "offload 1.0": ["--use-precision-aware-optimizer", "--optimizer-cpu-offload"],  # the fraction's default
    "precision-aware": ["--use-precision-aware-optimizer"],
}
# A bf16 run at lr 1e-9 for one step, evaluated before and after it.
KEEP_WEIGHTS = ["--bf16", "--lr", "1e-9", "--train-iters", "1", "--eval-fraction", "0.1", "--eval-interval", "1",
                "--eval-iters", "4"]
# Tolerances. Per-sequence mean completion log-prob (nats/token): fp32 like the CPU tests; bf16 within 0.02 of
# transformers' bf16 model and no further from the fp32 truth than twice transformers' own bf16 run. Gradient
# cosine similarity to transformers'. Losses of a resumed run against the straight run: bit-exact on CPU; GPU
# kernels may reorder reductions, so 1e-4 there (a lost optimizer or FP8 state moves them far more). A model
# loaded from another spec's save against the same spec loaded from the converted checkpoint: the weights
# bitwise, the bf16 logits within 1% of their largest (the same kernels on the same weights; a misplaced
# tensor moves them by its whole size).
FP32_LOGP, BF16_LOGP, BF16_VS_FP32_FACTOR = 1e-4, 0.02, 2.0
FP32_GRAD_COSINE, BF16_GRAD_COSINE = 0.9999, 0.99
UNCHANGED_LOSS = 1e-5
RESUME_LOSS = {"cpu": 1e-6, "cuda": 1e-4}
# A run resumed from its step-2 save is compared on 4 steps: an optimizer state loaded wrong in a way that keeps the
# first steps right (a step count stuck at its loaded value: bias correction) shows from step 5 on.
RESUMED_STEPS = range(3, 7)
CROSS_LOAD_LOGITS = 1e-2
# Workers of checks on the tiny model that neither time anything nor measure memory: they start together with
# the first check (a machine runs them side by side in well under their sum), their checks collect them.
EARLY_WORKERS = ("parity", "packing", "checkpoints")


# ------------------------------------------------------------------------------------------- the table
@dataclasses.dataclass
class Line:
    check: str
    result: str  # "pass", "FAIL: ...", "skipped: ...", or a figure
    detail: str = ""


class Skip(Exception):
    """A check whose piece is missing here; the message says which."""


CHECKS: list[tuple[str, Callable, float]] = []
# What a check's budget is made of, in seconds on an H200 (16 cores). A process on the tiny model starts in about
# 20 s (Python, torch and megatron-core imports, CUDA and NCCL, the model, the data), then does its section's work;
# trainer runs started together (a wave, up to 8 on 16 cores) end together: start, load, 6 steps, 3 saves and
# evaluations. A check starts only if its budget fits in what is left before the deadline, and every wait in it
# ends at the deadline, so the table is always printed.
TINY_PROCESS_SECONDS = 30
TRAINER_WAVE_SECONDS = 45


def check(section: str, seconds: float):
    """Register a check; `seconds`: its estimated time on an H200."""
    def register(fn):
        CHECKS.append((section, fn, seconds))
        return fn
    return register


@dataclasses.dataclass
class Machine:
    dry_run: bool
    work: str
    cuda: bool
    gpus: int
    device_name: str
    capability: tuple[int, int] | None
    transformer_engine: str | None
    transformers: bool
    deadline: float
    running: dict = dataclasses.field(default_factory=dict)  # worker name -> its process, started early

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    def need_cuda(self) -> None:
        if not self.cuda:
            raise Skip("no CUDA device")

    def without_transformer_engine(self) -> str | None:
        """Why the TE spec cannot run here (None: it can)."""
        if not self.cuda:
            return "no CUDA device"
        if not self.transformer_engine:
            return "transformer-engine not installed (pip install 'orpo-megatron[te]')"
        return None

    def without_fp8(self) -> str | None:
        """Why FP8 cannot run here (None: it can)."""
        return self.without_transformer_engine() or fp8_unavailable()


# ------------------------------------------------------------------------------------------ helpers
@dataclasses.dataclass
class Started:
    """A command running in the background, its output going to WORK/logs/NAME.log."""

    command: list[str]
    log: str
    process: subprocess.Popen

    @classmethod
    def start(cls, machine: Machine, name: str, command: list[str]) -> Started:
        logs = os.path.join(machine.work, "logs")
        os.makedirs(logs, exist_ok=True)
        with open(os.path.join(logs, f"{name}.log"), "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
        return cls(command, log.name, process)

    def finish(self, deadline: float) -> Exception | None:
        """Wait for it until `deadline` (then kill it); None, or what went wrong with the end of its output."""
        try:
            self.process.wait(timeout=max(0.0, deadline - time.time()))
            problem = f"exited {self.process.returncode}" if self.process.returncode else None
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            problem = "did not finish in time"
        if not problem:
            return None
        with open(self.log) as f:
            tail = f.read().strip().splitlines()[-3:]
        return RuntimeError(f"{' '.join(self.command[:4])} ... {problem}: " + " | ".join(tail))


def run_all(machine: Machine, commands: dict[str, list[str]]) -> dict[str, Exception | None]:
    """Run the commands at once, until the command's deadline at most; for each, None or what went wrong."""
    started = {name: Started.start(machine, name, command) for name, command in commands.items()}
    return {name: process.finish(machine.deadline) for name, process in started.items()}


def run_one(machine: Machine, name: str, command: list[str]) -> None:
    error = run_all(machine, {name: command})[name]
    if error:
        raise error


def start_worker(machine: Machine, name: str, *flags: str, launcher: tuple[str, ...] = (sys.executable,)) -> None:
    """Start one of `workers.py`'s workers in the background (its report: WORK/NAME.json)."""
    command = [*launcher, WORKERS, name, "--out", os.path.join(machine.work, f"{name}.json"), "--work", machine.work,
               *flags]
    machine.running[name] = Started.start(machine, name, command)


def worker(machine: Machine, name: str, *flags: str, launcher: tuple[str, ...] = (sys.executable,)) -> dict:
    """The report of one of the workers: started early (`EARLY_WORKERS`), or now, alone."""
    if name not in machine.running:
        stop_early_workers(machine)  # only those of checks skipped for time are left: no competition while it runs
        start_worker(machine, name, *flags, launcher=launcher)
    error = machine.running.pop(name).finish(machine.deadline)
    if error:
        raise error
    with open(os.path.join(machine.work, f"{name}.json")) as f:
        return json.load(f)


def stop_early_workers(machine: Machine) -> None:
    for started in machine.running.values():
        started.process.kill()
        started.process.wait()
    machine.running.clear()


def failure(error: Exception | str) -> str:
    return f"FAIL: {error}"[:300]


def unfinished(name: str, part: dict, skip_reason: str | None = None, detail: str = "") -> Line | None:
    """The line of a worker's part that raised ("error", FAIL with where) or could not run here ("skipped": why,
    or `skip_reason`); None when it ran and its figures are to be judged."""
    if "error" in part:
        return Line(name, failure(part["error"]), part["where"])
    if "skipped" in part:
        return Line(name, f"skipped: {skip_reason or part['skipped']}", detail)
    return None


def train_all(machine: Machine, runs: dict[str, list[str]]) -> dict[str, dict | Exception]:
    """Trainer runs from the converted bf16 checkpoint (one process each, the GPU's defaults), all at once. Run
    NAME saves to WORK/NAME; its result is its logged events by (iteration, kind), or what went wrong."""
    commands = {name: [sys.executable, "-m", "orpo_megatron.train", "--load", fixture(machine.work, "bf16"),
                       "--save", os.path.join(machine.work, name), "--data-path", DATA,
                       "--data-cache-dir", data_cache(machine.work), *SHAPES,
                       "--global-batch-size", "4", "--log-interval", "1", *flags] for name, flags in runs.items()}
    outcomes = run_all(machine, commands)
    return {name: error or logged_events(os.path.join(machine.work, name)) for name, error in outcomes.items()}


def logged_events(save: str) -> dict:
    events = {}
    with open(os.path.join(save, "metrics.jsonl")) as f:
        for row in map(json.loads, f):
            kind = "eval" if "eval/loss" in row else "train" if "train/loss" in row else None
            if kind:
                events[row["iteration"], kind] = row
    return events


def resume_runs(machine: Machine, variants: dict[str, list[str]], alongside: dict[str, list[str]] | None = None
                ) -> tuple[dict[str, float | Exception], dict[str, dict | Exception]]:
    """For each variant (name -> flags): a straight bf16 run that saves at step 2 (in the background), and a run
    resumed from that save; the largest |loss| difference of `RESUMED_STEPS` between them, or what went wrong. The straight runs
    and `alongside`'s runs start together, then the resumed ones. Returns (differences, alongside's events)."""
    from orpo_megatron.checkpoint import format as checkpoint_format
    from orpo_megatron.checkpoint import training as checkpointing

    common = ["--bf16", "--lr", "1e-3", "--lr-warmup-iters", "1", "--train-iters", str(RESUMED_STEPS[-1]),
              "--save-interval", "2"]
    first = train_all(machine, {**{f"{name}-straight": [*common, *flags, "--async-save"]
                                   for name, flags in variants.items()},
                                **(alongside or {})})
    resumed = {}
    for name, flags in variants.items():
        if isinstance(first[f"{name}-straight"], Exception):
            continue
        straight, again = (os.path.join(machine.work, f"{name}-{kind}") for kind in ("straight", "resumed"))
        os.makedirs(again)
        shutil.copytree(checkpointing.iteration_dir(straight, 2), checkpointing.iteration_dir(again, 2))
        checkpoint_format.write_tracker(again, 2)
        resumed[f"{name}-resumed"] = [*common, *flags]
    second = train_all(machine, resumed)
    differences = {}
    for name in variants:
        expected, got = first[f"{name}-straight"], second.get(f"{name}-resumed")
        if isinstance(expected, Exception) or isinstance(got, Exception):
            differences[name] = expected if isinstance(expected, Exception) else got
        elif {i for i, kind in got if kind == "train"} != set(RESUMED_STEPS):
            differences[name] = RuntimeError(f"the resumed run logged steps {sorted(got)}, not {list(RESUMED_STEPS)}")
        else:
            differences[name] = max(abs(got[i, "train"]["train/loss"] - expected[i, "train"]["train/loss"])
                                    for i in RESUMED_STEPS)
    return differences, {name: first[name] for name in alongside or {}}


def resume_line(name: str, difference: float | Exception, tolerance: float) -> Line:
    if isinstance(difference, Exception):
        return Line(name, failure(difference))
    return Line(name, "pass" if difference <= tolerance else "FAIL: resumed losses differ",
                f"steps {RESUMED_STEPS[0]}-{RESUMED_STEPS[-1]} loss max |diff| {difference:.2e} "
                f"(tolerance {tolerance:g})")


# ---------------------------------------------------------------------------------------- the checks
@check("machine", seconds=0)
def machine_line(machine: Machine) -> Iterator[Line]:
    capability = ".".join(map(str, machine.capability)) if machine.capability else "-"
    yield Line("device", f"{machine.gpus} x {machine.device_name}" if machine.cuda else "CPU (no CUDA device)",
               f"compute capability {capability}; torch {torch.__version__}; transformer-engine "
               f"{machine.transformer_engine or 'not installed'}" + ("; DRY RUN (tiny sizes)" if machine.dry_run else ""))


@check("(a) parity", seconds=TINY_PROCESS_SECONDS)
def parity(machine: Machine) -> Iterator[Line]:
    if not machine.transformers:
        raise Skip("transformers not installed (the reference)")
    report = worker(machine, "parity")
    for spec in ("local", "te"):
        for dtype in ("fp32", "bf16"):
            name = f"{spec} spec, {dtype}"
            if spec == "te" and machine.without_transformer_engine():
                yield Line(name, f"skipped: {machine.without_transformer_engine()}")
                continue
            r = report[f"{spec}/{dtype}"]
            detail = (f"log-prob max |diff| {r['logp_vs_same_dtype']:.2e} (vs transformers {dtype}), "
                      f"{r['logp_vs_fp32']:.2e} (vs fp32; transformers' own bf16: {r['reference_bf16_vs_fp32']:.2e}); "
                      f"grad cosine embedding {r['cos_embedding']:.6f}, output {r['cos_output']:.6f}")
            if dtype == "fp32":
                ok = (r["logp_vs_same_dtype"] <= FP32_LOGP and min(r["cos_embedding"], r["cos_output"]) >= FP32_GRAD_COSINE)
            else:
                ok = (r["logp_vs_same_dtype"] <= BF16_LOGP
                      and r["logp_vs_fp32"] <= BF16_VS_FP32_FACTOR * r["reference_bf16_vs_fp32"]
                      and min(r["cos_embedding"], r["cos_output"]) >= BF16_GRAD_COSINE)
            yield Line(name, "pass" if ok else "FAIL: outside the stated tolerances", detail)


@check("(b) trainer", seconds=2 * TRAINER_WAVE_SECONDS)  # straight and keep-weights runs, then the resumed ones
def trainer_modes(machine: Machine) -> Iterator[Line]:
    skipped = {}
    for mode in OPTIMIZER_MODES:
        if mode == "precision-aware" and machine.without_transformer_engine():
            reason = machine.without_transformer_engine()
            skipped[mode] = f"{reason} (TE's FusedAdam)", reason
        elif machine.dry_run and mode != "adam":
            skipped[mode] = ("dry run (tests/test_bf16.py runs the offloaded optimizer, fraction 0.5, on CPU)",) * 2
    runs = {mode.replace(" ", "-"): flags for mode, flags in OPTIMIZER_MODES.items() if mode not in skipped}
    differences, kept = resume_runs(machine, {f"resume-{run}": flags for run, flags in runs.items()},
                                    {f"keep-{run}": [*KEEP_WEIGHTS, *flags] for run, flags in runs.items()})
    for mode in OPTIMIZER_MODES:
        keep_name, resume_name = f"{mode}: bf16 keeps loaded weights", f"{mode}: save + exact resume"
        if mode in skipped:
            yield Line(keep_name, f"skipped: {skipped[mode][0]}")
            yield Line(resume_name, f"skipped: {skipped[mode][1]}")
            continue
        events = kept[f"keep-{mode.replace(' ', '-')}"]
        if isinstance(events, Exception):
            yield Line(keep_name, failure(events))
        else:
            before, after = events[0, "eval"]["eval/loss"], events[1, "eval"]["eval/loss"]
            yield Line(keep_name, "pass" if abs(after - before) <= UNCHANGED_LOSS else
                       "FAIL: the held-out loss moved at lr 1e-9",
                       f"held-out loss {before:.6f} -> {after:.6f} after a step")
        yield resume_line(resume_name, differences[f"resume-{mode.replace(' ', '-')}"], RESUME_LOSS[machine.device])


@check("(c) packing", seconds=TINY_PROCESS_SECONDS)
def packing(machine: Machine) -> Iterator[Line]:
    report = worker(machine, "packing")
    yield batches_on_device(machine, report)
    yield packed_equals_padded(machine, report)
    yield no_host_sync_from_us(report["host_syncs"])
    yield packed_fp8_pass(report["fp8"])


def batches_on_device(machine: Machine, report: dict) -> Line:
    name, placement, compared = "batches on the device", report["placement"], report["packed_vs_padded"]
    if line := unfinished(name, placement):
        return line
    if placement["unlisted"]:
        return Line(name, f"FAIL: tensor fields DEVICE_FIELDS leaves out: {placement['unlisted']}")
    if not machine.cuda:
        return Line(name, "skipped: no CUDA device (on CPU micro-batches stay on the host)",
                    f"DEVICE_FIELDS lists every tensor field but row_index: {len(placement['devices'])} moved")
    on_host = sorted(field for field, devices in placement["devices"].items()
                     if any(not device.startswith("cuda") for device in devices))
    if on_host:
        return Line(name, f"FAIL: still on the host after to_device: {on_host}")
    if line := unfinished(name, compared):
        return line
    return Line(name, "pass", f"all {len(placement['devices'])} DEVICE_FIELDS on cuda after to_device; a packed "
                f"forward/backward ran on {compared['device']} ({report['spec']} spec), loss {compared['loss']:.4f}")


def packed_equals_padded(machine: Machine, report: dict) -> Line:
    name, compared, spec = "packed = --no-packing (same pairs)", report["packed_vs_padded"], report["spec"]
    if line := unfinished(name, compared):
        return line
    metric_tol, grad_tol = PACKED_METRIC_TOL[machine.device], PACKED_GRAD_TOL[machine.device]
    ok = compared["metric_difference"] <= metric_tol and compared["grad_difference"] <= grad_tol
    kernels = " (THD attention, fused THD RoPE)" if spec == "TE" else ""
    return Line(name, "pass" if ok else "FAIL: packed and padded differ",
                f"{spec} spec{kernels}, bf16: worst metric {compared['metric']} {compared['metric_difference']:.1e} "
                f"(tolerance {metric_tol:g}), worst gradient {compared['grad']} "
                f"{compared['grad_difference']:.1e} (of its largest entry; tolerance {grad_tol:g}); "
                f"{len(compared['packed_rows'])} packed rows against {len(compared['padded_rows'])} micro-batches "
                f"of {compared['padded_rows'][0][0]} padded rows")


def no_host_sync_from_us(syncs: dict) -> Line:
    name = "no host sync from orpo_megatron/"
    if line := unfinished(name, syncs, syncs.get("skipped", "") + " (host syncs are CUDA's)"):
        return line
    if not syncs.pop("planted_sync_seen"):
        return Line(name, "FAIL: the detector missed a planted .item() (torch.cuda.set_sync_debug_mode)")
    if not syncs.pop("planted_backward_sync_seen"):
        return Line(name, "FAIL: the backward detector missed an .item() planted in orpo_megatron's backward")
    in_backward = syncs.pop("backward_sync")
    if in_backward:
        return Line(name, "FAIL: a sync in orpo_megatron's autograd backward", in_backward)

    def listed(places: dict) -> str:
        shown = ", ".join(f"{place} x{count}" for place, count in list(places.items())[:3])
        return shown + (", ..." if len(places) > 3 else "")

    others = "; ".join(f"{owner}: {sum(places.values())} ({listed(places)})" for owner, places in syncs.items()
                       if owner != "orpo_megatron" and places) or "none from megatron-core or transformer-engine either"
    ours = syncs["orpo_megatron"]
    if ours:
        return Line(name, f"FAIL: {sum(ours.values())} from orpo_megatron/", f"orpo_megatron: {listed(ours)}; {others}")
    return Line(name, "pass", f"in a training step's forward/backward, orpo_megatron's autograd backward under "
                f"sync debug mode 'error' (a planted sync there raised); {others}")


def packed_fp8_pass(fp8: dict) -> Line:
    name = "packed FP8 hybrid pass (rows to 16)"
    if "rows" not in fp8:
        return unfinished(name, fp8)
    rows, multiple = fp8["rows"], fp8["multiple"]
    padded = sum(length > real for length, real in rows)
    shapes = (f"rows {', '.join(f'{length} ({real} real)' for length, real in rows)}: {padded} of {len(rows)} "
              f"padded to a multiple of {multiple}")
    if any(length % multiple or real > length for length, real in rows):
        return Line(name, f"FAIL: rows not a multiple of {multiple}", shapes)
    if line := unfinished(name, fp8, detail=f"the trainer's FP8 rows, built here: {shapes}"):
        return line
    return Line(name, "pass" if math.isfinite(fp8["loss"]) else "FAIL: loss not finite",
                f"{shapes}; forward/backward on the TE spec, loss {fp8['loss']:.4f}")


@check("(d) checkpoints", seconds=TINY_PROCESS_SECONDS + 5)  # + a save and loads per spec
def checkpoints(machine: Machine) -> Iterator[Line]:
    report = worker(machine, "checkpoints")
    yield te_keys_equal_local(machine, report["keys"])
    yield loads_across_specs(machine, report)
    yield fp8_state_restored(report["fp8_state"])


def te_keys_equal_local(machine: Machine, keys: dict) -> Line:
    name = "TE spec keys = local spec keys"
    counts = "; ".join(f"{spec}: {r['tensors']} tensors, {r['objects']} objects ({r['extra_state_objects']} "
                       "_extra_state)" for spec, r in keys.items() if isinstance(r, dict))
    if line := unfinished(name, keys, machine.without_transformer_engine(), counts):
        return line
    differing = {spec: r["differing"] for spec, r in keys.items() if r["differing"]}
    if differing:
        return Line(name, f"FAIL: {', '.join(differing)} differ", f"differing (first): {differing}")
    return Line(name, "pass", f"the same tensors (key, shape, offset) and objects; {counts}")


def loads_across_specs(machine: Machine, report: dict) -> Line:
    name, cross = "saved on one spec, loaded on another", report["cross_load"]
    if line := unfinished(name, cross):
        return line
    loads = "; ".join(f"{load['saved_on']} -> {load['loaded_on']}: logits {load['logits_difference']:.1e}"
                      for load in cross["loads"])
    wrong = [load for load in cross["loads"]
             if load["weights_differing"] or load["logits_difference"] > CROSS_LOAD_LOGITS]
    if wrong:
        return Line(name, f"FAIL: {wrong[0]['saved_on']} -> {wrong[0]['loaded_on']} loads other weights",
                    f"weights differing: {wrong[0]['weights_differing']}; {loads}")
    if len(report["specs"]) == 1:
        return Line(name, f"skipped: {machine.without_transformer_engine()} (one spec)",
                    f"local -> local ran: weights bitwise equal, {loads}")
    apart = "; ".join(f"{pair}: {difference:.1e}" for pair, difference in cross["specs_apart"].items())
    return Line(name, "pass", f"weights bitwise equal, logits (relative to their largest, tolerance "
                f"{CROSS_LOAD_LOGITS:g}) {loads}; the specs' own logits apart: {apart}")


def fp8_state_restored(state: dict) -> Line:
    name = "FP8 delayed: fp8_meta back after a load"
    if line := unfinished(name, state):
        return line
    if state["differing"] or state["unexpected"] or not state["nonzero_histories"]:
        what = "it differs" if state["nonzero_histories"] else "nothing to compare (no non-zero amax history)"
        return Line(name, f"FAIL: {what}", f"differing: {state['differing']}; unexpected: {state['unexpected']}")
    return Line(name, "pass", f"amax histories and scales of {state['modules']} TE modules ({state['tensors']} "
                f"tensors, {state['nonzero_histories']} non-zero histories) bitwise equal after save + load")


@check("(e) memory", seconds=TINY_PROCESS_SECONDS)
def optimizer_memory(machine: Machine) -> Iterator[Line]:
    machine.need_cuda()
    for mode, r in worker(machine, "memory").items():
        if isinstance(r, str):
            yield Line(f"{mode}: optimizer GPU bytes", f"skipped: {r}")
            continue
        ok = abs(r["real"] - r["estimate"]) <= r["tolerance"]
        yield Line(f"{mode}: optimizer GPU bytes", "pass" if ok else "FAIL: the estimate is off",
                   f"allocated {r['real'] / 2**20:,.1f} MiB, estimated {r['estimate'] / 2**20:,.1f} MiB "
                   f"(tolerance {r['tolerance'] / 2**20:,.1f} MiB)")
        if r.get("host_params"):  # megatron-core leaves them pageable; `optimizer.pin_host_copies` pins them
            yield Line(f"{mode}: host params pinned", "pass" if r["host_params_pinned"] == r["host_params"]
                       else "FAIL: pageable host params", f"{r['host_params_pinned']} of {r['host_params']} pinned")


@check("(f) throughput", seconds=90)
def throughput_lines(machine: Machine) -> Iterator[Line]:
    nproc = 2 if machine.dry_run else machine.gpus  # the dry run exercises the DP > 1 lines with 2 CPU processes
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}")
    report = worker(machine, "throughput", *(["--dry-run"] if machine.dry_run else []), launcher=torchrun)
    base = report["all on"]
    shape = report["shape"]
    mfu = f", MFU {base['mfu']:.1%}" if base["mfu"] is not None else ", MFU: no peak known for this device"
    yield Line("2 Mixtral-8x22B layers", f"{base['tokens_per_second']:,.0f} tok/s",
               f"{shape}; {report['spec']} spec, bf16, DP={report['dp']}, all kernels on{mfu}; "
               f"{base['seconds']:.3f} s/step")
    for name in report["toggles"]:
        off = report.get(f"{name} off")
        if isinstance(off, str):
            yield Line(f"{name} on/off", f"skipped: {off}")
            continue
        ratio = base["tokens_per_second"] / off["tokens_per_second"]
        yield Line(f"{name} on/off", f"{ratio:.2f}x",
                   f"on {base['tokens_per_second']:,.0f} tok/s, off {off['tokens_per_second']:,.0f} tok/s")


@check("(g) FP8", seconds=3 * TRAINER_WAVE_SECONDS)  # straight runs, resumed runs, the evaluator
def fp8(machine: Machine) -> Iterator[Line]:
    recipes = ("delayed", "tensorwise")
    evaluator = "evaluator with --fp8-format"
    if machine.without_fp8():
        for recipe in recipes:
            yield Line(f"{recipe}: steps, save, resume with FP8 state", f"skipped: {machine.without_fp8()}")
        yield Line(evaluator, f"skipped: {machine.without_fp8()}")
        return
    differences, _ = resume_runs(machine, {f"fp8-{recipe}": ["--fp8-format", "hybrid", "--fp8-recipe", recipe]
                                           for recipe in recipes})
    for recipe in recipes:
        yield resume_line(f"{recipe}: steps, save, resume with FP8 state", differences[f"fp8-{recipe}"],
                          RESUME_LOSS["cuda"])
    if isinstance(differences["fp8-delayed"], Exception):
        yield Line(evaluator, "skipped: the delayed-scaling run it scores failed")
        return
    output = os.path.join(machine.work, "fp8-scores.jsonl")
    run_one(machine, "fp8-evaluate", [
        sys.executable, "-m", "orpo_megatron.evaluate", "--load", os.path.join(machine.work, "fp8-delayed-straight"),
        "--data-path", DATA, "--data-cache-dir", data_cache(machine.work), *SHAPES, "--bf16",
        "--fp8-format", "hybrid", "--output", output])
    with open(output + ".summary.json") as f:
        summary = json.load(f)
    yield Line(evaluator, "pass" if math.isfinite(summary["loss"]) else "FAIL: loss not finite",
               f"{summary['pairs']} pairs scored, loss {summary['loss']:.4f}")


# --------------------------------------------------------------------------------------------- main
def missing_packages() -> list[str]:
    """What this command needs and a fresh GPU machine lacks (it then prints HOW_TO_RUN and stops)."""
    def present(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            return False
    return [package for package, module in (("megatron-core", "megatron.core"), ("datasets", "datasets"))
            if not present(module)]


def describe_machine(dry_run: bool, work: str, budget_minutes: float) -> Machine:
    cuda = torch.cuda.is_available()
    te = None
    if importlib.util.find_spec("transformer_engine") is not None:
        from orpo_megatron.model import _installed_transformer_engine

        te = _installed_transformer_engine()
    return Machine(dry_run=dry_run, work=work, cuda=cuda, gpus=torch.cuda.device_count() if cuda else 0,
                   device_name=torch.cuda.get_device_name() if cuda else "CPU",
                   capability=torch.cuda.get_device_capability() if cuda else None, transformer_engine=te,
                   transformers=importlib.util.find_spec("transformers") is not None,
                   deadline=time.time() + 60 * budget_minutes)


def prepare_fixtures(machine: Machine) -> None:
    """The tiny Mixtral (HF folder), its conversions to our format in fp32 and bf16 (`tools/convert_hf.py
    hf-to-megatron`'s function) and the tokenized pairs, in this process: each process the command starts spends
    seconds importing, and the runs that read the data cache need not race to write it."""
    from orpo_megatron import tiny_model
    from orpo_megatron.checkpoint import conversion
    from orpo_megatron.data.arguments import DataConfig, add_data_args
    from orpo_megatron.data.pipeline import make_pair_tokenizer, tokenized_split

    hf_dir = tiny_model.write_tiny_model(fixture(machine.work, "hf"), seed=1234)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        conversion.hf_to_megatron(hf_dir, fixture(machine.work, name), dtype, progress=False)
    data = DataConfig.from_args(add_data_args(argparse.ArgumentParser()).parse_args(
        ["--data-path", DATA, "--data-cache-dir", data_cache(machine.work), *SHAPES]))
    tokenized_split(data, make_pair_tokenizer(data, hf_dir), data.split)


def print_table(lines: list[tuple[str, Line]]) -> None:
    widths = [max(len(section) for section, _ in lines), min(45, max(len(line.check) for _, line in lines)),
              min(40, max(len(line.result) for _, line in lines))]
    print("\n" + "  ".join(h.ljust(w) for h, w in zip(("section", "check", "result"), widths)) + "  detail")
    for section, line in lines:
        print("  ".join(v.ljust(w) for v, w in zip((section, line.check, line.result), widths)) + "  " + line.detail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=HOW_TO_RUN,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="run on CPU at tiny sizes (what CI exercises)")
    parser.add_argument("--work-dir", default=None, help="scratch folder, logs in its logs/ (default: a temporary "
                                                          "one, removed)")
    parser.add_argument("--budget-minutes", type=float, default=9.0,
                        help="start a check only if its estimated time fits in what is left of this many minutes "
                             "(default 9: the command's budget is 10, pip and start-up take the rest)")
    args = parser.parse_args(argv)
    print(HOW_TO_RUN, flush=True)
    if missing_packages():
        print(f"error: {', '.join(missing_packages())} not installed: install them as above", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run to exercise the checks on CPU")

    if args.work_dir and os.path.isdir(args.work_dir) and os.listdir(args.work_dir):
        parser.error(f"--work-dir {args.work_dir} is not empty: give a new or empty folder (the runs save there)")
    work = args.work_dir or tempfile.mkdtemp(prefix="gpu-acceptance-")
    os.makedirs(work, exist_ok=True)
    machine = describe_machine(args.dry_run, work, args.budget_minutes)
    prepare_fixtures(machine)
    for name in EARLY_WORKERS:
        if name != "parity" or machine.transformers:
            start_worker(machine, name)
    lines: list[tuple[str, Line]] = []
    started = time.time()

    def add(section: str, line: Line) -> None:
        lines.append((section, line))
        print(f"[{time.time() - started:4.0f} s] {section} | {line.check} | {line.result} | {line.detail}", flush=True)

    for section, fn, seconds in CHECKS:
        name = fn.__name__.replace("_", " ")
        check_started = time.time()
        try:
            left = machine.deadline - check_started
            if seconds > left:
                raise Skip(f"time budget: ~{seconds:.0f} s needed, {max(left, 0):.0f} s left of "
                           f"{args.budget_minutes:g} minutes")
            for line in fn(machine):
                add(section, line)
        except Skip as why:
            add(section, Line(name, f"skipped: {why}"))
        except Exception as err:  # one broken check must not hide the others
            add(section, Line(name, f"FAIL: {type(err).__name__}: {err}"[:300],
                              traceback.format_exc().strip().splitlines()[-1][:200]))
        if seconds:
            print(f"[{time.time() - started:4.0f} s] {section} took {time.time() - check_started:.0f} s "
                  f"(estimated {seconds:.0f} s on an H200)", flush=True)
    stop_early_workers(machine)
    print_table(lines)
    print(f"\n{len(lines)} lines in {time.time() - started:.0f} s on {machine.device_name}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(line.result.startswith("FAIL") for _, line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
