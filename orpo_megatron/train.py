"""ORPO training on Megatron-Core: `python -m orpo_megatron.train --load CKPT --data-path DATA ...`.

Reads top to bottom: flags, parallel start-up, model, optimizer, data, checkpoint, then the loop (step, log,
evaluate, save, stop on a signal or a non-finite step). The objective (`objective.py`), its pipeline glue
(`schedule.py`), the data (`data/`), checkpoints (`checkpoint/training.py`) and logging (`tracking.py`) are one
import away. Launch with torchrun or srun; on a machine without a GPU it runs on CPU with gloo.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from orpo_megatron import arguments, model, optimizer as optimizers, parallel
from orpo_megatron.checkpoint import format as checkpoint_format
from orpo_megatron.checkpoint import training as checkpointing
from orpo_megatron import throughput, tracking
from orpo_megatron.data.arguments import DataConfig
from orpo_megatron.data.batching import batch_layout
from orpo_megatron.data.pipeline import build_preference_data, tokenize_into_cache
from orpo_megatron.errors import ConfigError, UserError
from orpo_megatron.model_config import FusedKernels
from orpo_megatron.objective import GlobalNormalizers, ORPOConfig
from orpo_megatron.rank_model import build_for_rank
from orpo_megatron.routing import RoutingStats
from orpo_megatron.schedule import (
    ScheduleResult,
    accelerator,
    run_micro_batches,
)

LR_DECAY_STYLES = ["constant", "linear", "cosine", "inverse-square-root"]


class TrainingError(UserError, RuntimeError):
    """A run that must stop, with what happened and where the last good checkpoint is."""


# Exit statuses besides 0 (trained to the end), 1 (an error, one `error:` line) and 2 (bad flags, argparse's).
# Stopped early: by SIGTERM / SIGUSR1, --exit-duration-in-mins or --exit-interval.
EXIT_STOPPED_SAVED = 3  # a checkpoint of the last step is in --save
EXIT_STOPPED_UNSAVED = 4  # without --save: nothing was saved
EXIT_STATUSES = ("exit status: 0 trained to the end; 1 error (one 'error:' line); 2 bad flags; "
                 f"{EXIT_STOPPED_SAVED} stopped early (SIGTERM/SIGUSR1, --exit-duration-in-mins, --exit-interval) "
                 f"after saving a checkpoint of the last step (run the same command to resume); "
                 f"{EXIT_STOPPED_UNSAVED} stopped early without --save (nothing saved). torchrun exits with its own "
                 "non-zero status and reports each worker's.")


def add_training_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--micro-batch-size", type=int, default=1,
                       help="Pairs per micro-batch (each pair is a chosen and a rejected sequence; packed into one row "
                            "unless --no-packing). With packing and pipeline parallelism or --packed-length the "
                            "micro-batches are fixed-length packed rows instead. Default: 1.")
    group.add_argument("--global-batch-size", type=int, default=None,
                       help="Pairs per optimizer step over all data-parallel ranks; gradient accumulation is "
                            "derived from it. Default: micro-batch size x data-parallel size.")
    group.add_argument("--train-iters", type=int, default=None, help="Optimizer steps to train for.")
    group.add_argument("--freeze-router", action="store_true",
                       help="MoE router weights take no update (keeps routing stable during preference tuning); "
                            "the optimizer holds no state for them. Resume with the flag as the run was saved.")
    group.add_argument("--train-epochs", type=float, default=None,
                       help="Epochs over the training pairs (instead of --train-iters). Default: 1 if neither.")
    group.add_argument("--lr", type=float, default=1e-6, help="Peak learning rate. Default: 1e-6 (TRL's ORPO default).")
    group.add_argument("--min-lr", type=float, default=0.0, help="Learning rate floor of the decay. Default: 0.")
    group.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default="linear",
                       help="Schedule after warmup (alignment-handbook names: constant, linear, cosine, "
                            "inverse_sqrt = inverse-square-root). Default: linear.")
    group.add_argument("--lr-warmup-iters", type=int, default=0, help="Linear warmup steps from 0. Default: 0.")
    group.add_argument("--lr-decay-iters", type=int, default=None,
                       help="Steps over which the LR decays to --min-lr. Default: the training length.")
    group.add_argument("--skip-nonfinite-steps", type=int, default=0,
                       help="Skip up to N optimizer steps whose gradient norm is NaN/inf (checked before every update: "
                            "a skipped step leaves weights and optimizer state untouched and does not advance the LR "
                            "schedule), then stop. Default: 0.")
    resume = group.add_mutually_exclusive_group()
    resume.add_argument("--override-opt_param-scheduler", action="store_true",
                        help="Resuming: use the LR schedule of the flags (--lr, --min-lr, --lr-warmup-iters, "
                             "--lr-decay-iters or the training length, --lr-decay-style, --weight-decay) instead of "
                             "the checkpoint's. Default: neither flag, and a schedule that differs from the "
                             "checkpoint's stops the run at start-up, naming both values (Megatron-LM's rule).")
    resume.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                        help="Resuming: keep the checkpoint's LR schedule and ignore the schedule flags.")

    optimizers.add_ddp_args(parser)

    group = parser.add_argument_group("evaluation and checkpoints")
    group.add_argument("--eval-interval", type=int, default=100, help="Evaluate every N steps (0: only at the end).")
    group.add_argument("--eval-iters", type=int, default=None,
                       help="Micro-batches per evaluation on each DP rank. Default: the whole held-out set.")
    group.add_argument("--save", default=None,
                       help="Training checkpoint directory. A run whose --save already holds a checkpoint resumes "
                            "from its newest complete iteration (so a requeued job continues).")
    group.add_argument("--save-interval", type=int, default=None, help="Save every N steps. Default: only at the end.")
    group.add_argument("--async-save", action="store_true",
                       help="Write checkpoints in the background (megatron-core's asynchronous torch_dist save, as "
                            "Megatron-LM's flag): training goes on while a forked process writes the state copied "
                            "at the save; the `latest` pointer moves once every rank has written (checked after "
                            "each step). Same files as a synchronous save. Default: save in place.")
    group.add_argument("--finetune", action="store_true",
                       help="Start a new run from the weights of --load, even a training checkpoint of ours or "
                            "Megatron-LM's: iteration 0, a new optimizer and LR schedule, the data from its start "
                            "(Megatron-LM's flag; e.g. ORPO from one's own SFT run). A --save that already holds "
                            "this run's checkpoint resumes it as usual. Default: a training checkpoint resumes.")
    group.add_argument("--no-load-optim", action="store_true",
                       help="Resuming: load the weights, iteration and data position but not the optimizer state: "
                            "Adam starts anew and the LR schedule continues at the iteration (Megatron-LM's flag).")
    group.add_argument("--no-load-rng", action="store_true",
                       help="Resuming: keep the RNG state --seed gives instead of the checkpoint's (Megatron-LM's "
                            "flag; the ORPO step itself draws no random numbers).")
    group.add_argument("--allow-data-change", action="store_true",
                       help="Resume even when the training pairs differ from those the checkpoint was trained on "
                            "(same count, other content: edited data or tokenization flags), logging the change. "
                            "Default: refuse.")
    group.add_argument("--exit-duration-in-mins", type=float, default=None,
                       help="Save and exit (status 3) after the first step that ends more than this many minutes "
                            "after start-up, so a job stops cleanly before its scheduler's time limit; set it to the "
                            "limit minus a step and a save (the SLURM examples do). Default: no limit.")
    group.add_argument("--exit-interval", type=int, default=None,
                       help="Save and exit (status 3) after the first step whose iteration is a multiple of N "
                            "(Megatron-LM's flag); the same command resumes. Default: none.")
    group.add_argument("--keep-last-checkpoints", type=int, default=None,
                       help="Keep only the newest N iteration folders. Default: keep all.")
    group.add_argument("--peak-tflops", type=float, default=None,
                       help="Per-GPU peak TFLOP/s for MFU. Default: the detected GPU's dense bf16 (or fp8) peak "
                            "(H100 SXM: 989); no MFU on CPU or unknown GPUs.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = arguments.new_parser("python -m orpo_megatron.train", __doc__.split("\n")[0])
    parser.epilog = EXIT_STATUSES
    add_training_args(parser)
    optimizers.add_optimizer_args(parser)
    tracking.add_logging_args(parser)
    args = arguments.parse_and_validate(parser, argv)
    optimizers.validate_optimizer_args(parser, args)
    if args.train_iters is not None and args.train_epochs is not None:
        parser.error("give --train-iters or --train-epochs, not both")
    for flag in ("micro_batch_size", "train_iters", "global_batch_size", "save_interval", "keep_last_checkpoints",
                 "eval_iters", "log_interval", "lr_decay_iters", "exit_interval"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.eval_iters is not None and args.virtual_pipeline_model_parallel_size is not None and (
            args.eval_iters % args.pipeline_model_parallel_size):
        parser.error(f"--eval-iters {args.eval_iters} must be a multiple of --pipeline-model-parallel-size "
                     f"{args.pipeline_model_parallel_size}: the interleaved schedule runs micro-batches in groups "
                     "of it")
    for flag in ("lr", "min_lr", "weight_decay", "lr_warmup_iters", "skip_nonfinite_steps", "exit_duration_in_mins"):
        if (getattr(args, flag) or 0) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.min_lr > args.lr:
        parser.error(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}: the schedule decays from --lr to --min-lr")
    for flag in ("save_interval", "async_save"):
        if getattr(args, flag) and not args.save:
            parser.error(f"--{flag.replace('_', '-')} needs --save")
    for flag in ("save", "log_dir", "wandb_save_dir", "tensorboard_dir"):
        arguments.check_output_folder(parser, flag, getattr(args, flag))
    optimizers.check_ddp_args(parser, args)
    return args


# ------------------------------------------------------------------------------------------------ set-up
def gather_updated_params(chunks) -> None:
    """With --overlap-param-gather the next forward all-gathers the params the last step updated; anything that
    reads them without a forward (a checkpoint save) gathers them first."""
    for chunk in chunks:
        if chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


# The LR schedule in OptimizerParamScheduler.state_dict()'s names, and the flag that sets each.
SCHEDULE_FLAGS = {"max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters",
                  "lr_decay_steps": "--lr-decay-iters (default: the training length)",
                  "lr_decay_style": "--lr-decay-style", "start_wd": "--weight-decay"}


def resolve_schedule(args, train_iters: int, saved: dict | None) -> str:
    """Decide the LR schedule as Megatron-LM does and write it back into `args` (so what is printed, logged,
    recorded in run_config.json and saved is what runs); returns where it came from. `saved`: the resumed
    checkpoint's opt_param_scheduler state. Resuming with a schedule that differs from the checkpoint's needs
    --override-opt_param-scheduler (the flags') or --use-checkpoint-opt_param-scheduler (the checkpoint's)."""
    flags = {"max_lr": args.lr, "min_lr": args.min_lr, "lr_warmup_steps": args.lr_warmup_iters,
             "lr_decay_steps": args.lr_decay_iters or train_iters, "lr_decay_style": args.lr_decay_style,
             "start_wd": args.weight_decay}
    if saved is None or args.override_opt_param_scheduler:
        used, source = flags, "the flags" + (" (--override-opt_param-scheduler)" if saved is not None else "")
    elif args.use_checkpoint_opt_param_scheduler:
        used, source = {key: saved[key] for key in flags}, "the checkpoint (--use-checkpoint-opt_param-scheduler)"
    else:
        differ = [f"{SCHEDULE_FLAGS[key]} gives {flags[key]}, the checkpoint has {saved[key]}"
                  for key in flags if flags[key] != saved[key]]
        if differ:
            raise TrainingError(f"the LR schedule differs from the resumed checkpoint's: {'; '.join(differ)}. Pass "
                                "--override-opt_param-scheduler to use the flags' schedule or "
                                "--use-checkpoint-opt_param-scheduler to keep the checkpoint's")
        used, source = flags, "the flags, as in the checkpoint"
    if used["lr_warmup_steps"] >= used["lr_decay_steps"]:
        raise ConfigError(f"--lr-warmup-iters {used['lr_warmup_steps']} must be smaller than the LR decay length "
                         f"{used['lr_decay_steps']} (--lr-decay-iters, by default the training length)")
    (args.lr, args.min_lr, args.lr_warmup_iters, args.lr_decay_iters, args.lr_decay_style,
     args.weight_decay) = (used[key] for key in flags)
    return source


def build_scheduler(args, optimizer, train_iters: int) -> OptimizerParamScheduler:
    """Megatron-Core's scheduler on the schedule `resolve_schedule` left in `args`. Loading a checkpoint's state
    then restores only its step count: the values are the checkpoint's already, or overridden."""
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters or train_iters, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=train_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
    )


def train_length(args, steps_per_epoch: int) -> int:
    if args.train_iters is not None:
        return args.train_iters
    return max(1, math.ceil((args.train_epochs or 1.0) * steps_per_epoch))


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM's time-limit warning) ask the loop to save and exit at the end of the step."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def any_rank(self, out_of_time: bool = False) -> bool:
        """All ranks agree, so they save together; `out_of_time` (this rank's clock) counts as a signal."""
        return _any_rank(self.received is not None or out_of_time)


# ------------------------------------------------------------------------------------------------- steps
def train_step(chunks, optimizer, scheduler, step, orpo_config) -> tuple[ScheduleResult, float, bool]:
    """One optimizer step over this rank's micro-batches of `step` (a `TrainStep`). Returns the schedule result,
    grad norm, and whether the step was applied (not when the grad norm is NaN/inf: `step_if_finite`)."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    normalizers = GlobalNormalizers(step.num_pairs, step.num_nll_targets(orpo_config.nll_on_prompt))
    result = run_micro_batches(chunks, step.micro_batches, orpo_config, forward_only=False, normalizers=normalizers)
    applied, grad_norm = optimizers.step_if_finite(optimizer)
    if applied:
        scheduler.step(increment=1)
    return result, grad_norm, applied


@torch.no_grad()
def evaluate(chunks, evaluation, orpo_config, max_micro_batches: int | None) -> dict[str, float] | None:
    for chunk in chunks:
        chunk.eval()
    micro_batches = list(evaluation)[:max_micro_batches]
    result = run_micro_batches(chunks, micro_batches, orpo_config, forward_only=True)
    for chunk in chunks:
        chunk.train()
    return result.metrics(orpo_config)


def main(argv: list[str] | None = None) -> int:
    """Train; returns the exit status (0: trained to the end; EXIT_STOPPED_SAVED / EXIT_STOPPED_UNSAVED)."""
    args = parse_args(argv)
    # Installed first: SLURM's time-limit warning may arrive while a large model is still loading; the loop then
    # stops (and saves) after its first step instead of the default action killing the process.
    stop = StopSignal()
    started_at = time.monotonic()  # --exit-duration-in-mins counts from here, start-up included
    data_config = DataConfig.from_args(args)
    data_config.check_present()  # before minutes of model building
    resume_dir = args.save if args.save and checkpointing.latest_iteration(args.save) is not None else None
    checkpoint = checkpointing.resolve(resume_dir or args.load, None if resume_dir else args.hf_config)
    if args.finetune and not resume_dir:  # the weights alone: a new run
        checkpoint = dataclasses.replace(checkpoint, train_state=None)
    model.check_freeze_router_resume(checkpoint.train_state, args.freeze_router)
    hf = checkpoint.hf
    # The first rank tokenizes (forking workers) before CUDA and NCCL start; the others wait in the rendezvous.
    if parallel.launch_env().rank == 0:
        tokenize_into_cache(data_config, checkpoint.hf_files, [data_config.split, data_config.eval_split])
    layout = parallel.initialize(parallel.ParallelLayout.from_args(args, parallel.launch_env().world_size, hf.is_moe),
                                 hf, args.seed, args.distributed_timeout_minutes)
    logging_rank = parallel.is_logging_rank()
    log = print if dist.get_rank() == 0 else (lambda *a, **k: None)
    log(f"orpo-megatron: {hf.architecture} {hf.num_layers} layers, {layout.describe()}, "
        f"{'CPU/gloo' if not torch.cuda.is_available() else 'GPU/nccl'}; loading {checkpoint.folder}")
    log(parallel.launch_summary())

    # Data, and the LR schedule it sets the length of: their checks come before the model is built.
    dp_size = layout.data_parallel_size
    global_batch_size = args.global_batch_size or args.micro_batch_size * dp_size
    batches = batch_layout(args.packing, args.packed_length, layout, bool(args.fp8_format))
    train_iter, evaluation, data_stats = build_preference_data(
        args, checkpoint.hf_files, parallel_state.get_data_parallel_rank(), dp_size, args.micro_batch_size,
        global_batch_size, batches, args.seed)
    log(data_stats.summary())
    if checkpoint.train_state is not None:  # resuming: the data order continues (or the run stops here)
        data_warning = train_iter.load_state_dict(checkpoint.train_state["data"], args.allow_data_change)
        if data_warning:
            log(data_warning)
    train_iters = train_length(args, train_iter.steps_per_epoch)
    saved_schedule = (checkpoint_format.read_common(checkpoint.folder)["opt_param_scheduler"]
                      if checkpoint.train_state is not None else None)
    source = resolve_schedule(args, train_iters, saved_schedule)
    log(f"LR schedule from {source}: {args.lr_decay_style}, peak {args.lr:g}, min {args.min_lr:g}, warmup "
        f"{args.lr_warmup_iters} and decay over {args.lr_decay_iters} steps, weight decay {args.weight_decay:g}")

    # Model and optimizer.
    precision = arguments.precision_config(args)
    use_te = model.transformer_engine_available()
    built = build_for_rank(hf, layout, precision=precision, use_transformer_engine=use_te,
                           make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                           freeze_router=args.freeze_router, data_parallel=args,
                           moe_aux_loss_coeff=args.moe_aux_loss_coeff,
                           moe_token_dispatcher_type=args.moe_token_dispatcher_type,
                           recompute_granularity=args.recompute_granularity, kernels=FusedKernels.for_backend(use_te))
    config, vocab, chunks = built.config, built.vocab, built.chunks
    routing_stats = RoutingStats(built.modules, hf.num_layers, hf.num_experts) if hf.is_moe else None
    optimizer = optimizers.build_optimizer(args, chunks, precision.bf16, precision.params_dtype)
    config.grad_scale_func = optimizer.scale_loss
    scheduler = build_scheduler(args, optimizer, train_iters)

    # Weights, and the training state when resuming.
    state = checkpointing.load(checkpoint, chunks, optimizer, scheduler, layout.describe(), log=log,
                               load_optimizer=not args.no_load_optim, load_rng=not args.no_load_rng)
    iteration = state["iteration"] if state else 0
    if state:
        log(f"resumed from iteration {iteration} ({train_iter.consumed_pairs} pairs consumed)")
    orpo_config = ORPOConfig.from_args(args, hf.vocab_size)
    tracker = tracking.MetricsTracker.from_args(args, enabled=logging_rank, total_iters=train_iters,
                                                resume_iteration=iteration)
    tracker.log_config(vars(args), layout=layout.describe(), data_stats=data_stats.as_dict())
    flops = throughput.FlopsCounter(hf, peak_tflops=args.peak_tflops, world_size=layout.world_size,
                                    vocab_size=vocab.padded_size, fp8=bool(args.fp8_format))

    saved_at = iteration if resume_dir else None  # the iteration already complete (or being written) in --save
    saver = checkpointing.Saver(args.save, args.keep_last_checkpoints, args.async_save, log) if args.save else None

    def save(at_iteration: int) -> None:
        # Never rewrite a complete iteration (a signal at a save-interval step, a resumed finished run): the
        # rewrite would delete the folder the `latest` pointer names before renaming the new one into place.
        nonlocal saved_at
        if at_iteration == saved_at:
            return
        gather_updated_params(chunks)
        train_state = {"data": train_iter.state_dict(), "layout": layout.describe(), "args": vars(args)}
        megatron_args = checkpoint_format.megatron_args(
            hf, {**vars(args), **dataclasses.asdict(layout), "data_parallel_size": dp_size,
                 "seq_length": args.max_length, "consumed_pairs": train_iter.consumed_pairs},
            padded_vocab_size=vocab.padded_size, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            iteration=at_iteration)
        saver.save(at_iteration, chunks, optimizer, scheduler, train_state, megatron_args,
                   hf_files_from=checkpoint.hf_files)
        saved_at = at_iteration

    def last_good() -> str:
        if not args.save:
            return "none (no --save)"
        saver.wait()
        found = checkpointing.latest_iteration(args.save)
        return checkpointing.iteration_dir(args.save, found) if found is not None else f"none yet in {args.save}"

    if evaluation is not None and iteration == 0:
        tracker.log(evaluate(chunks, evaluation, orpo_config, args.eval_iters), iteration, 0, prefix="eval")

    skipped = 0
    stopped = False
    for chunk in chunks:
        chunk.train()
    while iteration < train_iters and not stopped:
        started = time.perf_counter()
        step = next(train_iter)
        log_step = (iteration + 1) % args.log_interval == 0 or iteration + 1 == train_iters
        with routing_stats.recording() if routing_stats and log_step else contextlib.nullcontext():
            result, grad_norm, applied = train_step(chunks, optimizer, scheduler, step, orpo_config)
        seconds = time.perf_counter() - started
        iteration += 1
        if not applied:  # the grad norm is reduced over every rank: all ranks decide alike
            skipped += 1
            if skipped > args.skip_nonfinite_steps:
                raise TrainingError(f"non-finite grad norm at iteration {iteration} ({grad_norm}), step not "
                                    f"applied; last good checkpoint: {last_good()}")
            log(f"WARNING: skipped iteration {iteration}: grad norm {grad_norm}, weights and optimizer state "
                f"left as they were ({skipped}/{args.skip_nonfinite_steps} skips)")
        if log_step:
            metrics = dict(result.metrics(orpo_config) or {}, grad_norm=grad_norm,
                           lr=scheduler.get_lr(optimizer.param_groups[0]))
            if logging_rank and applied and not all(map(math.isfinite, metrics.values())):
                print(f"WARNING: non-finite metrics at iteration {iteration} with a finite grad norm (the step was "
                      "applied): " + ", ".join(k for k, v in metrics.items() if not math.isfinite(v)), flush=True)
            if routing_stats:
                metrics.update(routing_stats.metrics(len(step.micro_batches)))
            metrics.update(step_throughput(flops, step.micro_batches, result.positions, seconds))
            tracker.log(metrics, iteration, train_iter.consumed_pairs, prefix="train")
        if evaluation is not None and args.eval_interval and (iteration % args.eval_interval == 0 or iteration == train_iters):
            tracker.log(evaluate(chunks, evaluation, orpo_config, args.eval_iters), iteration,
                        train_iter.consumed_pairs, prefix="eval")
        if saver:
            saver.poll()
        if args.save and (iteration == train_iters or args.save_interval and iteration % args.save_interval == 0):
            save(iteration)
        out_of_time = args.exit_duration_in_mins is not None and \
            time.monotonic() - started_at > 60 * args.exit_duration_in_mins
        interval_reached = bool(args.exit_interval) and iteration % args.exit_interval == 0
        stopped = (stop.any_rank(out_of_time) or interval_reached) and iteration < train_iters
        if stopped and args.save:
            save(iteration)
    if saver:
        saver.wait()
    status = 0
    if stopped:
        status = EXIT_STOPPED_SAVED if args.save else EXIT_STOPPED_UNSAVED
        reason = (f"by --exit-interval {args.exit_interval}" if interval_reached else
                  f"by --exit-duration-in-mins {args.exit_duration_in_mins:g}" if out_of_time else "by signal")
        log(f"stopped {reason} at iteration {iteration}; {train_iters - iteration} of {train_iters} steps left; "
            + (f"saved {checkpointing.iteration_dir(args.save, iteration)}: run the same command to resume"
               if args.save else "nothing saved (no --save): these steps are lost")
            + f" (exit status {status})")
    tracker.finish()
    dist.barrier()  # every rank leaves together (see `cli`)
    parallel.destroy()
    return status


def step_throughput(flops: throughput.FlopsCounter, micro_batches, positions: int, seconds: float
                    ) -> dict[str, float]:
    """Throughput of a step from its real tokens, the positions the schedule computed (`ScheduleResult`) and
    real-sequence FLOPs, summed over the data-parallel ranks (a collective of the DP group)."""
    local = [sum(b.num_real_tokens for b in micro_batches), positions,
             sum(flops.sequences_flops(b.sequence_lengths) for b in micro_batches)]
    totals = torch.tensor(local, dtype=torch.float64, device=accelerator())
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    real_tokens, positions, model_flops = totals.tolist()
    return flops.step_metrics(int(real_tokens), int(positions), model_flops, seconds)


def _any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if torch.cuda.is_available():
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def cli(argv: list[str] | None = None) -> None:
    """Entry point: bad input and stopped runs end with one clear line and a non-zero exit, not a traceback."""
    try:
        status = main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    if status:
        # srun --kill-on-bad-exit kills the tasks still exiting once one exits non-zero, and then reports them as
        # killed instead of this status. Leaving at once after main's last barrier, without the interpreter's
        # teardown, makes every rank exit with it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


if __name__ == "__main__":
    cli()
