"""Estimate per-GPU memory and training time of ORPO at a parallel layout, or rank the layouts that fit by time.

    python tools/estimate_memory.py --hf-config CONFIG.json --tp 2 --pp 8 --ep 8 --dp 1 \\
        --micro-batch-size 1 --max-length 2048 [--vp N] [--fp8] [--recompute-granularity full] \\
        [--use-precision-aware-optimizer [--optimizer-cpu-offload --optimizer-offload-fraction F]] \\
        [--exp-avg-dtype bf16 ...] [--no-overlap-grad-reduce --no-overlap-param-gather] [--no-packing] \\
        [--gpu-memory-gb 80] [--matmul-efficiency 0.53]
    python tools/estimate_memory.py --hf-config CONFIG.json --search [--nodes N | --max-nodes 8] --max-length 2048

Prints the busiest rank's weights, gradients, optimizer state and activations and whether they fit, then the
predicted step time by part and the recipe's hours (by default the alignment-handbook's Zephyr-141B ORPO run,
next to its 1.33 h on 32 H100). Memory is `memory.py` (exact for weights, gradients and optimizer state;
activations are a rough formula), time `step_time.py` (exact FLOPs and bytes at assumed rates, see --help).
Sizes are GiB (2**30 bytes). This module is the estimator's flags, its report of the busiest rank and the layout
search; `tools/estimate_memory.py` is its command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys

from orpo_megatron.data.arguments import add_packing_args, check_packing_args
from orpo_megatron.errors import UserError
from orpo_megatron.model_config import HFModelConfig
from orpo_megatron.optimizer import OptimizerMode, add_ddp_args, add_optimizer_mode_args, check_ddp_args
from orpo_megatron.parallel import LayoutError
from orpo_megatron.planning import capacity as capacity_plan
from orpo_megatron.planning.memory import (
    GB, NCCL_COMMUNICATOR_BYTES, MemoryLayout, RankMemory, busiest_rank, communicating_groups,
    optimizer_bytes_per_element,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--hf-config", required=True, help="The model's Hugging Face config.json (or its folder).")
    parser.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1, help="TP size.")
    parser.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1, help="PP size.")
    parser.add_argument("--ep", "--expert-model-parallel-size", dest="ep", type=int, default=1, help="EP size.")
    parser.add_argument("--etp", "--expert-tensor-parallel-size", dest="etp", type=int, default=None,
                        help="Expert TP size. Default: = TP (what the trainer sets up).")
    parser.add_argument("--vp", "--virtual-pipeline-model-parallel-size", dest="vp", type=int, default=None,
                        help="Model chunks per pipeline rank (interleaved 1F1B). Default: none.")
    parser.add_argument("--dp", type=int, default=1, help="Data-parallel size (world = TP x PP x DP).")
    parser.add_argument("--micro-batch-size", type=int, default=1, help="Pairs per micro-batch (2 sequences each).")
    parser.add_argument("--global-batch-size", type=int, default=None,
                        help="Pairs per step; bounds the micro-batches in flight in the pipeline. Default: enough "
                             "to fill the pipeline.")
    parser.add_argument("--max-length", type=int, default=2048, help="Sequence length (tokens) of every sequence.")
    parser.add_argument("--fp32", action="store_true", help="fp32 parameters instead of bf16.")
    parser.add_argument("--fp8", action="store_true",
                        help="FP8 GEMMs (Transformer Engine): fp8 weight copies, fp8 GEMM inputs saved.")
    parser.add_argument("--recompute-granularity", choices=["full"], default=None,
                        help="'full': recompute each layer in backward, keeping only layer inputs.")
    parser.add_argument("--no-flash-attention", action="store_true",
                        help="Count S x S attention scores (the CPU/local spec); GPU runs use flash/TE attention.")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GPU memory in GiB.")
    parser.add_argument("--reserve-gb", type=float, default=6.0,
                        help="Counted for the CUDA context and kernels and the temporaries the breakdown does not "
                             "list (GiB; NCCL's buffers are counted per process group).")
    parser.add_argument("--min-free-gb", type=float, default=4.0,
                        help="GiB the budget must leave free on the GPU, for allocator fragmentation and cuDNN/"
                             "cuBLAS workspaces: a layout fits when its budget is at most --gpu-memory-gb minus "
                             "this. Default: 4.")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (host memory is per node).")
    parser.add_argument("--host-memory-gb", type=float, default=2000.0,
                        help="Host memory per node in GiB, for offloaded optimizer state (DGX H100: 2 TB).")
    parser.add_argument("--activation-safety", type=float, default=1.5,
                        help="Factor on the activation estimate in the fit decision (the rough formula was within "
                             "1.4x of the measured saved tensors on the tiny model).")
    parser.add_argument("--search", action="store_true",
                        help="Try TP/PP/EP/DP and recompute on 1..--max-nodes nodes, each with the least optimizer "
                             "offload that fits (the optimizer flags below without offload, then offload with the "
                             "precision-aware optimizer in steps of 0.05), and rank the layouts that fit by the "
                             "recipe's predicted time.")
    parser.add_argument("--max-nodes", type=int, default=8, help="Largest node count --search tries.")
    parser.add_argument("--nodes", type=int, default=None,
                        help="With --search: only layouts on exactly this many nodes.")
    parser.add_argument("--top", type=int, default=15, help="With --search: layouts listed.")
    parser.add_argument("--json", action="store_true",
                        help="Print one JSON object instead of the report: fits, gib_per_gpu, step_seconds, "
                             "tokens_per_second_per_gpu, model_tflops_per_gpu, step_parts (seconds by part), ...")
    add_optimizer_mode_args(parser.add_argument_group("optimizer mode (the trainer's flags)"))
    add_ddp_args(parser, default=True)
    add_packing_args(parser)
    capacity_plan.add_args(parser)
    args = parser.parse_args(argv)
    for flag in ("tp", "pp", "ep", "dp", "micro_batch_size", "max_length", "gpus_per_node"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    check_ddp_args(parser, args)
    check_packing_args(parser, args)
    capacity_plan.check_args(parser, args)
    if args.search and (args.json or capacity_plan.pretraining(args)):
        parser.error("--search ranks layouts by the ORPO recipe's hours and prints a table; it takes neither "
                     "--json nor --workload pretraining")
    args.bf16 = not args.fp32
    problems = OptimizerMode.from_args(args).problems(args.bf16)
    if problems:
        parser.error("; ".join(problems))
    return args


def with_offload(args: argparse.Namespace, offload: float) -> OptimizerMode:
    """The flags' optimizer mode, or (offload > 0) the offloaded precision-aware mode at that fraction."""
    mode = OptimizerMode.from_args(args)
    if offload == mode.offload_fraction:
        return mode
    if offload == 0:
        return dataclasses.replace(mode, offload_fraction=0.0)
    return OptimizerMode(precision_aware=True, offload_fraction=offload, main_grads_dtype=mode.main_grads_dtype)


def make_layout(args: argparse.Namespace, tp: int, pp: int, ep: int, dp: int, recompute: bool,
                optimizer: OptimizerMode, vp: int | None = None, etp: int | None = None) -> MemoryLayout:
    """The layout of these sizes with the flags' other settings; `etp` None: the flags' --etp."""
    micro_batches = None
    if args.global_batch_size:
        micro_batches = max(1, args.global_batch_size // (args.micro_batch_size * dp))
    return MemoryLayout.planned(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp or args.etp, virtual_pipeline_model_parallel_size=vp, data_parallel_size=dp,
        micro_batch_size=args.micro_batch_size, pairs=not capacity_plan.pretraining(args),
        seq_length=args.seq_length if capacity_plan.pretraining(args) else args.max_length, bf16=args.bf16, fp8=args.fp8,
        recompute_full=recompute, flash_attention=not args.no_flash_attention, optimizer=optimizer,
        overlap_grad_reduce=args.overlap_grad_reduce, ddp_bucket_size=args.ddp_bucket_size,
        num_micro_batches=micro_batches,
    )


def budget_bytes(memory: RankMemory, args: argparse.Namespace) -> float:
    """What the fit decision counts: the estimate with the activation safety factor, plus the reserve."""
    return memory.gpu_bytes + (args.activation_safety - 1) * memory.activation_bytes + args.reserve_gb * GB


def fits_gpu(memory: RankMemory, args: argparse.Namespace) -> bool:
    """The budget leaves --min-free-gb of the GPU free."""
    return budget_bytes(memory, args) <= (args.gpu_memory_gb - args.min_free_gb) * GB


def fits_host(memory: RankMemory, args: argparse.Namespace) -> bool:
    """The offloaded optimizer state of a node's GPUs fits its host memory."""
    return memory.host_bytes * args.gpus_per_node <= args.host_memory_gb * GB


def gib(value: float) -> str:
    return f"{value / GB:8.2f} GiB"


def report(hf: HFModelConfig, layout: MemoryLayout, memory: RankMemory, args: argparse.Namespace) -> bool:
    """Print the busiest rank's breakdown with its arithmetic; True when it fits the GPU and the host."""
    stage = ("first: embedding" if memory.pp_rank == 0 else "") + (
        ("; " if memory.pp_rank == 0 else "") + "last: output layer" if memory.pp_rank == layout.pp - 1 else "")
    edp = layout.expert_data_parallel_size
    print(f"model: {hf.architecture}, {hf.num_layers} layers, hidden {hf.hidden_size}"
          + (f", {hf.num_experts} experts top-{hf.num_experts_per_tok}" if hf.is_moe else ""))
    print(f"layout: TP{layout.tp} PP{layout.pp}" + (f" VP{layout.vp}" if layout.vp > 1 else "")
          + f" EP{layout.ep} ETP{layout.etp} DP{layout.dp} (world {layout.world_size}, expert-DP {edp}); "
          f"micro-batch {layout.micro_batch_size} {'pair(s)' if layout.pairs else 'sequence(s)'} = "
          f"{layout.micro_batch_sequences} x {layout.seq_length} tokens; {'bf16' if layout.bf16 else 'fp32'}{' + fp8' if layout.fp8 else ''}; "
          f"{'full recompute' if layout.recompute_full else 'no recompute'}; optimizer: {layout.optimizer.describe()}")
    print(f"busiest rank: pipeline stage {memory.pp_rank}" + (f" ({stage})" if stage else "")
          + f", {memory.num_params / 1e9:.3f}B parameters on it")
    print(f"  weights      {gib(memory.param_bytes)}   {layout.param_size} B/param in DDP's param buffer"
          + (" + 2 B/param fp8 copies" if layout.fp8 else "") + " (replicated over DP)")
    per_element = optimizer_bytes_per_element(layout.optimizer, layout.bf16)
    print(f"  gradients    {gib(memory.grad_bytes)}   {layout.grad_size} B/param grad buffer (replicated over DP)")
    print(f"  main params  {gib(memory.main_param_bytes)}   {per_element.gpu_main_params:g} B/param of the optimizer "
          f"shard (1/DP={layout.dp}, experts 1/EDP={edp}) on the GPU")
    print(f"  optim. state {gib(memory.optimizer_state_bytes)}   {per_element.gpu_state:g} B/param of the same shard: "
          "Adam moments (+ gradient copies)")
    print(f"  activations  {gib(memory.activation_bytes)}   rough: in-flight micro-batches x layers x per-layer "
          "formula (memory_estimate.layer_activation_bytes) + logits")
    groups = [name for name, size in communicating_groups(layout, hf.is_moe).items() if size > 1]
    print(f"  NCCL         {gib(memory.nccl_bytes)}   {NCCL_COMMUNICATOR_BYTES / 2**20:.0f} MiB per communicator "
          f"x {len(groups)} groups of 2+ ranks ({', '.join(groups) or 'none'})")
    reserve = args.reserve_gb * GB
    print(f"  reserve      {gib(reserve)}   CUDA context, kernels, temporaries")
    print(f"  estimate     {gib(memory.gpu_bytes + reserve)}")
    total = budget_bytes(memory, args)
    fits = fits_gpu(memory, args)
    print(f"  budgeted     {gib(total)}   activations x {args.activation_safety:g}; of {args.gpu_memory_gb:g} GiB, "
          f"{(args.gpu_memory_gb * GB - total) / GB:.2f} free (at least {args.min_free_gb:g} needed): "
          f"{'fits' if fits else 'does NOT fit'}")
    host_fits = fits_host(memory, args)
    if memory.host_bytes:
        per_node = memory.host_bytes * args.gpus_per_node
        print(f"  host         {gib(memory.host_bytes)} per GPU ({per_element.host:g} B/param of the shard: fp32 main "
              f"params, moments, gradient copy), {per_node / GB:.0f} GiB per {args.gpus_per_node}-GPU node of "
              f"{args.host_memory_gb:g} GiB: {'fits' if host_fits else 'does NOT fit'}")
    return fits and host_fits


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def least_offload(hf: HFModelConfig, args: argparse.Namespace, tp: int, pp: int, ep: int, dp: int,
                  recompute: bool, etp: int | None = None) -> OptimizerMode | None:
    """The optimizer mode with the smallest offload fraction (in steps of 0.05) that fits GPU and host; None if
    none does. Offload needs bf16 (the precision-aware optimizer)."""
    for step in range(21 if args.bf16 else 1):
        mode = with_offload(args, step / 20)
        memory = busiest_rank(hf, make_layout(args, tp, pp, ep, dp, recompute, mode, etp=etp))
        if not fits_host(memory, args):
            return None  # more offload only needs more host memory
        if fits_gpu(memory, args):
            return mode
    return None


def expert_tensor_parallel_choices(hf: HFModelConfig, args: argparse.Namespace, tp: int, ep: int) -> list:
    """The expert TP sizes --search tries: --etp when given; else TP and, for experts spread over EP > 1 ranks
    at TP > 1, 1 (parallel folding: each expert whole on its EP rank)."""
    if args.etp:
        return [args.etp]
    return [tp, 1] if hf.is_moe and tp > 1 and ep > 1 else [tp]


def search(hf: HFModelConfig, args: argparse.Namespace) -> int:
    """Every layout that fits on --nodes (or 1..--max-nodes) nodes, each with its least offload, by the recipe's
    predicted hours; then the fastest per node count, and the fastest in full."""
    fits = []
    for nodes in [args.nodes] if args.nodes else range(1, args.max_nodes + 1):
        world = nodes * args.gpus_per_node
        for tp, pp, ep in itertools.product([1, 2, 4, 8], divisors(hf.num_layers), [1, 2, 4, 8] if hf.is_moe else [1]):
            if world % (tp * pp) or tp > args.gpus_per_node or pp > world:
                continue
            dp = world // (tp * pp)
            if capacity_plan.global_batch(args) % (args.micro_batch_size * dp):
                continue
            for etp, recompute in itertools.product(expert_tensor_parallel_choices(hf, args, tp, ep), (False, True)):
                try:
                    mode = least_offload(hf, args, tp, pp, ep, dp, recompute, etp)
                except LayoutError:
                    break
                if mode is None:
                    continue
                layout = make_layout(args, tp, pp, ep, dp, recompute, mode, etp=etp)
                memory = busiest_rank(hf, layout)
                try:
                    recipe = capacity_plan.predict(hf, layout, args)
                except ValueError:  # rows the trainer would refuse at this layout (e.g. --packed-length vs TP)
                    continue
                fits.append((recipe.hours, world, nodes, layout, memory, recipe))
    where = f"{args.nodes}" if args.nodes else f"1-{args.max_nodes}"
    if not fits:
        print(f"no layout fits on {where} nodes of {args.gpus_per_node} x {args.gpu_memory_gb:g} GiB", file=sys.stderr)
        return 1
    fits.sort(key=lambda fit: fit[:2])

    def row(fit) -> str:
        _, _, nodes, layout, memory, recipe = fit
        return capacity_plan.table_row(nodes, layout, budget_bytes(memory, args) / GB, recipe, args)

    print(f"{len(fits)} layouts fit on {where} nodes of {args.gpus_per_node} x {args.gpu_memory_gb:g} GiB "
          f"({args.reserve_gb:g} GiB reserve and NCCL's buffers counted, {args.min_free_gb:g} GiB left free, "
          f"{args.host_memory_gb:g} GiB host per node), fastest first; seconds "
          "per step: compute, comm = TP + EP + PP, wait = EP wait + bubble, DP, optim = GPU Adam + host Adam + "
          "PCIe; x hb = pairs/s/GPU over the alignment-handbook's:")
    print(capacity_plan.TABLE_HEADER)
    for fit in fits[:args.top]:
        print(row(fit))
    print("\nfastest on each node count:")
    print(capacity_plan.TABLE_HEADER)
    for nodes in sorted({fit[2] for fit in fits}):
        print(row(next(fit for fit in fits if fit[2] == nodes)))
    _, _, nodes, layout, memory, recipe = fits[0]
    print(f"\nfastest: {nodes} node(s)")
    report(hf, layout, memory, args)
    capacity_plan.print_prediction(recipe, layout, args, hf)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        hf = HFModelConfig.from_file(args.hf_config)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.search:
        return search(hf, args)
    layout = make_layout(args, args.tp, args.pp, args.ep, args.dp, args.recompute_granularity == "full",
                         OptimizerMode.from_args(args), args.vp)
    try:
        memory = busiest_rank(hf, layout)
    except UserError as err:
        print(f"error: invalid layout for {args.hf_config}: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(estimate_json(hf, layout, memory, args)))
        return 0
    report(hf, layout, memory, args)
    try:
        recipe = capacity_plan.predict(hf, layout, args)
    except ValueError as err:  # e.g. a global batch the layout's DP size does not divide
        print(f"predicted time: not available ({err})")
        return 0
    capacity_plan.print_prediction(recipe, layout, args, hf)
    return 0


def estimate_json(hf: HFModelConfig, layout: MemoryLayout, memory: RankMemory, args: argparse.Namespace) -> dict:
    """The report as one object: the busiest rank's memory and fit, and the predicted step by part (None where
    the prediction is not available, with the reason)."""
    result = {
        "workload": args.workload, "world_size": layout.world_size,
        "layout": {"tp": layout.tp, "pp": layout.pp, "vp": layout.vp, "ep": layout.ep, "etp": layout.etp,
                   "dp": layout.dp, "micro_batch_size": layout.micro_batch_size, "seq_length": layout.seq_length,
                   "recompute": "full" if layout.recompute_full else None,
                   "optimizer": layout.optimizer.describe()},
        "fits": fits_gpu(memory, args) and fits_host(memory, args),
        "gib_per_gpu": (memory.gpu_bytes + args.reserve_gb * GB) / GB,
        "budget_gib": budget_bytes(memory, args) / GB,
        "host_gib_per_gpu": memory.host_bytes / GB,
        "step_seconds": None, "tokens_per_second_per_gpu": None, "model_tflops_per_gpu": None, "step_parts": None,
    }
    try:
        recipe = capacity_plan.predict(hf, layout, args)
    except ValueError as err:
        result["time_not_available"] = str(err)
        return result
    figures = capacity_plan.step_throughput(hf, layout, args, recipe)
    result.update(step_seconds=recipe.step.total, tokens_per_second_per_gpu=figures.tokens_per_second_per_gpu,
                  model_tflops_per_gpu=figures.model_tflops_per_gpu,
                  step_parts=dataclasses.asdict(recipe.step))
    if not capacity_plan.pretraining(args):
        result.update(recipe_hours=recipe.hours, pairs_per_second_per_gpu=recipe.pairs_per_second_per_gpu)
    return result

