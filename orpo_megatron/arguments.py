"""Command-line flags shared by the trainer and the evaluator, with Megatron-LM's names.

Owns model/parallel/precision flags and their start-up validation. Data flags live in `data/arguments.py`,
logging flags in `tracking.py`, training-loop flags in `train.py`.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

from orpo_megatron.data.arguments import DataConfig, add_data_args, check_packing_args
from orpo_megatron.errors import ConfigError
from orpo_megatron.model import BackendUnavailableError, check_backend, transformer_engine_available
from orpo_megatron.model_config import PrecisionConfig
from orpo_megatron.objective import LOSS_TYPES, ORPOConfig


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with the flag groups the trainer and the evaluator share (model, parallel, precision,
    objective, data); each adds its own groups."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(parser)
    add_parallel_args(parser)
    add_precision_args(parser)
    add_objective_args(parser)
    add_data_args(parser)
    return parser


def parse_and_validate(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, then check everything that needs no model or process group (exit 2 naming the flag)."""
    args = parser.parse_args(argv)
    validate_common_args(parser, args)
    try:
        DataConfig.from_args(args)
        ORPOConfig.from_args(args, vocab_size=1)  # the loss flags; the vocabulary is the checkpoint's, read later
    except ValueError as err:
        parser.error(str(err))
    return args


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and checkpoint")
    group.add_argument("--load", required=True,
                       help="Checkpoint to start from: the output of `tools/convert_hf.py hf-to-megatron`, a "
                            "training save folder (its newest complete iteration is used), one of its iteration "
                            "folders, or a Megatron-LM torch_dist checkpoint (with --hf-config), at any layout.")
    group.add_argument("--hf-config", default=None,
                       help="For a --load written by Megatron-LM: the Hugging Face folder (or config.json) of its "
                            "model; checked against the checkpoint's stored arguments, and its tokenizer files are "
                            "used unless --tokenizer is given. Checkpoints of this project carry their own.")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                       help="Pad the vocabulary to a multiple of this value times the TP size (Megatron's rule); "
                            "padded rows never enter the softmax. Default: 128.")
    group.add_argument("--moe-aux-loss-coeff", type=float, default=None,
                       help="MoE load-balancing loss coefficient. Default: router_aux_loss_coef of the model's "
                            "config.json (0.001 for Mixtral-8x22B).")
    group.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                       help="Activation recomputation to save memory: 'full' recomputes each layer in backward. "
                            "Default: none.")
    group.add_argument("--seed", type=int, default=1234, help="Random seed for data order and any dropout.")


def add_objective_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("objective (ORPO, or TRL's CPO family)")
    group.add_argument("--loss-type", choices=LOSS_TYPES, default="orpo",
                       help="orpo: NLL + beta * odds-ratio loss. sigmoid (CPO), hinge, ipo, simpo: TRL CPOTrainer's "
                            "reference-free losses, cpo_alpha * NLL + mean pair loss (see README). Default: orpo.")
    group.add_argument("--beta", "--orpo-beta", dest="beta", type=float, default=0.1,
                       help="orpo: weight of the odds-ratio term (TRL ORPOConfig's beta, the paper's lambda; the "
                            "Zephyr-141B recipe uses 0.05). CPO family: the temperature of TRL CPOConfig's beta "
                            "(IPO's tau). Scales the rewards/* metrics. Default: 0.1 for every loss type, as TRL.")
    group.add_argument("--cpo-alpha", type=float, default=None,
                       help="CPO family: weight of the NLL term on the chosen completion (TRL's cpo_alpha; 0 gives "
                            "pure SimPO). Default: 1.0 (TRL's); not accepted with --loss-type orpo.")
    group.add_argument("--simpo-gamma", type=float, default=None,
                       help="simpo: target reward margin gamma (TRL's simpo_gamma; the pair loss is "
                            "-logsigmoid(beta * margin - gamma)). Default: 0.5 (TRL's).")
    group.add_argument("--label-smoothing", type=float, default=0.0,
                       help="sigmoid and simpo: probability that a pair's labels are flipped (TRL's "
                            "label_smoothing, the conservative loss). Default: 0.")
    group.add_argument("--nll-on-prompt", dest="nll_on_prompt", action="store_true", default=None,
                       help="Compute the NLL term on prompt + completion tokens (TRL ORPO's choice; the default "
                            "with --loss-type orpo).")
    group.add_argument("--no-nll-on-prompt", dest="nll_on_prompt", action="store_false",
                       help="Compute the NLL term on completion tokens only (TRL CPO's choice; the default with "
                            "the CPO family).")


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallelism (world size = TP x PP x DP; experts split over EP)")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1, help="Tensor parallel size (TP).")
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="Pipeline parallel size (PP).")
    group.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None,
                       help="Model chunks per pipeline rank for the interleaved 1F1B schedule (VP). Default: none.")
    group.add_argument("--expert-model-parallel-size", type=int, default=1, help="Expert parallel size (EP).")
    group.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                       help="Ranks that split each expert's weights (ETP; Megatron-Core's parallel folding: attention "
                            "at TP, experts at ETP, typically 1 so experts are never split). Default: = TP.")
    group.add_argument("--sequence-parallel", action="store_true",
                       help="Split activations along the sequence over TP ranks. Always on for MoE models with "
                            "TP > 1 (Megatron-Core requires it there).")
    group.add_argument("--moe-token-dispatcher-type", choices=["allgather", "alltoall"], default="alltoall",
                       help="How tokens reach their experts: all-to-all exchange (sends each token only to the EP "
                            "ranks of its experts) or all-gather. Default: alltoall.")
    group.add_argument("--distributed-timeout-minutes", type=int, default=30,
                       help="Timeout of every collective of every process group (world, TP, PP, DP, EP, ...): "
                            "how long a rank waits for the others (e.g. while one saves a checkpoint) before the "
                            "job fails. Default: 30.")


def add_precision_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("precision")
    # No default here (SUPPRESS): `validate_common_args` resolves it for this machine (`resolve_bf16`).
    group.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                       help="bf16 parameters and activations with fp32 main parameters and gradients; --no-bf16: "
                            "fp32 throughout. Default: on with a GPU (how the model is trained), off on CPU.")
    group.add_argument("--fp8-format", choices=["e4m3", "hybrid"], default=None,
                       help="FP8 matmuls through Transformer Engine (needs TE and a Hopper+ GPU): 'e4m3' everywhere "
                            "or 'hybrid' (e4m3 forward, e5m2 gradients). Default: off.")
    group.add_argument("--fp8-recipe", choices=["delayed", "tensorwise"], default="delayed",
                       help="FP8 scaling: 'delayed' (amax history) or 'tensorwise' (current scaling).")
    group.add_argument("--fp8-amax-history-len", type=int, default=1024, help="Delayed scaling amax history length.")
    group.add_argument("--fp8-amax-compute-algo", choices=["max", "most_recent"], default="max",
                       help="How the delayed-scaling amax is taken from its history.")
    group.add_argument("--fp8-margin", type=int, default=0, help="Scaling-factor margin (powers of 2) for FP8.")


def validate_common_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks that need no model: exit with the flag named (argparse's error: usage line, exit code 2)."""
    for flag in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                 "distributed_timeout_minutes"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.expert_tensor_parallel_size is not None and args.expert_tensor_parallel_size < 1:
        parser.error(f"--expert-tensor-parallel-size must be >= 1, got {args.expert_tensor_parallel_size}")
    if args.virtual_pipeline_model_parallel_size is not None and args.virtual_pipeline_model_parallel_size < 1:
        parser.error("--virtual-pipeline-model-parallel-size must be >= 1")
    check_packing_args(parser, args)
    try:
        args.bf16 = resolve_bf16(getattr(args, "bf16", None), args.packing, torch.cuda.is_available(),
                                 transformer_engine_available())
    except ValueError as err:
        parser.error(str(err))
    if args.fp8_format and not args.bf16:
        parser.error("--fp8-format needs --bf16 (FP8 matmuls run inside a bf16 model)")
    try:
        check_backend(args.fp8_format)
    except BackendUnavailableError as err:
        parser.error(str(err))


def resolve_bf16(bf16: bool | None, packing: bool, cuda: bool, transformer_engine: bool) -> bool:
    """The run's precision: --bf16 / --no-bf16 as given, else bf16 with a GPU and fp32 on CPU (exact numbers for
    the CPU tests and demo). fp32 packed rows on the Transformer Engine spec (a GPU with TE) are refused: TE's
    flash and fused attention take only fp16/bf16 and its unfused attention no packed (THD) rows, so the first
    forward would find no attention backend. Pure, so tests can ask about any machine."""
    if bf16 is None:
        return cuda
    if not bf16 and packing and cuda and transformer_engine:
        raise ConfigError("--no-bf16 (fp32) with packed rows (the default) has no attention kernel on the Transformer "
                         "Engine spec (TE attends packed rows only in bf16/fp16): drop --no-bf16, or add "
                         "--no-packing to attend padded rows in fp32")
    return bf16


def check_output_folder(parser: argparse.ArgumentParser, flag: str, folder: str | None,
                        value: str | None = None) -> None:
    """Create `folder` (--`flag`'s value, or the folder of its `value`) and write a file in it, so a run never
    finds out after its work that it cannot keep the result (exit 2 naming the flag, the folder and why). Every
    rank checks: with several nodes each must reach it."""
    if not folder:
        return
    name = f"--{flag.replace('_', '-')} {value or folder}"
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except (FileExistsError, NotADirectoryError):
        parser.error(f"{name}: {_first_file_on_path(folder)} is a file, not a folder")
    except OSError as err:
        parser.error(f"{name}: cannot write there ({err.strerror})")


def _first_file_on_path(path: str) -> str:
    """The first component of `path` that exists and is not a folder."""
    parts = os.path.abspath(path).split(os.sep)
    for end in range(2, len(parts) + 1):
        prefix = os.sep.join(parts[:end])
        if os.path.exists(prefix) and not os.path.isdir(prefix):
            return prefix
    return path


def precision_config(args: argparse.Namespace) -> PrecisionConfig:
    """The numerics the precision flags ask for (trainer and evaluator alike)."""
    return PrecisionConfig(bf16=args.bf16, fp8_format=args.fp8_format, fp8_recipe=args.fp8_recipe,
                           fp8_amax_history_len=args.fp8_amax_history_len,
                           fp8_amax_compute_algo=args.fp8_amax_compute_algo, fp8_margin=args.fp8_margin)

