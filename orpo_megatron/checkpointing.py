"""Training checkpoints: iteration folders that resume exactly, a `latest` pointer, retention, and resolution.

A training checkpoint directory (`--save`) looks like Megatron-LM's:

    SAVE/latest_checkpointed_iteration.txt    the newest COMPLETE iteration (written last, atomically)
    SAVE/iter_0000006/                         model weights in the layout-free format of `checkpoint_format`
        train_state.json                       iteration, consumed pairs, data-iterator and LR-scheduler state,
                                               parallel layout, arguments
        optimizer/rank_00003.pt                per rank: optimizer state, RNG states

An iteration is written under a hidden `.iter_0000006.partial` name and renamed only when every rank has
finished, so a crash or a kill during a save never leaves a folder that looks complete, and the pointer never
names a partial one. Model weights load at any TP/PP/EP/VP layout. Optimizer state is Megatron's
`dp_reshardable` per-rank state: it resumes at the same layout only; at another layout the run starts with fresh
optimizer state and says so at start-up.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

from orpo_megatron import checkpoint_format

TRACKER_FILE = "latest_checkpointed_iteration.txt"
TRAIN_STATE_FILE = "train_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, naming the path and what was expected."""


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def latest_iteration(save_dir: str) -> int | None:
    """The newest complete iteration recorded in `save_dir`, or None when it holds no training checkpoint."""
    tracker = os.path.join(save_dir, TRACKER_FILE)
    if not os.path.isfile(tracker):
        return None
    text = open(tracker, encoding="utf-8").read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text!r}")
    iteration = int(text)
    if not os.path.isdir(iteration_dir(save_dir, iteration)):
        raise CheckpointError(f"{tracker} names iteration {iteration}, but {iteration_dir(save_dir, iteration)} is missing")
    return iteration


@dataclasses.dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where to read model weights from, and the training state when resuming a training run."""

    weights_dir: str
    train_state: dict | None  # None: a converted checkpoint (fresh training)

    @property
    def iteration(self) -> int:
        return self.train_state["iteration"] if self.train_state else 0


def resolve(path: str) -> ResolvedCheckpoint:
    """A converted checkpoint folder, a training iteration folder, or a training directory (its latest)."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    iteration = latest_iteration(path)
    if iteration is not None:
        path = iteration_dir(path, iteration)
    if not os.path.isfile(os.path.join(path, checkpoint_format.METADATA_FILE)):
        raise CheckpointError(
            f"{path}: not a checkpoint (no {checkpoint_format.METADATA_FILE} and no {TRACKER_FILE}); expected the "
            "output of `tools/convert_hf.py hf-to-megatron` or a training checkpoint directory"
        )
    state_file = os.path.join(path, TRAIN_STATE_FILE)
    train_state = json.load(open(state_file, encoding="utf-8")) if os.path.isfile(state_file) else None
    return ResolvedCheckpoint(path, train_state)


# ------------------------------------------------------------------------------------------- optimizer
def _optimizers(optimizer) -> list:
    """Megatron chains one distributed optimizer per parameter kind (dense, experts)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _optimizer_state(optimizer) -> list[dict]:
    states = []
    for inner in _optimizers(optimizer):
        param_state = inner.get_parameter_state_dp_reshardable()
        # The loader skips bucket padding entries by this flag, which the getter does not set.
        for key, per_dtype in param_state.items():
            if isinstance(key, int):
                for buckets in per_dtype.values():
                    for bucket in buckets:
                        for entry in bucket:
                            entry.setdefault("padding", False)
        states.append({"state_dict": inner.state_dict(), "param_state": param_state})
    return states


def _load_optimizer_state(optimizer, states: list[dict]) -> None:
    inners = _optimizers(optimizer)
    if len(inners) != len(states):
        raise CheckpointError(f"optimizer has {len(inners)} parts but the checkpoint {len(states)}")
    for inner, state in zip(inners, states):
        inner.load_state_dict(state["state_dict"])
        # It copies in place into main parameters that are leaves requiring grad, which autograd refuses
        # ("a view of a leaf Variable that requires grad is being used in an in-place operation").
        with torch.no_grad():
            inner.load_parameter_state_from_dp_reshardable(state["param_state"])
        if isinstance(inner.optimizer, HybridDeviceOptimizer):
            # Offloaded: its sub-optimizers do not see the state tensors just set, and its load ran a step on
            # random gradients (`dummy_step`) that moved the model params; restore both from the loaded state.
            inner.optimizer._sync_hdo_state_to_sub_optimizers()
            for param, main_param in inner.optimizer.param_to_fp32_param.items():
                param.data.copy_(main_param)
        _unshare_adam_steps(inner)


def _unshare_adam_steps(inner) -> None:
    """Megatron-Core's load_state_dict on the torch-optimizer path (no Apex/TE) gives every parameter the same
    `step` tensor, and torch's Adam increments each parameter's step in place: a shared one would advance once
    per parameter per iteration and break Adam's bias correction after a resume. Give each its own copy."""
    for param_state in getattr(inner.optimizer, "state", {}).values():
        if torch.is_tensor(param_state.get("step")):
            param_state["step"] = param_state["step"].clone()


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


# ----------------------------------------------------------------------------------------------- save
def save(save_dir: str, iteration: int, model_chunks, optimizer, scheduler, train_state: dict, hf_config,
         hf_files_from: str, keep_last: int | None = None) -> str:
    """Write iteration `iteration` (collective), with the tokenizer files of `hf_files_from` (the checkpoint the
    run started from). Returns the final folder."""
    rank = dist.get_rank()
    final = iteration_dir(save_dir, iteration)
    partial = os.path.join(save_dir, f".{os.path.basename(final)}.partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(os.path.join(partial, "optimizer"))
    dist.barrier()
    checkpoint_format.save_model_weights(partial, model_chunks, hf_config, hf_files_from=hf_files_from,
                                         iteration=iteration, produced_by="orpo_megatron.train")
    torch.save({"optimizer": _optimizer_state(optimizer), "rng": _rng_state()},
               os.path.join(partial, "optimizer", f"rank_{rank:05d}.pt"))
    if rank == 0:
        state = dict(train_state, iteration=iteration, scheduler=scheduler.state_dict())
        with open(os.path.join(partial, TRAIN_STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2, default=str)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(partial, final)
        tmp = os.path.join(save_dir, f".{TRACKER_FILE}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(str(iteration))
        os.replace(tmp, os.path.join(save_dir, TRACKER_FILE))
        if keep_last:
            _prune(save_dir, keep_last)
    dist.barrier()
    return final


def _prune(save_dir: str, keep_last: int) -> None:
    iterations = sorted(int(name[5:]) for name in os.listdir(save_dir)
                        if name.startswith("iter_") and name[5:].isdigit())
    for old in iterations[:-keep_last]:
        shutil.rmtree(iteration_dir(save_dir, old), ignore_errors=True)


# ----------------------------------------------------------------------------------------------- load
def load(checkpoint: ResolvedCheckpoint, model_chunks, optimizer, scheduler, hf_config, layout_description: str,
         log=print) -> dict | None:
    """Load weights (any layout) and, when resuming at the same layout, optimizer, scheduler and RNG state.

    Returns the training state to resume from, or None when starting fresh from converted weights.
    """
    checkpoint_format.load_model_weights(checkpoint.weights_dir, model_chunks, hf_config)
    state = checkpoint.train_state
    if state is None:
        # The optimizer copied its fp32 main params from the freshly initialized bf16 weights when it was built;
        # without this refresh the first step would overwrite the loaded weights with that initialization.
        optimizer.reload_model_params()
        return None
    scheduler.load_state_dict(state["scheduler"])
    saved_layout = state.get("layout")
    if saved_layout != layout_description:
        log(f"WARNING: {checkpoint.weights_dir} was saved at layout [{saved_layout}] and is loaded at "
            f"[{layout_description}]: weights are resharded, but Megatron-Core cannot reshard this optimizer "
            "state, so Adam moments start from zero.")
        optimizer.reload_model_params()
        return state
    rank_file = os.path.join(checkpoint.weights_dir, "optimizer", f"rank_{dist.get_rank():05d}.pt")
    if not os.path.isfile(rank_file):
        raise CheckpointError(f"{rank_file}: missing optimizer state for this rank")
    saved = torch.load(rank_file, weights_only=False)
    _load_optimizer_state(optimizer, saved["optimizer"])
    _set_rng_state(saved["rng"])
    return state

