"""Training speed: ours (`python -m orpo_megatron.train`'s loop) against TRL's ORPOTrainer, side by side in one run.

Both sides train the same model on the same pairs, in the same order, in one process each (world size 1, CPU):
- model: a random Mixtral written by `orpo_megatron.tiny_model` (vocabulary 32000, hidden 256, FFN 896, 4 layers,
  8 experts top-2, 8/2 heads; `benchmarks/model.py`), loaded by TRL from the HF folder and by us from its
  conversion (`tools/convert_hf.py hf-to-megatron`);
- pairs: the first 256 pairs of `examples/data/plain.jsonl` (short Zephyr-templated questions and answers; with
  the tiny tokenizer a sequence, prompt + completion, is 40 to 116 tokens, median 54, about 118 real tokens a
  pair), each completion's closing `</s>\\n` removed so that both sides add the EOS themselves: the token ids are
  then identical, step by step (`tests/test_orpo_vs_trl_benchmark.py`);
- 2 pairs per optimizer step (TRL: per_device_train_batch_size 2; ours: --micro-batch-size 2 --global-batch-size 2),
  visited in our data order (TRL's sampler set to "sequential" over the same order), so step k of both sides trains
  on the same two pairs; AdamW lr 1e-6 with linear decay, clip 1.0, no weight decay (both sides' defaults); the MoE
  load-balancing loss (coefficient 0.001 from config.json) on both sides (TRL: `output_router_logits`); no
  activation recomputation (TRL's default gradient checkpointing is turned off: ours does not recompute); metrics
  logged every 10 steps (both sides' default);
- precision: fp32 (TRL's ORPOConfig defaults to bf16=True, which on CPU means bf16 autocast: set to False), and
  bf16 (TRL: bf16 autocast over fp32 weights; ours: --bf16, bf16 weights with fp32 main params and gradients).

What each side computes per step differs by padding, and the output says how much: TRL pads the four sequences of a
step (2 chosen, 2 rejected) to the longest; ours packs them into one row without padding (the default). Each
side's real tokens and computed positions per step are printed. `--with-padded` adds a third side, ours with
`--no-packing`, which computes TRL's positions (four rows padded to the longest): ours against TRL without the
gain of packing.

Timing: each side runs in its own process (`multiprocessing` spawn: our CPU backend's torch-function mode is not
active on TRL's side) and waits at block boundaries; the driver lets one side run one block of steps while the other
waits, alternating the order every round, so both see the same machine load. A block's time is the wall time of its
steps' whole loop iterations (data, forward, backward, optimizer, logging). The first steps of each side (start-up,
allocator warm-up) are not timed; they are used to check that both sides computed the same first step.

    python benchmarks/orpo_vs_trl.py                         # fp32 then bf16, 6 rounds of 16 steps (~4 min)
    python benchmarks/orpo_vs_trl.py --precisions fp32 --with-padded
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PAIRS_SOURCE = os.path.join(REPO, "examples", "data", "plain.jsonl")
PAIRS_PER_STEP = 2
MODEL_SEED = 7
DATA_SEED = 1234
LOG_INTERVAL = 10
LR = 1e-6
MAX_LENGTH = 1024
# Side name -> our trainer's extra flags (None: TRL). "ours-padded" computes TRL's padded positions.
SIDE_FLAGS = {"ours": [], "trl": None, "ours-padded": ["--no-packing"]}
# Step-1 metrics both sides log under TRL's names, compared before anything is timed.
CHECKED_METRICS = ("nll_loss", "logps/chosen", "logps/rejected", "log_odds_chosen", "log_odds_ratio")
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}


# ----------------------------------------------------------------------------------------------------- inputs
def benchmark_pairs(num_pairs: int) -> list[dict[str, str]]:
    """The benchmark's text pairs (see the module docstring)."""
    pairs = []
    with open(PAIRS_SOURCE, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            pairs.append({"prompt": row["prompt"], "chosen": row["chosen"].removesuffix("</s>\n"),
                          "rejected": row["rejected"].removesuffix("</s>\n")})
    if len(pairs) < num_pairs:
        raise ValueError(f"{PAIRS_SOURCE} has {len(pairs)} pairs, fewer than --pairs {num_pairs}")
    return pairs[:num_pairs]


def visiting_order(num_pairs: int, num_steps: int) -> list[int]:
    """Our trainer's order of the pairs over `num_steps` steps (epoch after epoch), for TRL's sequential sampler."""
    from orpo_megatron.data.batching import epoch_permutation

    steps_per_epoch = num_pairs // PAIRS_PER_STEP
    order = []
    for epoch in range(-(-num_steps // steps_per_epoch)):
        order += epoch_permutation(num_pairs, DATA_SEED, epoch)[:steps_per_epoch * PAIRS_PER_STEP]
    return order[:num_steps * PAIRS_PER_STEP]


def write_pairs(path: str, num_pairs: int) -> str:
    """The benchmark's pairs as JSON lines (both sides read this file)."""
    with open(path, "w", encoding="utf-8") as f:
        for pair in benchmark_pairs(num_pairs):
            f.write(json.dumps(pair) + "\n")
    return path


def write_inputs(workdir: str, num_pairs: int) -> dict[str, str]:
    """The HF model, its conversion for us, and the pairs."""
    from benchmarks.model import BENCH_MIXTRAL_OVERRIDES
    from orpo_megatron import tiny_model

    hf_dir = tiny_model.write_tiny_model(os.path.join(workdir, "hf"), seed=MODEL_SEED,
                                         config_overrides=BENCH_MIXTRAL_OVERRIDES)
    checkpoint = os.path.join(workdir, "ckpt")
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_hf.py"), "hf-to-megatron", "--hf-dir",
                    hf_dir, "--output", checkpoint, "--dtype", "fp32", "--overwrite"],
                   check=True, capture_output=True, cwd=REPO)
    return {"hf_dir": hf_dir, "checkpoint": checkpoint,
            "data": write_pairs(os.path.join(workdir, "pairs.jsonl"), num_pairs)}


# ---------------------------------------------------------------------------------------------------- workers
class BlockClock:
    """A side's end of the protocol, called at the start of every optimizer step (after the step's batch is
    fetched, on both sides), so a block spans whole loop iterations. After the warm-up steps it reports ("ready",
    first-step metrics) and waits for "go"; every `block_steps` steps it reports ("block", wall seconds, CPU
    seconds of this process, real tokens, computed positions) and waits again; "stop" ends the process."""

    def __init__(self, conn, warmup_steps: int, block_steps: int):
        self.conn, self.warmup_steps, self.block_steps = conn, warmup_steps, block_steps
        self.steps = 0
        self.first_step_metrics: dict[str, float] | None = None
        self.started: tuple[float, float] | None = None
        self.real_tokens = self.positions = 0

    def step_begins(self, real_tokens: int, positions: int) -> None:
        since_warmup = self.steps - self.warmup_steps
        if since_warmup >= 0 and since_warmup % self.block_steps == 0:
            if self.started is None:
                self.conn.send(("ready", self.first_step_metrics))
            else:
                wall, cpu = self.started
                self.conn.send(("block", time.perf_counter() - wall, time.process_time() - cpu, self.real_tokens,
                                self.positions))
            if self.conn.recv() == "stop":
                raise SystemExit(0)
            self.real_tokens = self.positions = 0
            self.started = (time.perf_counter(), time.process_time())
        self.steps += 1
        self.real_tokens += real_tokens
        self.positions += positions


def _worker_start(log_path: str, threads: int) -> None:
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    import torch

    torch.set_num_threads(threads)


def run_ours(conn, name: str, inputs: dict, workdir: str, precision: str, num_steps: int, warmup: int, block: int,
             threads: int) -> None:
    """Our trainer's own entry point, with `train_step` wrapped to keep the block clock."""
    _worker_start(os.path.join(workdir, f"{name}_{precision}.log"), threads)
    from orpo_megatron import train

    clock = BlockClock(conn, warmup, block)
    train_step = train.train_step

    def timed_train_step(chunks, optimizer, scheduler, step, orpo_config):
        clock.step_begins(sum(b.num_real_tokens for b in step.micro_batches),
                          sum(b.num_positions for b in step.micro_batches))
        result = train_step(chunks, optimizer, scheduler, step, orpo_config)
        if clock.steps == 1:
            clock.first_step_metrics = result[0].metrics(orpo_config)
        return result

    train.train_step = timed_train_step
    train.main(our_train_args(inputs, os.path.join(workdir, "ours_cache"), precision, num_steps) + SIDE_FLAGS[name])
    raise RuntimeError(f"our trainer finished its {num_steps} steps before the driver stopped it")


def our_train_args(inputs: dict, data_cache: str, precision: str, num_steps: int, lr: float = LR,
                   log_interval: int = LOG_INTERVAL, micro_batch_size: int = PAIRS_PER_STEP) -> list[str]:
    """Our trainer's command line for the benchmark's model and pairs (see the module docstring)."""
    return ["--load", inputs["checkpoint"], "--data-path", inputs["data"], "--data-cache-dir", data_cache,
            "--eval-fraction", "0", "--max-length", str(MAX_LENGTH), "--micro-batch-size", str(micro_batch_size),
            "--global-batch-size", str(PAIRS_PER_STEP), "--train-iters", str(num_steps), "--lr", str(lr),
            "--log-interval", str(log_interval), "--seed", str(DATA_SEED),
            "--bf16" if precision == "bf16" else "--no-bf16"]


def run_trl(conn, name: str, inputs: dict, workdir: str, precision: str, num_steps: int, warmup: int, block: int,
            threads: int) -> None:
    """TRL's ORPOTrainer with a callback keeping the block clock."""
    _worker_start(os.path.join(workdir, f"{name}_{precision}.log"), threads)
    trainer = trl_trainer(inputs, os.path.join(workdir, f"trl_{precision}"), precision, num_steps)
    steps = trl_step_sizes(trainer.train_dataset)
    clock = BlockClock(conn, warmup, block)
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.step_begins(*steps[state.global_step])

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:  # the per-step values ORPOTrainer stores for its next log
                clock.first_step_metrics = {k: v[0] for k, v in trainer._stored_metrics["train"].items()}

    trainer.add_callback(Clock())
    trainer.train()
    raise RuntimeError(f"TRL finished its {num_steps} steps before the driver stopped it")


def trl_trainer(inputs: dict, output_dir: str, precision: str, num_steps: int, loss_type: str = "orpo",
                load_balancing: bool = True, **config_overrides):
    """TRL's ORPOTrainer (or, for another `loss_type`, `trl.experimental.cpo.CPOTrainer` with it) on the
    benchmark's model and pairs, in our visiting order (see the module docstring). `config_overrides`: ORPOConfig
    / CPOConfig fields set otherwise than here (beta, learning_rate, ...); `load_balancing` False leaves the MoE
    load-balancing loss out."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if loss_type == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer

        config_overrides["loss_type"] = loss_type
    with open(inputs["data"], encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f]
    ordered = [pairs[i] for i in visiting_order(len(pairs), num_steps)]
    tokenizer = AutoTokenizer.from_pretrained(inputs["hf_dir"])
    tokenizer.pad_token = tokenizer.eos_token  # the collator needs one; padded positions are masked out
    model = AutoModelForCausalLM.from_pretrained(inputs["hf_dir"], dtype="float32")
    # The load-balancing loss: the same work as ours, in transformers' form (tests/test_trajectory_vs_trl.py).
    model.config.output_router_logits = load_balancing
    config = Config(**{
        **dict(output_dir=output_dir, per_device_train_batch_size=PAIRS_PER_STEP, gradient_accumulation_steps=1,
               max_steps=num_steps, learning_rate=LR, lr_scheduler_type="linear", max_grad_norm=1.0,
               bf16=precision == "bf16", use_cpu=True, gradient_checkpointing=False, max_length=MAX_LENGTH,
               logging_steps=LOG_INTERVAL, train_sampling_strategy="sequential", report_to="none",
               save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=DATA_SEED),
        **config_overrides})
    return Trainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(ordered),
                   processing_class=tokenizer)


def trl_step_sizes(train_dataset) -> list[tuple[int, int]]:
    """(real tokens, computed positions) of each TRL step: its collator pads the step's chosen and rejected
    sequences to the longest of them."""
    chosen = [len(ids) for ids in train_dataset["chosen_input_ids"]]
    rejected = [len(ids) for ids in train_dataset["rejected_input_ids"]]
    sizes = []
    for start in range(0, len(chosen) - PAIRS_PER_STEP + 1, PAIRS_PER_STEP):
        lengths = chosen[start:start + PAIRS_PER_STEP] + rejected[start:start + PAIRS_PER_STEP]
        sizes.append((sum(lengths), len(lengths) * max(lengths)))
    return sizes


# ----------------------------------------------------------------------------------------------------- driver
class Side:
    """The driver's handle on one side's worker process and what its blocks measured."""

    def __init__(self, name: str, process, conn, log_path: str):
        self.name, self.process, self.conn, self.log_path = name, process, conn, log_path
        self.seconds: list[float] = []  # wall seconds per step, one entry per block
        self.cpu_seconds: list[float] = []  # the process's CPU seconds per step
        self.real_tokens = self.positions = 0

    def receive(self):
        try:
            return self.conn.recv()
        except EOFError:
            self.process.join(timeout=10)
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"the {self.name} worker exited (code {self.process.exitcode}); the end of its log "
                               f"{self.log_path}:\n{tail}") from None

    def run_block(self, block_steps: int) -> None:
        self.conn.send("go")
        _, seconds, cpu_seconds, real_tokens, positions = self.receive()
        self.seconds.append(seconds / block_steps)
        self.cpu_seconds.append(cpu_seconds / block_steps)
        self.real_tokens += real_tokens
        self.positions += positions


def start_side(name: str, inputs: dict, workdir: str, precision: str, args, num_steps: int) -> Side:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    target = run_trl if SIDE_FLAGS[name] is None else run_ours
    process = context.Process(target=target, args=(child, name, inputs, workdir, precision, num_steps,
                                                   args.warmup_steps, args.block_steps, args.threads))
    process.start()
    child.close()  # the worker's end: closed here, so a worker that dies is seen as end of file
    return Side(name, process, parent, os.path.join(workdir, f"{name}_{precision}.log"))


def check_first_step(first: dict[str, dict], precision: str) -> None:
    """Every side's first step on the same pairs and weights: TRL's values (within the precision's tolerance)."""
    tolerance = TOLERANCE[precision]
    for side in first:
        if side == "trl":
            continue
        parts = []
        for name in CHECKED_METRICS:
            ours, trl = first[side][name], first["trl"][name]
            parts.append(f"{name} {ours:.5f}/{trl:.5f}")
            if abs(ours - trl) > tolerance * max(1.0, abs(trl)):
                raise RuntimeError(f"step 1 {name}: {side} {ours} vs TRL {trl} (tolerance {tolerance}): the sides "
                                   "do not train the same model on the same pairs")
        print(f"  step 1, {side}/TRL: {', '.join(parts)}", flush=True)


def run_precision(precision: str, names: list[str], inputs: dict, workdir: str, args) -> dict[str, Side]:
    num_steps = args.warmup_steps + args.rounds * args.block_steps + 1
    sides = {name: start_side(name, inputs, workdir, precision, args, num_steps) for name in names}
    try:
        # All set up at once; each then waits after its (untimed) warm-up steps.
        check_first_step({name: side.receive()[1] for name, side in sides.items()}, precision)
        for round_index in range(args.rounds):
            shift = round_index % len(names)  # each side leads in turn
            for name in names[shift:] + names[:shift]:
                sides[name].run_block(args.block_steps)
            trl = sides["trl"].seconds[-1]
            parts = [f"TRL {trl:.3f} s/step"] + [f"{name} {side.seconds[-1]:.3f} s/step "
                                                 f"({trl / side.seconds[-1]:.2f}x TRL's pairs/s)"
                                                 for name, side in sides.items() if name != "trl"]
            print(f"  round {round_index + 1}/{args.rounds}: {', '.join(parts)}", flush=True)
        for side in sides.values():
            side.conn.send("stop")
            side.process.join(timeout=60)
    finally:
        for side in sides.values():
            # kill, not terminate: our trainer treats SIGTERM as "save and stop after this step"
            if side.process.is_alive():
                side.process.kill()
    return sides


def report(precision: str, sides: dict[str, Side], args) -> None:
    steps = args.rounds * args.block_steps
    print(f"\n{precision}: {args.rounds} rounds of {args.block_steps} steps, {PAIRS_PER_STEP} pairs per step "
          "(per-block figures: median [min-max])")
    print(f"  {'side':11s} {'wall s/step':>21s} {'pairs/s':>8s} {'CPU s/step':>21s} {'real tokens/step':>17s} "
          f"{'positions/step':>15s}")
    for name, side in sides.items():
        pairs_per_second = PAIRS_PER_STEP / statistics.median(side.seconds)
        print(f"  {name:11s} {_spread(side.seconds, '.3f'):>21s} {pairs_per_second:8.2f} "
              f"{_spread(side.cpu_seconds, '.3f'):>21s} {side.real_tokens / steps:17.1f} "
              f"{side.positions / steps:15.1f}")
    for name in sides:
        if name == "trl":
            continue
        for what, attribute in (("wall", "seconds"), ("CPU", "cpu_seconds")):
            ours, trl = getattr(sides[name], attribute), getattr(sides["trl"], attribute)
            ratios = [t / o for o, t in zip(ours, trl)]
            print(f"  {name}/TRL pairs/s by {what} time: {_spread(ratios, '.2f')}x over rounds, "
                  f"{sum(trl) / sum(ours):.2f}x over all timed steps")


def _spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated, from fp32 and bf16")
    parser.add_argument("--rounds", type=int, default=6, help="timed blocks per side (default: 6)")
    parser.add_argument("--block-steps", type=int, default=16, help="optimizer steps per block (default: 16)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps at the start (default: 3)")
    parser.add_argument("--pairs", type=int, default=256, help="pairs from examples/data/plain.jsonl (default: 256)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (default: 1)")
    parser.add_argument("--with-padded", action="store_true",
                        help="also time ours with --no-packing (side 'ours-padded'): TRL's padded positions")
    parser.add_argument("--workdir", default=None, help="keep the model, data and logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    precisions = args.precisions.split(",")
    if not set(precisions) <= set(TOLERANCE):
        parser.error(f"--precisions takes fp32 and/or bf16, got {args.precisions}")
    for flag in ("rounds", "block_steps", "warmup_steps", "threads"):
        if getattr(args, flag) < 1:  # warm-up: the first step is checked, not timed
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    # A CPU comparison (the setting): both workers inherit these.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    with tempfile.TemporaryDirectory(prefix="orpo_vs_trl_") as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        inputs = write_inputs(workdir, args.pairs)
        print(f"ours: python -m orpo_megatron.train, each step's 4 sequences packed into one row without padding\n"
              f"TRL {_version('trl')} ORPOTrainer (transformers {_version('transformers')}): each step's 4 sequences "
              f"as 4 rows padded to the longest\n"
              f"CPU, torch {_version('torch')}, {args.threads} thread(s), one process per side; {args.pairs} pairs "
              f"of {os.path.relpath(PAIRS_SOURCE, REPO)}, {PAIRS_PER_STEP} per step, the same pairs at the same "
              "step on both sides", flush=True)
        for precision in precisions:
            print(f"\n{precision}: setting up both sides", flush=True)
            names = ["ours", "trl"] + (["ours-padded"] if args.with_padded else [])
            report(precision, run_precision(precision, names, inputs, workdir, args), args)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
