"""The optimizer: its flags and the data-parallel communication flags (Megatron-LM's names), the modes that work, and
building Megatron-Core's optimizer.

A mode is where the optimizer keeps its state and in which dtypes (`OptimizerMode`). Only these run:
- plain: fp32 main params (copies of bf16 params) and fp32 Adam moments on the GPU, sharded over DP;
- `--use-precision-aware-optimizer` (bf16, GPU with Transformer Engine): TE's FusedAdam keeps main params and
  moments in the dtypes of `--main-params-dtype`, `--exp-avg-dtype`, `--exp-avg-sq-dtype`;
- `--optimizer-cpu-offload --use-precision-aware-optimizer` (bf16): Megatron-Core's HybridDeviceOptimizer
  steps `--optimizer-offload-fraction` of the shard with torch's AdamW on the host and the rest on the GPU,
  both on fp32 copies of the bf16 params (the moment and main-param dtype flags do not apply there).
Offload without the precision-aware optimizer is refused, as Megatron-LM refuses it: Megatron-Core then keeps
every fp32 main param on the GPU (only the moments move) and `reload_model_params()` does not refresh the
offloaded copies, so loaded weights would be lost. What each mode costs in bytes is `planning/memory.py`'s.
Around Megatron-Core's offloading optimizer, `pin_host_copies` (after it is built or loaded) and
`settle_loaded_hybrid_optimizer` (after a load) fix its host copies' pinning, its step count and where its state
lives.
"""
from __future__ import annotations

import argparse
import dataclasses
import math

import torch

# Megatron-LM's dtype names for the precision-aware optimizer ('fp8' is TE's uint8-coded E4M3 state).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.uint8}


@dataclasses.dataclass(frozen=True)
class OptimizerMode:
    """Where the optimizer state lives and in which dtypes (Megatron-LM's flag names, dtypes as their names)."""

    precision_aware: bool = False
    offload_fraction: float = 0.0  # 0: nothing on the host (no --optimizer-cpu-offload)
    main_params_dtype: str = "fp32"
    main_grads_dtype: str = "fp32"
    exp_avg_dtype: str = "fp32"
    exp_avg_sq_dtype: str = "fp32"

    @property
    def offload(self) -> bool:
        return self.offload_fraction > 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "OptimizerMode":
        return cls(precision_aware=args.use_precision_aware_optimizer,
                   offload_fraction=args.optimizer_offload_fraction if args.optimizer_cpu_offload else 0.0,
                   main_params_dtype=args.main_params_dtype, main_grads_dtype=args.main_grads_dtype,
                   exp_avg_dtype=args.exp_avg_dtype, exp_avg_sq_dtype=args.exp_avg_sq_dtype)

    def problems(self, bf16: bool) -> list[str]:
        """What is wrong with this mode for a run with (or without) --bf16, each naming its flags."""
        problems = []
        if not 0.0 <= self.offload_fraction <= 1.0:
            problems.append(f"--optimizer-offload-fraction must be in [0, 1], got {self.offload_fraction}")
        lowered = [f"--{name.replace('_', '-')} {value}" for name, value in self._dtype_flags() if value != "fp32"]
        if self.precision_aware and not bf16:
            problems.append("--use-precision-aware-optimizer needs --bf16 (it manages the fp32 main copies of "
                            "bf16 parameters)")
        if self.offload and not self.precision_aware:
            problems.append("--optimizer-cpu-offload needs --use-precision-aware-optimizer: without it "
                            "Megatron-Core keeps every fp32 main param on the GPU and does not refresh the "
                            "offloaded copies after loading weights (Megatron-LM refuses this combination too)")
        if lowered and not self.precision_aware:
            problems.append(f"{', '.join(lowered)} needs --use-precision-aware-optimizer")
        host_fixed = [flag for flag in lowered if not flag.startswith("--main-grads-dtype")]
        if self.offload and host_fixed:
            problems.append(f"{', '.join(host_fixed)} cannot be used with --optimizer-cpu-offload: the offloaded "
                            "optimizer steps fp32 copies with torch's AdamW (fp32 main params and moments)")
        return problems

    def _dtype_flags(self) -> list[tuple[str, str]]:
        return [("main_params_dtype", self.main_params_dtype), ("main_grads_dtype", self.main_grads_dtype),
                ("exp_avg_dtype", self.exp_avg_dtype), ("exp_avg_sq_dtype", self.exp_avg_sq_dtype)]

    def describe(self) -> str:
        if self.offload:
            return (f"offload {self.offload_fraction:g} to the host (precision-aware, fp32 copies"
                    + (", bf16 main grads)" if self.main_grads_dtype != "fp32" else ")"))
        if self.precision_aware:
            return ("precision-aware (TE FusedAdam): main params " + self.main_params_dtype + ", moments "
                    + f"{self.exp_avg_dtype}/{self.exp_avg_sq_dtype}, main grads {self.main_grads_dtype}")
        return "Adam, fp32 main params and moments on the GPU"

    def needs_transformer_engine(self) -> bool:
        """The precision-aware optimizer without offload is Transformer Engine's FusedAdam."""
        return self.precision_aware and not self.offload


def add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimizer")
    group.add_argument("--optimizer", choices=["adam"], default="adam",
                       help="AdamW (decoupled weight decay). The only choice: Megatron-Core's distributed optimizer, "
                            "which shards the optimizer state over data-parallel ranks, supports only Adam.")
    group.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay. Default: 0.")
    group.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1. Default: 0.9.")
    group.add_argument("--adam-beta2", type=float, default=0.999, help="Adam beta2. Default: 0.999.")
    group.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon. Default: 1e-8.")
    group.add_argument("--clip-grad", type=float, default=1.0, help="Gradient norm clipping (0: off). Default: 1.0.")
    add_optimizer_mode_args(group)


def add_optimizer_mode_args(group) -> None:
    """The flags that choose an `OptimizerMode` (shared with tools/estimate_memory.py)."""
    group.add_argument("--optimizer-cpu-offload", action="store_true",
                       help="Keep part of the optimizer state on the host and step it there with torch's AdamW "
                            "(Megatron-Core's HybridDeviceOptimizer; give each task CPUs). Needs "
                            "--use-precision-aware-optimizer.")
    group.add_argument("--optimizer-offload-fraction", type=float, default=1.0,
                       help="Fraction of the optimizer shard (fp32 main params, moments and a gradient copy) kept "
                            "on the host with --optimizer-cpu-offload. Default: 1.0.")
    group.add_argument("--use-precision-aware-optimizer", action="store_true",
                       help="Let the optimizer own the main params (needs --bf16): on the GPU it is Transformer "
                            "Engine's FusedAdam, with main params and moments in the dtypes below (fp32 main params "
                            "are whole fp32 copies: 4 B/param); with --optimizer-cpu-offload "
                            "it is the host/GPU hybrid optimizer on fp32 copies.")
    group.add_argument("--main-params-dtype", choices=["fp32", "fp16"], default="fp32",
                       help="Precision-aware optimizer: dtype of the main (master) params it updates. Default: fp32.")
    group.add_argument("--main-grads-dtype", choices=["fp32", "bf16"], default="fp32",
                       help="Precision-aware optimizer: dtype of the gradient buffer gradients are accumulated and "
                            "reduced in (bf16 halves it, at the cost of bf16 reductions). Default: fp32.")
    for moment, what in (("exp-avg", "exp_avg, Adam's first moment"), ("exp-avg-sq", "exp_avg_sq, its second")):
        group.add_argument(f"--{moment}-dtype", choices=["fp32", "fp16", "bf16", "fp8"], default="fp32",
                           help=f"Precision-aware optimizer without offload: storage dtype of {what} (the kernel "
                                "computes in fp32; fp8 is scaled E4M3). Default: fp32.")


def add_ddp_args(parser: argparse.ArgumentParser, default: bool | None = None) -> None:
    """The data-parallel communication flags (the trainer's, and the estimator's, which passes the trainer's GPU
    default, on). `default` None: on with a GPU, off on CPU, resolved by `check_ddp_args`."""
    where = "on with a GPU, off on CPU" if default is None else f"{'on' if default else 'off'}, as the trainer on a GPU"
    group = parser.add_argument_group(f"data-parallel communication (default: {where})")
    group.add_argument("--overlap-grad-reduce", action=argparse.BooleanOptionalAction, default=default,
                       help="Reduce-scatter each gradient bucket during the backward pass of the last micro-batch "
                            "instead of after it (buckets of max(40M, 1M x DP) parameters).")
    group.add_argument("--overlap-param-gather", action=argparse.BooleanOptionalAction, default=default,
                       help="All-gather the updated parameters bucket by bucket during the next forward pass "
                            "instead of right after the optimizer step. Needs --overlap-grad-reduce.")
    group.add_argument("--ddp-bucket-size", type=int, default=None,
                       help="Parameters per gradient-reduction bucket with --overlap-grad-reduce. Default: "
                            "Megatron-Core's max(40M, 1M x DP).")


def check_ddp_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Resolve the GPU-dependent defaults and refuse impossible combinations (exit 2 naming the flag)."""
    for flag in ("overlap_grad_reduce", "overlap_param_gather"):
        if getattr(args, flag) is None:
            setattr(args, flag, torch.cuda.is_available())
    if args.overlap_param_gather and not args.overlap_grad_reduce:
        parser.error("--overlap-param-gather needs --overlap-grad-reduce")
    if args.ddp_bucket_size is not None and args.ddp_bucket_size < 1:
        parser.error(f"--ddp-bucket-size must be >= 1, got {args.ddp_bucket_size}")


def validate_optimizer_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, naming the flags, every optimizer mode that does not work here (exit 2 before any work)."""
    mode = OptimizerMode.from_args(args)
    problems = mode.problems(args.bf16)
    if args.optimizer_cpu_offload and args.optimizer_offload_fraction == 0:
        problems.append("--optimizer-offload-fraction 0 offloads nothing; drop --optimizer-cpu-offload instead")
    from orpo_megatron.model import transformer_engine_available  # the model's imports, only when validating

    if not problems and mode.needs_transformer_engine() and not transformer_engine_available():
        problems.append("--use-precision-aware-optimizer without --optimizer-cpu-offload is Transformer Engine's "
                        "FusedAdam and needs a CUDA GPU with transformer-engine installed (pip install "
                        "'orpo-megatron[te]'); or add --optimizer-cpu-offload")
    if problems:
        parser.error("; ".join(problems))


def optimizer_config(args: argparse.Namespace, bf16: bool, params_dtype: torch.dtype):
    """Megatron-Core's OptimizerConfig for the flags' mode (the distributed optimizer, always)."""
    from megatron.core.optimizer import OptimizerConfig

    _allow_precision_aware_config_without_transformer_engine()
    mode = OptimizerMode.from_args(args)
    on_gpu = torch.cuda.is_available()
    return OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
        bf16=bf16, params_dtype=params_dtype, use_distributed_optimizer=True,
        optimizer_cpu_offload=mode.offload, optimizer_offload_fraction=mode.offload_fraction,
        # Pinned host memory needs a CUDA device.
        pin_cpu_grads=on_gpu, pin_cpu_params=on_gpu,
        use_precision_aware_optimizer=mode.precision_aware,
        # TE's FusedAdam then keeps whole fp32 main params: with its 16-bit remainders (megatron-core's default)
        # the fully_reshardable checkpoint holds int16 remainders under "param", and loading an fp32 "param"
        # back asserts in FusedAdam.set_scaled_state (TE 2.9-2.11), so no run could resume.
        store_param_remainders=False,
        main_params_dtype=DTYPES[mode.main_params_dtype], main_grads_dtype=DTYPES[mode.main_grads_dtype],
        exp_avg_dtype=DTYPES[mode.exp_avg_dtype], exp_avg_sq_dtype=DTYPES[mode.exp_avg_sq_dtype],
    )


def build_optimizer(args: argparse.Namespace, model_chunks, bf16: bool, params_dtype: torch.dtype):
    """Megatron-Core's distributed optimizer (chained per parameter kind) in the mode the flags give."""
    from megatron.core.optimizer import get_megatron_optimizer

    optimizer = get_megatron_optimizer(optimizer_config(args, bf16, params_dtype), model_chunks)
    _fuse_torch_adam_on_host(optimizer)
    for hybrid in hybrid_optimizers(optimizer):
        pin_host_copies(hybrid)
    return optimizer


def hybrid_optimizers(optimizer) -> list:
    """The HybridDeviceOptimizer inside each chained distributed optimizer (--optimizer-cpu-offload)."""
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    return [inner.optimizer for inner in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(inner.optimizer, HybridDeviceOptimizer)]


def pin_host_copies(hybrid, pin=None) -> None:
    """Pin the host part's parameters, which the offloading optimizer copies to the GPU after each step.

    megatron-core 0.16.1 pins each host copy and then takes its fp32 copy with `.float()`, a new, pageable tensor
    (`HybridDeviceOptimizer._get_sub_optimizer_param_groups`), so every host-to-device copy is synchronous,
    staged by the driver. Each is replaced in place (`.data`): the optimizer's maps keep their keys. Runs after
    every (re)build of the sub-optimizers: construction and each load of a state dict. `pin` (default
    `Tensor.pin_memory`, which needs CUDA) returns the pinned copy of a tensor; without CUDA nothing is pinned."""
    if pin is None:
        if not torch.cuda.is_available():
            return
        pin = torch.Tensor.pin_memory
    for sub in hybrid.cpu_optimizers:
        for group in sub.param_groups:
            for param in group["params"]:
                if not param.is_pinned():
                    param.data = pin(param.data)


def settle_loaded_hybrid_optimizer(hybrid) -> None:
    """Make a HybridDeviceOptimizer whose state megatron-core 0.16.1 just loaded continue as an uninterrupted one.

    - Step count: the load leaves the saved step in the hybrid's own param groups, which it copies into every
      sub-optimizer's groups before every step (`_sync_hdo_param_groups_to_sub_optimizers`). The device part with
      Transformer Engine is TE's FusedAdam, which keeps its step in its group and adds one per step: reset to the
      loaded step every time, its bias correction would stay that of the first step after the resume. Its group
      already has the loaded step (the load synced it) and torch's Adam keeps a step per parameter, so the step
      leaves the hybrid's groups, torch's sub-optimizers' groups and the per-parameter state of the others (the
      load gives every parameter one), where an uninterrupted run has none.
    - State device: megatron-core puts a sub-optimizer's state on the host when it is of the host part's class
      (`_move_new_state_to_right_device`); without TE or Apex the device part is that class too (torch's AdamW),
      and its fused step would then meet host state. Every tensor goes where its parameter is, as torch keeps it.
    - Host copies: the load rebuilt them, unpinned (`pin_host_copies`).
    """
    for group in hybrid.param_groups:
        group.pop("step", None)
    for sub in hybrid.sub_optimizers:
        per_parameter_step = isinstance(sub, (torch.optim.Adam, torch.optim.AdamW))
        for group in sub.param_groups:
            if per_parameter_step:
                group.pop("step", None)
            else:
                for param in group["params"]:
                    sub.state[param].pop("step", None)
        place_state_beside_params(sub)
    pin_host_copies(hybrid)


def place_state_beside_params(sub_optimizer) -> None:
    """Move each state tensor of a torch optimizer to its parameter's device (in place in the state dicts, which
    the hybrid optimizer shares with its sub-optimizers)."""
    for param, state in sub_optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.device != param.device:
                state[key] = value.to(param.device)


def _fuse_torch_adam_on_host(optimizer) -> None:
    """Without TE or Apex (CPU runs) Megatron-Core steps torch's Adam(W) with its defaults, which off CUDA is a
    Python loop over the parameters, one kernel per operation and tensor: eight passes over the optimizer state
    per step, a fifth of a training step of the benchmark model at world size 1. Its fused kernel makes one pass,
    as Megatron-Core's offloading optimizer already uses it for its host part. The update is the same AdamW in
    fp32, rounded differently (one kernel instead of eight), so weights differ in the last bits from the second
    step on. Only optimizers whose parameters are all on the host: GPU runs (TE's FusedAdam, or torch's own
    choice on CUDA) are unchanged. Resuming keeps this run's param groups (`checkpointing._load_optimizer`)."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if type(inner.optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
            continue
        groups = inner.optimizer.param_groups
        if all(param.device.type == "cpu" for group in groups for param in group["params"]):
            for group in groups:
                group["fused"] = True


@torch.no_grad()
def step_if_finite(optimizer) -> tuple[bool, float]:
    """Megatron-Core's optimizer step (ChainedOptimizer.step: copy grads to the main grads, norm, clip, update),
    except that a gradient whose norm is NaN or inf is not applied: weights, moments and Adam's step count stay
    as they were. Megatron-Core skips only on a grad scaler's found-inf (fp16); with bf16 or fp32 it applies
    non-finite gradients. Returns (applied, grad norm).

    The norm is reduced over every rank and read on the host (`get_grad_norm_fp32` returns a float), so all ranks
    decide alike without another collective. With --clip-grad > 0 Megatron-Core computes this same norm for
    clipping, so the check costs nothing; with --clip-grad 0 it adds the norm's reduction and a host sync."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():  # a grad scaler's found-inf
        return False, float("nan")
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        parameters = [] if getattr(inner, "is_stub_optimizer", False) else inner.get_parameters()
        if parameters and inner.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(parameters, max_norm=inner.config.clip_grad, total_norm=grad_norm,
                                         use_decoupled_grad=inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads()), grad_norm


def grad_reduce_in_fp32(args: argparse.Namespace) -> bool:
    """DDP's gradient buffer dtype: fp32 unless the precision-aware optimizer was given bf16 main grads."""
    return args.main_grads_dtype == "fp32"


def _allow_precision_aware_config_without_transformer_engine() -> None:
    """OptimizerConfig's check of the TE version (for TE's param remainders) fails with a TypeError when TE is
    not installed (megatron-core 0.16.1), although the offloaded precision-aware optimizer does not use TE.
    Without TE, answer that check "older than required", which only turns off TE's remainders (off anyway)."""
    from megatron.core import utils
    from megatron.core.optimizer import optimizer_config

    if utils.get_te_version() is None:
        optimizer_config.is_te_min_version = lambda version, check_equality=True: False
