"""Predicted training time for `tools/estimate_memory.py`: its flags, the recipe's workload, and the printout.

Owns turning command-line assumptions into a `step_time` prediction of the whole recipe (by default the
alignment-handbook's Zephyr-141B ORPO run: 6932 capybara pairs, 3 epochs, 32 pairs per step) and printing it
next to the handbook's 1.33 h on 32 H100. The arithmetic is `step_time.py` / `step_work.py`, the pair lengths
`workload.py`'s assumed distribution.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools

from orpo_megatron.planning import workload
from orpo_megatron.data.batching import BatchLayout, batch_layout
from orpo_megatron.optimizer import DTYPES
from orpo_megatron.planning.memory import MemoryLayout, total_parameters
from orpo_megatron.model_config import HFModelConfig, padded_vocab_size
from orpo_megatron.planning.step_time import (
    GBPS,
    Hardware,
    RecipeTime,
    RunSettings,
    matmul_efficiency_from_layer_throughput,
    predict_step_time,
)
from orpo_megatron.throughput import CAUSAL_ATTENTION_FRACTION, PEAK_TFLOPS, forward_flops

DEFAULTS = Hardware()
# An assumed aggregate write rate of a mid-size Lustre/GPFS scratch file system to one job: a full 8x22B checkpoint
# with optimizer state (~2 TB) then takes about 3 minutes. Not measured; --checkpoint-write-gbps overrides it.
DEFAULT_CHECKPOINT_WRITE_GBPS = 10.0


def add_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "predicted time (of the recipe; --search ranks by it)",
        "Rates are data-sheet peaks of a DGX H100 node unless given; bandwidths in GB/s (gigabytes).")
    group.add_argument("--matmul-efficiency", type=float, default=DEFAULTS.matmul_efficiency,
                       help="Fraction of the peak the matmuls alone reach (FLOPs counted as Megatron-LM counts "
                            "them: causal attention half); communication, bubble and optimizer are added on top, so "
                            "not a published end-to-end MFU. Default: %(default)g, fitted to the Megatron-LM MoE "
                            "README's two Mixtral-8x7B points on 64 H100 (438 and 468 TFLOP/s; "
                            "benchmarks/planner_vs_published.py).")
    group.add_argument("--measured-layer-tokens-per-second", type=float, default=None, metavar="TOKENS_PER_S",
                       help="Calibration: set --matmul-efficiency from a measured forward+backward throughput of "
                            "--measured-layers layers shaped like this model on one GPU (the GPU acceptance "
                            "command's 8x22B-layer line) at --measured-seq-length.")
    group.add_argument("--measured-layers", type=int, default=2, help="Layers in that measurement.")
    group.add_argument("--measured-seq-length", type=int, default=2048, help="Sequence length of that measurement.")
    group.add_argument("--peak-tflops", type=float, default=None,
                       help="Dense peak per GPU. Default: H100 SXM, 989 (bf16) or 1979 (--fp8).")
    group.add_argument("--nvlink-gbps", type=float, default=DEFAULTS.nvlink_gbps,
                       help="NVLink per GPU and direction (H100 SXM: 900 GB/s both ways).")
    group.add_argument("--network-gbps", type=float, default=DEFAULTS.network_gbps,
                       help="Inter-node network per GPU and direction (DGX H100: one 400 Gb/s ConnectX-7 per GPU).")
    group.add_argument("--pcie-gbps", type=float, default=DEFAULTS.pcie_gbps,
                       help="Host<->GPU per GPU and direction (PCIe 5.0 x16).")
    group.add_argument("--host-memory-gbps", type=float, default=DEFAULTS.host_memory_gbps,
                       help="Host memory bandwidth per node, shared by its GPUs' offloaded optimizer steps "
                            "(DGX H100: 2 x 8 channels of DDR5-4800).")
    group.add_argument("--hbm-gbps", type=float, default=DEFAULTS.hbm_gbps, help="GPU memory bandwidth (H100 SXM).")
    group.add_argument("--workload", choices=["orpo", "pretraining"], default="orpo",
                       help="What a step computes. 'orpo': the recipe's capybara-like pairs (--max-length, "
                            "--micro-batch-size and --global-batch-size in pairs). 'pretraining': --global-batch-size "
                            "sequences of exactly --seq-length real tokens, --micro-batch-size sequences per "
                            "micro-batch (the form of published Megatron runs); the step and its throughput only.")
    group.add_argument("--seq-length", type=int, default=None,
                       help="With --workload pretraining: tokens per sequence (Megatron-LM's flag).")
    group.add_argument("--train-pairs", type=int, default=workload.RECIPE_PAIRS,
                       help="Training pairs of the recipe (capybara-7k as the handbook trained on it).")
    group.add_argument("--epochs", type=int, default=workload.RECIPE_EPOCHS, help="Epochs of the recipe.")
    group.add_argument("--max-prompt-length", type=int, default=1792, help="Prompt truncation of the recipe.")
    group.add_argument("--save-interval", type=int, default=None,
                       help="Checkpoint every N steps (the trainer's flag); the run also saves at its end. "
                            "Default: only at the end.")
    group.add_argument("--async-save", action="store_true",
                       help="The trainer's --async-save: a save stalls training only while each GPU copies its "
                            "shard to host memory (at --pcie-gbps), unless the previous save is still writing.")
    group.add_argument("--checkpoint-write-gbps", type=float, default=DEFAULT_CHECKPOINT_WRITE_GBPS,
                       help="File-system write bandwidth of the whole job, GB/s (an assumption: measure your "
                            "file system's, e.g. with IOR). Default: %(default)g.")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse assumptions that cannot be right (exit 2 naming the flag)."""
    if not 0 < args.matmul_efficiency <= 1:
        parser.error(f"--matmul-efficiency must be in (0, 1], got {args.matmul_efficiency}")
    for flag in ("nvlink_gbps", "network_gbps", "pcie_gbps", "host_memory_gbps", "hbm_gbps", "train_pairs", "epochs",
                 "measured_layers", "measured_seq_length", "checkpoint_write_gbps"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    for flag in ("measured_layer_tokens_per_second", "peak_tflops", "save_interval"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    if args.workload == "pretraining" and args.seq_length is None:
        parser.error("--workload pretraining needs --seq-length")
    if args.workload == "orpo" and args.seq_length is not None:
        parser.error("--seq-length is for --workload pretraining; ORPO pairs are cut to --max-length")
    if args.seq_length is not None and args.seq_length < 1:
        parser.error(f"--seq-length must be >= 1, got {args.seq_length}")
    if args.train_pairs < (args.global_batch_size or workload.RECIPE_GLOBAL_BATCH):
        parser.error(f"--train-pairs {args.train_pairs} is less than one global batch")


def hardware(hf: HFModelConfig, args: argparse.Namespace) -> Hardware:
    peak = args.peak_tflops or PEAK_TFLOPS["H100 SXM"]["fp8" if args.fp8 else "bf16"]
    efficiency = args.matmul_efficiency
    if args.measured_layer_tokens_per_second:
        efficiency = matmul_efficiency_from_layer_throughput(
            hf, args.measured_layer_tokens_per_second, args.measured_seq_length, args.measured_layers, peak)
    return Hardware(gpus_per_node=args.gpus_per_node, peak_tflops=peak, matmul_efficiency=efficiency,
                    nvlink_gbps=args.nvlink_gbps, network_gbps=args.network_gbps, pcie_gbps=args.pcie_gbps,
                    host_memory_gbps=args.host_memory_gbps, hbm_gbps=args.hbm_gbps)


def global_batch(args: argparse.Namespace) -> int:
    return args.global_batch_size or workload.RECIPE_GLOBAL_BATCH


def micro_batch_rows(layout: MemoryLayout, args: argparse.Namespace) -> BatchLayout:
    """How the trainer would cut the pairs into rows at `layout` with the flags' packing (`--no-packing`,
    `--packed-length`); ValueError for a packed length the layout cannot use."""
    return batch_layout(args.packing, args.packed_length, layout.parallel, layout.fp8)


def recipe_pairs(args: argparse.Namespace) -> workload.PairLengths:
    return _pairs(args.train_pairs, args.max_length, min(args.max_prompt_length, args.max_length))


@functools.lru_cache(maxsize=8)
def _pairs(num_pairs: int, max_length: int, max_prompt_length: int) -> workload.PairLengths:
    return workload.capybara_like_pairs(num_pairs, max_length=max_length, max_prompt_length=max_prompt_length)


@functools.lru_cache(maxsize=64)
def _steps(pairs: workload.PairLengths, epochs: int, global_batch_size: int, dp: int, micro_batch_size: int,
           batch: BatchLayout) -> workload.StepShapes:
    return workload.recipe_steps(pairs, global_batch_size, dp, micro_batch_size, batch, epochs=epochs)


def pretraining(args: argparse.Namespace) -> bool:
    return args.workload == "pretraining"


def recipe_shapes(layout: MemoryLayout, args: argparse.Namespace) -> workload.StepShapes:
    if pretraining(args):
        return workload.pretraining_steps(global_batch(args), layout.dp, args.micro_batch_size, args.seq_length)
    return _steps(recipe_pairs(args), args.epochs, global_batch(args), layout.dp, args.micro_batch_size,
                  micro_batch_rows(layout, args))


def predict(hf: HFModelConfig, layout: MemoryLayout, args: argparse.Namespace) -> RecipeTime:
    """The recipe's predicted time at `layout` (its optimizer mode and gradient-reduction overlap) under the flags'
    assumptions; with --workload pretraining, one step (no checkpoints)."""
    shapes = recipe_shapes(layout, args)
    settings = RunSettings(overlap_param_gather=args.overlap_param_gather,
                           packed_attention=args.packing or pretraining(args))
    rates = hardware(hf, args)
    step = predict_step_time(hf, layout, shapes, rates, settings)
    steps = shapes.positions.shape[0]
    stall = 0.0 if pretraining(args) else checkpoint_stall(hf, layout, args, rates, step.total, steps).seconds
    return RecipeTime(step, steps=steps, pairs_per_step=global_batch(args), gpus=layout.world_size,
                      checkpoint_seconds=stall)


@dataclasses.dataclass(frozen=True)
class StepThroughput:
    """A predicted step's mean throughput, counted as the trainer counts it: real tokens, and the model FLOPs of
    the real sequences (Megatron-LM's count, `throughput.forward_flops`) per GPU."""

    tokens_per_second_per_gpu: float
    model_tflops_per_gpu: float


def step_throughput(hf: HFModelConfig, layout: MemoryLayout, args: argparse.Namespace,
                    recipe: RecipeTime) -> StepThroughput:
    shapes = recipe_shapes(layout, args)
    steps = shapes.positions.shape[0]
    tokens = float(shapes.real_tokens.sum()) / steps
    attention = CAUSAL_ATTENTION_FRACTION * float(shapes.attention_sequences.sum()) / steps
    vocab = padded_vocab_size(hf.vocab_size, layout.make_vocab_size_divisible_by, layout.tp)
    flops = 3 * forward_flops(hf, tokens, attention, vocab)
    seconds = recipe.step.total * layout.world_size
    return StepThroughput(tokens / seconds, flops / seconds / 1e12)


@dataclasses.dataclass(frozen=True)
class CheckpointStall:
    saves: int
    stored_bytes: float  # one checkpoint: weights, fp32 main params and Adam moments of every parameter
    write_seconds: float  # one checkpoint at --checkpoint-write-gbps
    seconds: float  # the GPUs' wait over the run


def checkpoint_stall(hf: HFModelConfig, layout: MemoryLayout, args: argparse.Namespace, rates: Hardware,
                     step_seconds: float, steps: int) -> CheckpointStall:
    """How long the run waits for its saves (every --save-interval steps and at the end). In place, each save
    stops training for its whole write. With --async-save a save stops training while each GPU copies its share
    to host memory, and the write overlaps the steps until the next save, which waits for what is left of it;
    the run's end waits for the last write."""
    saves = steps // args.save_interval + bool(steps % args.save_interval) if args.save_interval else 1
    mode = layout.optimizer
    per_param = (layout.param_size + DTYPES[mode.main_params_dtype].itemsize + DTYPES[mode.exp_avg_dtype].itemsize
                 + DTYPES[mode.exp_avg_sq_dtype].itemsize)
    stored = total_parameters(hf) * per_param
    write = stored / (args.checkpoint_write_gbps * GBPS)
    if not args.async_save:
        return CheckpointStall(saves, stored, write, saves * write)
    copy_to_host = stored / layout.world_size / (rates.pcie_gbps * GBPS)
    interval = (args.save_interval or steps) * step_seconds
    return CheckpointStall(saves, stored, write, saves * copy_to_host + (saves - 1) * max(0.0, write - interval) + write)


def handbook(args: argparse.Namespace) -> float:
    """The alignment-handbook's pairs/s/GPU for this many pairs and epochs (its 1.33 h on 32 H100)."""
    return RecipeTime.handbook_pairs_per_second_per_gpu(args.train_pairs, args.epochs)


def print_prediction(recipe: RecipeTime, layout: MemoryLayout, args: argparse.Namespace, hf: HFModelConfig) -> None:
    step, rates = recipe.step, hardware(hf, args)
    figures = step_throughput(hf, layout, args, recipe)
    parts = " + ".join(f"{label} {getattr(step, name):.2f}" for name, label in PART_LABELS.items())
    rate = (f"{figures.tokens_per_second_per_gpu:8.0f} tokens/s/GPU, {figures.model_tflops_per_gpu:.0f} TFLOP/s/GPU "
            "(model FLOPs of the real tokens, causal attention half as Megatron-LM counts it)")
    if pretraining(args):
        print(f"predicted step: {recipe.pairs_per_step} sequences of {args.seq_length} tokens, "
              f"{args.micro_batch_size} per micro-batch (--workload pretraining)")
        print(f"  step         {step.total:8.2f} s = {parts}")
        print(f"  per GPU      {rate}")
        print(f"  assumptions  {describe(rates, layout, args)}")
        return
    shapes = recipe_shapes(layout, args)
    rows = micro_batch_rows(layout, args)
    batching = ("padded rows (--no-packing)" if not rows.packing
                else f"packed rows of {workload.packed_length(recipe_pairs(args), rows)}" if rows.fixed_length_rows
                else "packed rows")
    print(f"predicted time: {args.epochs} epochs x {recipe.steps // args.epochs} steps of {recipe.pairs_per_step} "
          f"pairs ({args.train_pairs} capybara-like pairs, {batching}, {100 * shapes.real_token_fraction:.1f}% real "
          "tokens)")
    print(f"  step         {step.total:8.2f} s = {parts}")
    print(f"  per GPU      {rate}")
    ratio = recipe.pairs_per_second_per_gpu / handbook(args)
    print(f"  throughput   {recipe.pairs_per_second_per_gpu:8.3f} pairs/s/GPU; alignment-handbook (Zephyr-141B ORPO) "
          f"{handbook(args):.3f} on 32 H100: {ratio:.2f}x")
    stall = checkpoint_stall(hf, layout, args, rates, step.total, recipe.steps)
    print(f"  checkpoints  {stall.seconds / 60:8.2f} min waiting for {stall.saves} save(s) of "
          f"{stall.stored_bytes / 1e12:.2f} TB ({stall.write_seconds / 60:.1f} min each at "
          f"{args.checkpoint_write_gbps:g} GB/s{', in the background (--async-save)' if args.async_save else ', in place'})")
    print(f"  recipe       {recipe.hours:8.2f} h on {recipe.gpus} GPUs = {recipe.gpu_hours:.1f} GPU-hours; handbook "
          f"{workload.HANDBOOK_SECONDS / 3600:.2f} h on 32 = {workload.HANDBOOK_SECONDS / 3600 * 32:.1f} GPU-hours")
    print(f"  assumptions  {describe(rates, layout, args)}")


PART_LABELS = {"compute": "compute", "tp": "TP", "ep": "EP", "pp": "PP", "ep_wait": "EP wait", "bubble": "bubble",
               "dp": "DP", "optimizer_gpu": "GPU Adam", "host_adam": "host Adam", "pcie": "PCIe"}


def describe(rates: Hardware, layout: MemoryLayout, args: argparse.Namespace) -> str:
    calibrated = " (from the measured layer throughput)" if args.measured_layer_tokens_per_second else ""
    overlap = [flag for flag, on in (("--overlap-grad-reduce", layout.overlap_grad_reduce),
                                     ("--overlap-param-gather", args.overlap_param_gather)) if on]
    return (f"matmul efficiency {rates.matmul_efficiency:.3f}{calibrated} of {rates.peak_tflops:g} TFLOP/s; GB/s: NVLink "
            f"{rates.nvlink_gbps:g}, network {rates.network_gbps:g}, PCIe {rates.pcie_gbps:g} per GPU, host memory "
            f"{rates.host_memory_gbps:g} per {rates.gpus_per_node}-GPU node, HBM {rates.hbm_gbps:g}; "
            + (", ".join(overlap) or "no DP overlap")
            + "; balanced routing"
            + ("" if pretraining(args) else "; pair lengths assumed (orpo_megatron/planning/workload.py)"))


TABLE_HEADER = (f"{'nodes':>5} {'TP':>2} {'PP':>2} {'EP':>2} {'ETP':>3} {'DP':>2} {'recomp':>6} {'offload':>7} {'GiB':>5} | "
                f"{'step s':>6} {'comp':>5} {'comm':>5} {'wait':>5} {'DP':>5} {'optim':>5} | "
                f"{'pairs/s/GPU':>11} {'hours':>6} {'GPU-h':>6} {'x hb':>5}")


def table_row(nodes: int, layout: MemoryLayout, budget_gib: float, recipe: RecipeTime, args: argparse.Namespace
              ) -> str:
    s, offload = recipe.step, layout.optimizer.offload_fraction
    return (f"{nodes:>5} {layout.tp:>2} {layout.pp:>2} {layout.ep:>2} {layout.etp:>3} {layout.dp:>2} "
            f"{'full' if layout.recompute_full else 'none':>6} {offload:>7g} {budget_gib:>5.1f} | "
            f"{s.total:>6.2f} {s.compute:>5.2f} {s.tp + s.ep + s.pp:>5.2f} {s.ep_wait + s.bubble:>5.2f} "
            f"{s.dp:>5.2f} {s.optimizer_gpu + s.host_adam + s.pcie:>5.2f} | "
            f"{recipe.pairs_per_second_per_gpu:>11.3f} {recipe.hours:>6.2f} {recipe.gpu_hours:>6.1f} "
            f"{recipe.pairs_per_second_per_gpu / handbook(args):>5.2f}")
