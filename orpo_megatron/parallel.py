"""Parallel launch: the layout (TP/PP/VP/EP/DP), its validation, and process-group initialization.

One entry, `initialize()`, starts torch.distributed from torchrun's environment, SLURM's (so a bare
`srun python -m ...` works) or, with neither, as a single process; then Megatron's parallel state and RNG.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import random
import re
import socket

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from orpo_megatron import cpu_backend
from orpo_megatron.errors import ConfigError, UserError
from orpo_megatron.model_config import HFModelConfig


class LayoutError(UserError, ValueError):
    """A parallel layout that cannot work, with the numbers that make it so."""


class LaunchError(UserError, ValueError):
    """A launch environment the run must not start in, with the variable to set."""


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    """How the model and data are split over `world_size` processes (Megatron-LM's flag names)."""

    world_size: int = 1
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None  # None: = TP (Megatron-Core's default)
    sequence_parallel: bool = False

    @classmethod
    def from_args(cls, args, world_size: int, is_moe: bool) -> "ParallelLayout":
        """The layout the parallel flags ask for on `world_size` processes."""
        sizes = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls)
                 if field.name not in ("world_size", "sequence_parallel")}
        return cls(world_size=world_size, **sizes,
                   sequence_parallel=sequence_parallel(args.sequence_parallel, args.tensor_model_parallel_size, is_moe))

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    @property
    def expert_tensor_parallel(self) -> int:
        """How many ranks split each expert (ETP): TP unless set apart (Megatron-Core's parallel folding)."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    @property
    def expert_data_parallel_size(self) -> int:
        """Replicas of each expert: the ranks of a pipeline stage over ETP x EP."""
        return self.world_size // (self.pipeline_model_parallel_size * self.expert_tensor_parallel
                                   * self.expert_model_parallel_size)

    def transformer_config_kwargs(self) -> dict:
        """The layout's fields `model_config.build_transformer_config` takes."""
        return {name: value for name, value in dataclasses.asdict(self).items() if name != "world_size"}

    def describe(self) -> str:
        vp, etp = self.virtual_pipeline_model_parallel_size, self.expert_tensor_parallel
        return (
            f"world={self.world_size} TP={self.tensor_model_parallel_size} "
            f"PP={self.pipeline_model_parallel_size}{f' VP={vp}' if vp else ''} "
            f"EP={self.expert_model_parallel_size}{f' ETP={etp}' if etp != self.tensor_model_parallel_size else ''}"
            f" DP={self.data_parallel_size}{' SP' if self.sequence_parallel else ''}"
        )

    def validate(self, model: HFModelConfig) -> None:
        """Raise LayoutError naming the numbers when this layout cannot hold `model`."""
        tp, pp, ep = (
            self.tensor_model_parallel_size,
            self.pipeline_model_parallel_size,
            self.expert_model_parallel_size,
        )
        etp = self.expert_tensor_parallel
        vp = self.virtual_pipeline_model_parallel_size
        problems = []
        for flag, value in (("tensor-model", tp), ("pipeline-model", pp), ("expert-model", ep), ("expert-tensor", etp)):
            if value < 1:
                problems.append(f"--{flag}-parallel-size={value} must be >= 1")
        if problems:
            raise LayoutError("; ".join(problems))
        if self.world_size % (tp * pp):
            problems.append(
                f"world size {self.world_size} is not divisible by TP*PP = {tp}*{pp} = {tp * pp}"
            )
        # Experts are split over EP groups carved out of the (expert-TP x EP) ranks of each pipeline stage.
        elif self.world_size % (etp * ep * pp):
            name = "TP" if etp == tp else "ETP"
            problems.append(
                f"world size {self.world_size} is not divisible by {name}*EP*PP = {etp}*{ep}*{pp} = {etp * ep * pp}"
            )
        if model.num_attention_heads % tp:
            problems.append(f"{model.num_attention_heads} attention heads are not divisible by TP={tp}")
        if model.num_key_value_heads % tp:
            problems.append(f"{model.num_key_value_heads} key/value groups are not divisible by TP={tp}")
        if model.is_moe:  # experts are split by ETP, a shared expert (a dense MLP) by TP
            if model.expert_intermediate_size % etp:
                problems.append(f"expert FFN size {model.expert_intermediate_size} is not divisible by "
                                f"{'ETP' if etp != tp else 'TP'}={etp}")
            if model.shared_expert_intermediate_size and model.shared_expert_intermediate_size % tp:
                problems.append(f"shared expert FFN size {model.shared_expert_intermediate_size} is not divisible "
                                f"by TP={tp}")
        elif model.intermediate_size % tp:
            problems.append(f"FFN size {model.intermediate_size} is not divisible by TP={tp}")
        if self.expert_tensor_parallel_size is not None and etp != tp and not model.is_moe:
            problems.append(f"--expert-tensor-parallel-size={etp} needs a mixture-of-experts model; "
                            f"{model.architecture} is dense")
        elif etp != tp and ep == 1:
            # megatron-core 0.16.1 marks experts expert-parallel (gradients reduced over the expert-data-parallel
            # group) only when EP > 1; otherwise over the dense DP group, which misses the TP ranks sharing them.
            problems.append(f"--expert-tensor-parallel-size={etp} apart from TP={tp} needs "
                            "--expert-model-parallel-size > 1 (megatron-core 0.16.1 would reduce the experts' "
                            "gradients over the wrong ranks)")
        if ep > 1 and not model.is_moe:
            problems.append(f"EP={ep} needs a mixture-of-experts model; {model.architecture} is dense")
        if model.is_moe and model.num_experts % ep:
            problems.append(f"{model.num_experts} experts are not divisible by EP={ep}")
        if vp is not None:
            if pp < 2:
                problems.append(f"VP={vp} needs PP > 1 (got PP={pp})")
            if model.num_layers % (pp * vp):
                problems.append(f"{model.num_layers} layers are not divisible by PP*VP = {pp}*{vp} = {pp * vp}")
        elif model.num_layers % pp:
            problems.append(f"{model.num_layers} layers are not divisible by PP={pp}")
        if self.sequence_parallel and tp == 1:
            problems.append("--sequence-parallel needs TP > 1")
        if problems:
            raise LayoutError("invalid parallel layout: " + "; ".join(problems))


def sequence_parallel(requested: bool, tensor_model_parallel_size: int, is_moe: bool) -> bool:
    """Whether activations are split along the sequence over TP ranks: as --sequence-parallel asks, and always for
    MoE with TP > 1 (Megatron-Core requires it there)."""
    return requested or (is_moe and tensor_model_parallel_size > 1)


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list, as `scontrol show hostnames` gives it: 'gpu[003-005,010],login1' ->
    'gpu003', 'node[01-04]-ib' -> 'node01-ib', 'rack[1-2]-gpu[01-08]' -> 'rack1-gpu01'."""
    # The first entry ends at the first comma outside brackets; each bracket of it contributes its first value.
    first = re.match(r"(?:[^,\[\]]|\[[^\[\]]+\])+", nodelist.strip())
    if not first:
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r} is not a SLURM node list")
    return re.sub(r"\[([^,\-\]]+)[^\]]*\]", r"\1", first.group(0))


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(environ: dict | None = None) -> LaunchEnv:
    """Rank, world and rendezvous from torchrun (RANK...), else SLURM (SLURM_PROCID...), else one process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            # Jobs sharing a node must not share a port; derive one from the job id unless given.
            master_port=int(env.get("MASTER_PORT", 20000 + job_id % 20000)),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port(), "single")


def cuda_device_index(local_rank: int, visible_devices: int) -> int:
    """This process's GPU among those it sees: its local rank, modulo the visible count, since per-task binding
    (`srun --gpus-per-task=1`, `--gpu-bind`) shows each task only its own device, as index 0."""
    return local_rank % visible_devices


def connections_problem(tensor_model_parallel_size: int, compute_capability_major: int | None,
                        environ: dict | None = None) -> str | None:
    """Why this process must not start, where Megatron-LM refuses it (`megatron/training/arguments.py`, core_v0.16.1,
    ~927-953): TP > 1 on a GPU before Blackwell (compute capability < 10) needs CUDA_DEVICE_MAX_CONNECTIONS=1, so
    tensor-parallel communication is queued before the compute that depends on it (one hardware queue)."""
    env = os.environ if environ is None else environ
    value = env.get("CUDA_DEVICE_MAX_CONNECTIONS")
    if (compute_capability_major is None or compute_capability_major >= 10 or tensor_model_parallel_size < 2
            or value == "1"):
        return None
    return (f"CUDA_DEVICE_MAX_CONNECTIONS={value or '(unset)'}: with --tensor-model-parallel-size "
            f"{tensor_model_parallel_size} on a GPU of compute capability {compute_capability_major}.x set "
            "CUDA_DEVICE_MAX_CONNECTIONS=1 in the launching environment (as Megatron-LM requires)")


def initialize(layout: ParallelLayout | dict, model: HFModelConfig, seed: int = 1234,
               timeout_minutes: int = 30) -> ParallelLayout:
    """Start torch.distributed and Megatron's parallel state; return the validated layout.

    `layout`: a ParallelLayout (its world size must be the launch's), or its fields but the world size (a test's
    or a tool's fixed split). The layout and the launch environment are checked before any process group exists,
    so a wrong one fails fast on every rank with the same message. Every process group (the world's and each of
    Megatron's) gets `timeout_minutes`.
    """
    launch = launch_env()
    if isinstance(layout, dict):
        layout = ParallelLayout(world_size=launch.world_size, **layout)
    elif layout.world_size != launch.world_size:
        raise LaunchError(f"the layout is for {layout.world_size} processes; this launch has {launch.world_size}")
    layout.validate(model)
    on_cpu = cpu_backend.activate()
    if not on_cpu:
        problem = connections_problem(layout.tensor_model_parallel_size, torch.cuda.get_device_capability()[0])
        if problem:
            raise LaunchError(problem)
    if not dist.is_initialized():
        if not on_cpu:
            torch.cuda.set_device(cuda_device_index(launch.local_rank, torch.cuda.device_count()))
        dist.init_process_group(
            backend="gloo" if on_cpu else "nccl",
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=layout.expert_model_parallel_size,
        expert_tensor_parallel_size=layout.expert_tensor_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    # Megatron-Core 0.16.1 creates its expert-data-parallel gloo groups without the timeout; set it on all.
    parallel_state.update_pg_timeout(datetime.timedelta(minutes=timeout_minutes))
    # Python's and numpy's generators too, as Megatron-LM seeds them: their states are saved with every checkpoint
    # (Megatron-LM's rng_state), which is then the same for the same run.
    random.seed(seed)
    np.random.seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return layout


def launch_summary() -> str:
    """One start-up line on how this process was launched for speed: threads, CPU cores, CUDA connections.

    A task given too few cores (srun without -c: since Slurm 22.05 it does not inherit --cpus-per-task) shows
    here as "1 CPU core"; the offloaded optimizer steps on those cores.
    """
    return (f"launch: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
            f"{len(os.sched_getaffinity(0))} CPU core(s) for this task, "
            f"CUDA_DEVICE_MAX_CONNECTIONS={os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS') or 'unset'}")


def is_logging_rank() -> bool:
    """The one rank that prints and logs metrics: the first rank of the last pipeline stage, which holds them."""
    return (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )


def destroy() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
