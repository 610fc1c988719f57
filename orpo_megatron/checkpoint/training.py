"""Training checkpoints: iterations that resume exactly, keep their Adam state at any layout, and that
Megatron-LM resumes too; the `latest` pointer, retention, and resolving what `--load` names.

A training save folder (`--save`) is a Megatron-LM checkpoint root (folder format: `format.py`):

    SAVE/latest_checkpointed_iteration.txt    the newest COMPLETE iteration (written last, atomically)
    SAVE/iter_0000006/                         one Megatron-LM torch_dist checkpoint with
        model                                  `GPTModel.sharded_state_dict()` (any layout loads it)
        optimizer                              Adam's fp32 main params and moments per model key
                                               (`optimizer.state.{param,exp_avg,exp_avg_sq}.<key>`, Megatron's
                                               fully_reshardable form; the step count in common.pt's param groups)
        opt_param_scheduler, args, iteration   in common.pt, where Megatron-LM reads them
        rng_state                              Megatron-LM's: per (PP, TP) rank, with the states of every DP rank
        train_state.json                       ours: data position (epoch, consumed pairs), layout, our flags
        hf_files/                              config.json and tokenizer of the model

An iteration is written (in place, or in the background with `--async-save`: `Saver`) under a hidden
`.iter_0000006.partial` name and renamed only when every rank has finished, so a crash or a kill during a save
never leaves a folder that looks complete, and the pointer never names a partial one. Resuming at the same layout
is exact; at another TP / PP / EP / DP layout the weights and the optimizer state (moments, main params, step)
reshard and only the RNG state (dropout is off) starts anew.
Optimizer state is read into host memory and copied into the optimizer's own buffers (no second GPU copy).
A converted or Megatron-LM checkpoint without our train_state.json starts a new run from its weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing import ShardedObject
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.optimizer import distrib_optimizer
from torch.distributed.checkpoint.api import CheckpointException

from orpo_megatron import optimizer as optimizers
from orpo_megatron.checkpoint import format as fmt
from orpo_megatron.checkpoint import weights as checkpoint_weights
from orpo_megatron.checkpoint import writer as checkpoint_writer

TRAIN_STATE_FILE = "train_state.json"
FULL_DISK_BYTES = 16 * 2**20  # a failed save with less free than this ran out of space
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable",
                    "distrib_optim_fully_reshardable_mem_efficient": False}


def iteration_dir(save_dir: str, iteration: int) -> str:
    return fmt.iteration_dir(save_dir, iteration)


def latest_iteration(save_dir: str) -> int | None:
    """The newest complete iteration recorded in `save_dir`, or None when it holds no training checkpoint."""
    tracked = fmt.read_tracker(save_dir)
    if tracked == fmt.RELEASE:
        raise fmt.CheckpointError(f"{save_dir} holds converted weights (`release`), not a training run: give --save a "
                                  "folder of its own and pass the converted checkpoint as --load")
    return tracked


@dataclasses.dataclass(frozen=True)
class ResolvedCheckpoint:
    """The checkpoint folder to load, its model, and the training state when resuming a run of ours."""

    info: fmt.CheckpointInfo
    train_state: dict | None  # None: converted or Megatron-LM weights (a new run starts from them)

    @property
    def folder(self) -> str:
        return self.info.folder

    @property
    def hf(self):
        return self.info.hf

    @property
    def hf_files(self) -> str:
        return self.info.hf_files


def resolve(path: str, hf_config: str | None = None) -> ResolvedCheckpoint:
    """A checkpoint root (its tracker's folder), or a checkpoint folder: ours (converted or trained) or
    Megatron-LM's, the latter with `hf_config` describing its model. Errors name the path and the problem."""
    try:
        info = fmt.describe(path, hf_config)
    except fmt.CheckpointError as err:
        raise fmt.CheckpointError(str(err) + _older_complete(path)) from None
    state_file = os.path.join(info.folder, TRAIN_STATE_FILE)
    train_state = None
    if os.path.isfile(state_file):
        with open(state_file, encoding="utf-8") as f:
            train_state = json.load(f)
    return ResolvedCheckpoint(info, train_state)


def _older_complete(root: str) -> str:
    """Where a save folder whose tracked iteration is damaged still has a complete one, as advice to append."""
    try:
        tracked = fmt.read_tracker(root)
    except fmt.CheckpointError:
        tracked = None
    if not isinstance(tracked, int):
        return ""
    older = sorted((int(name[5:]) for name in os.listdir(root)
                    if name.startswith("iter_") and name[5:].isdigit() and int(name[5:]) < tracked), reverse=True)
    for iteration in older:
        try:
            fmt.checkpoint_folder(iteration_dir(root, iteration))
        except fmt.CheckpointError:
            continue
        return (f". The newest complete older checkpoint is {iteration_dir(root, iteration)}: to resume from it, "
                f"write {iteration} into {os.path.join(root, fmt.TRACKER_FILE)}")
    return f". {root} holds no complete older iteration"


# ------------------------------------------------------------------------------------------- optimizer
def _optimizers(optimizer) -> list:
    """Megatron chains one distributed optimizer per parameter kind (dense, experts)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _torch_adam(inner) -> bool:
    """The path without Apex or TE (CPU, or a GPU without TE): torch's Adam keeps a `step` per parameter."""
    return not distrib_optimizer.HAVE_APEX_OR_TE and isinstance(inner.optimizer, torch.optim.Optimizer) \
        and not _offloaded(inner)


def _offloaded(inner) -> bool:
    """Megatron-core's HybridDeviceOptimizer (--optimizer-cpu-offload): torch's AdamW on host and device copies."""
    return isinstance(inner.optimizer, distrib_optimizer.HybridDeviceOptimizer)


def _ensure_adam_state(optimizer) -> None:
    """Megatron-core builds the loading state dict from `state_dict()`, which on the torch-Adam path asserts one
    `step` over all parameters' state; a fresh optimizer has none yet, so give it its (dummy, overwritten) state."""
    for inner in _optimizers(optimizer):
        if inner.optimizer.state:
            continue
        if _offloaded(inner):
            inner.optimizer.dummy_step()  # megatron-core's own way to allocate its state (overwritten by the load)
        elif _torch_adam(inner):
            inner._init_optimizer_states_with_dummy_values()


@contextlib.contextmanager
def _steps_set_aside(inner):
    """megatron-core 0.16.1's fully_reshardable loader copies every entry of a parameter's optimizer state from
    the checkpoint, which holds no `step` (it is in the param groups): on the torch-Adam path that is a KeyError.
    Hide the steps meanwhile, and give each parameter its own copy back (torch's Adam increments each in place;
    a shared one would advance once per parameter per iteration and break the bias correction)."""
    states = inner.optimizer.state.values() if _torch_adam(inner) or _offloaded(inner) else []
    steps = [(state, state.pop("step")) for state in states if "step" in state]
    try:
        yield
    finally:
        for state, step in steps:
            state["step"] = step.clone()


def _saved_step(tree) -> float | int:
    """The step count of the saved param groups (one for all of them, as megatron-core keeps it)."""
    steps = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for group in node.get("param_groups", []) if isinstance(node.get("param_groups"), list) else []:
                step = group.get("step")
                if step is not None:
                    steps.add(step.item() if torch.is_tensor(step) else step)
            stack.extend(v for k, v in node.items() if k != "param_groups")
    if len(steps) != 1:
        raise fmt.CheckpointError(f"saved optimizer has step counts {sorted(steps)}; expected exactly one")
    return steps.pop()


def _load_optimizer(optimizer, loaded: dict) -> None:
    """The saved moments and main params, resharded to this layout by megatron-core's fully_reshardable loader.

    The param groups are this run's (their number and kind depend on the layout: experts get their own
    optimizer at EP > 1); only the step count comes from the checkpoint. LR and weight decay are the
    scheduler's, restored with it.
    """
    inners = _optimizers(optimizer)
    parts = [loaded] if len(inners) == 1 else [loaded[i] for i in range(len(inners))]
    step = _saved_step(loaded)
    for inner, part in zip(inners, parts):
        state = inner.state_dict()
        for group in state["optimizer"]["param_groups"]:
            group["step"] = step
        inner.load_state_dict(state)
        with _steps_set_aside(inner), torch.no_grad():
            inner.load_parameter_state_from_fully_reshardable(part["param_state"])
        if _offloaded(inner):
            # Offloaded: its sub-optimizers do not see the state tensors just set, and its load ran a step on
            # random gradients (`dummy_step`) that moved the model params; restore both from the loaded state.
            inner.optimizer._sync_hdo_state_to_sub_optimizers()
            optimizers.settle_loaded_hybrid_optimizer(inner.optimizer)
            for param, main_param in inner.optimizer.param_to_fp32_param.items():
                param.data.copy_(main_param)


def _without_classes(tree):
    """The offloaded optimizer keeps its sub-optimizer classes in its param groups; common.pt must load with
    torch.load's default weights_only, so they are stored by name (the loader takes the param groups from the
    running optimizer and only the step from the checkpoint)."""
    if isinstance(tree, dict):
        return {key: _without_classes(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_without_classes(value) for value in tree]
    if isinstance(tree, type):
        return f"{tree.__module__}.{tree.__qualname__}"
    return tree


# ------------------------------------------------------------------------------------------------- RNG
def _rng_state() -> dict:
    return {  # Megatron-LM's names
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _rng_sharded(states: list | None) -> ShardedObject:
    """Megatron-LM's `rng_state` object: per (PP, TP) rank, or per (PP, TP, DP) rank with experts; without
    experts it lists every DP rank's state (Megatron-LM reads the first), so each rank resumes its own."""
    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    dp = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        dp_size = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
        return ShardedObject("rng_state", states, (pp_size, tp_size, dp_size), (pp, tp, dp), replica_id=0)
    return ShardedObject("rng_state", states, (pp_size, tp_size), (pp, tp), replica_id=dp)


def _gathered_rng_states() -> list:
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        return [_rng_state()]
    group = parallel_state.get_data_parallel_group()
    states: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(states, _rng_state(), group=group)
    return states


def _set_rng_state(states: list) -> None:
    state = states[parallel_state.get_data_parallel_rank()] if len(states) > 1 else states[0]
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


# ----------------------------------------------------------------------------------------------- save
class Saver:
    """Writes the training checkpoints of one `--save` folder, in place or in the background (`--async-save`).

    Both go through megatron-core's torch_dist writer (`writer.save_request`), into `.iter_N.partial`; the folder
    is renamed and the `latest` pointer written only once every rank has written (in place: before `save`
    returns; in the background: when a later `poll` or `wait` finds every rank's writer done). An asynchronous
    save snapshots the state when it is scheduled (copied to host on a GPU, a forked process on CPU), so training
    goes on meanwhile; one save is in flight at a time (a new one first waits for the previous one). All methods
    are collective.
    """

    def __init__(self, save_dir: str, keep_last: int | None = None, asynchronous: bool = False, log=print):
        self.save_dir, self.keep_last, self.log = save_dir, keep_last, log
        self.background = AsyncCallsQueue() if asynchronous else None
        self.pending: int | None = None  # the iteration being written in the background

    def save(self, iteration: int, model_chunks, optimizer, scheduler, train_state: dict, megatron_args,
             hf_files_from: str) -> str:
        """Write iteration `iteration`: Megatron-LM's checkpoint with `megatron_args` in common.pt, our train state,
        and the HF config and tokenizer files of `hf_files_from`. Returns the final folder (complete once this
        returns, or once a later `poll`/`wait` reports it when asynchronous)."""
        self.wait()
        rank = dist.get_rank()
        final = iteration_dir(self.save_dir, iteration)
        partial = self._partial(iteration)
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        metadata = checkpoint_writer.sharded_metadata(OPTIMIZER_FORMAT)
        state = checkpoint_weights.model_state_dicts(model_chunks, metadata)
        state["optimizer"] = _without_classes(optimizer.sharded_state_dict(state, metadata=metadata))
        state.update(opt_param_scheduler=scheduler.state_dict(), rng_state=_rng_sharded(_gathered_rng_states()),
                     args=megatron_args, checkpoint_version=fmt.CHECKPOINT_VERSION, iteration=iteration,
                     num_floating_point_operations_so_far=0)
        failure = None
        try:  # megatron-core's writer raises on every rank when one rank's write fails
            request = checkpoint_writer.save_request(partial, state, metadata, self.background is not None)
            if rank == 0:
                fmt.copy_hf_files(hf_files_from, partial)
                with open(os.path.join(partial, TRAIN_STATE_FILE), "w", encoding="utf-8") as f:
                    json.dump(dict(train_state, iteration=iteration), f, indent=2, default=str)
            if self.background is None:
                request.execute_sync()
        except (Exception, CheckpointException) as err:  # any failed write: stop with the reason, keep the last save
            failure = err
        if self.background is None or failure is not None:
            self._complete(iteration, failure)
        else:
            self.background.schedule_async_request(request)
            self.pending = iteration
            self.log(f"saving checkpoint {final} in the background")
        return final

    def poll(self) -> None:
        """Complete a background save whose writers are done on every rank (one all-reduce; no wait)."""
        self._finalize(blocking=False)

    def wait(self) -> None:
        """Wait for a background save and complete it."""
        self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        if self.pending is None:
            return
        failure = None
        try:
            if not self.background.maybe_finalize_async_calls(blocking=blocking):
                return
        except (Exception, CheckpointException) as err:  # megatron-core raises a failed write on every rank
            failure = err
        iteration, self.pending = self.pending, None
        self._complete(iteration, failure)

    def _partial(self, iteration: int) -> str:
        return os.path.join(self.save_dir, f".{os.path.basename(iteration_dir(self.save_dir, iteration))}.partial")

    def _complete(self, iteration: int, failure: BaseException | None) -> None:
        """Every rank has written (or failed): rename the folder and move the pointer, or stop with the reason."""
        rank = dist.get_rank()
        final, partial = iteration_dir(self.save_dir, iteration), self._partial(iteration)
        failures: list = [None] * dist.get_world_size()
        dist.all_gather_object(failures, _save_failure(failure, self.save_dir))
        reason = next((found for found in failures if found), None)
        if reason:
            if rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            latest = fmt.read_tracker(self.save_dir)
            raise fmt.CheckpointError(f"saving iteration {iteration} to {self.save_dir} failed: {reason}; "
                                      + (f"{iteration_dir(self.save_dir, latest)} stays the latest checkpoint"
                                         if latest is not None else "no checkpoint was saved"))
        if rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.rename(partial, final)
            fmt.write_tracker(self.save_dir, iteration)
            if self.keep_last:
                _prune(self.save_dir, self.keep_last)
        dist.barrier()
        self.log(f"saved checkpoint {final}")


def save(save_dir: str, iteration: int, model_chunks, optimizer, scheduler, train_state: dict, megatron_args,
         hf_files_from: str, keep_last: int | None = None) -> str:
    """Write iteration `iteration` in place (collective; see `Saver`). Returns the final folder."""
    return Saver(save_dir, keep_last, log=lambda *_: None).save(
        iteration, model_chunks, optimizer, scheduler, train_state, megatron_args, hf_files_from)


def _save_failure(err: BaseException | None, save_dir: str) -> str | None:
    """What went wrong in a save, in one line; the disk being full named as such. torch.save's zip writer reports
    a full disk as "unexpected pos" without the errno, so the free space of the folder's filesystem decides too."""
    if err is None:
        return None
    if shutil.disk_usage(save_dir).free < FULL_DISK_BYTES:
        return f"no space left on device ({shutil.disk_usage(save_dir).free} bytes free in {save_dir})"
    seen, stack = set(), [err]
    while stack:  # the OSError may be wrapped (torch.distributed.checkpoint's CheckpointException)
        found = stack.pop()
        if isinstance(found, tuple):  # a CheckpointException's failures: (exception, traceback) per rank
            stack += [item for item in found if isinstance(item, BaseException)]
        if not isinstance(found, BaseException) or id(found) in seen:
            continue
        seen.add(id(found))
        if isinstance(found, OSError) and found.errno == errno.ENOSPC:
            return f"no space left on device ({found.filename or 'writing the checkpoint'})"
        stack += [found.__cause__, found.__context__, *getattr(found, "failures", {}).values()]
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _prune(save_dir: str, keep_last: int) -> None:
    iterations = sorted(int(name[5:]) for name in os.listdir(save_dir)
                        if name.startswith("iter_") and name[5:].isdigit())
    for old in iterations[:-keep_last]:
        shutil.rmtree(iteration_dir(save_dir, old), ignore_errors=True)


# ----------------------------------------------------------------------------------------------- load
def load(checkpoint: ResolvedCheckpoint, model_chunks, optimizer, scheduler, layout_description: str,
         log=print, load_optimizer: bool = True, load_rng: bool = True) -> dict | None:
    """Load weights (any layout) and, when resuming a run of ours, optimizer and scheduler state (any layout)
    and RNG state (same layout). Returns the training state to resume from, or None for a new run.

    `load_optimizer` False (`--no-load-optim`): Adam starts anew from the loaded weights and the LR schedule
    continues at the resumed iteration; `load_rng` False (`--no-load-rng`): the RNG keeps its seeded state."""
    info, state = checkpoint.info, checkpoint.train_state
    metadata = checkpoint_writer.sharded_metadata(info.content_metadata)
    request = checkpoint_weights.model_state_dicts(model_chunks, metadata)
    checkpoint_weights.fit_to_checkpoint(request, info.folder)
    if state is None:
        checkpoint_weights.apply_model_state(model_chunks, dist_checkpointing.load(request, info.folder))
        # The optimizer copied its fp32 main params from the freshly initialized bf16 weights when it was built;
        # without this refresh the first step would overwrite the loaded weights with that initialization.
        optimizer.reload_model_params()
        return None
    if info.content_metadata.get("distrib_optim_sharding_type") != OPTIMIZER_FORMAT["distrib_optim_sharding_type"]:
        raise fmt.CheckpointError(f"{info.folder}: optimizer state stored as "
                                  f"{info.content_metadata.get('distrib_optim_sharding_type')!r}; this trainer resumes "
                                  "the fully_reshardable form it writes")
    same_layout = state.get("layout") == layout_description
    if load_optimizer:
        _ensure_adam_state(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(request, is_loading=True, metadata=metadata)
    if same_layout and load_rng:
        request["rng_state"] = _rng_sharded(None)
    with torch.no_grad():
        loaded = dist_checkpointing.load(request, info.folder)
        checkpoint_weights.apply_model_state(model_chunks, loaded)
    if load_optimizer:
        _load_optimizer(optimizer, loaded["optimizer"])
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    else:
        optimizer.reload_model_params()  # as for a new run: the main params were copied before the load
        scheduler.step(increment=state["iteration"])
        log(f"--no-load-optim: Adam starts anew from the weights of {info.folder}; the LR schedule continues at "
            f"iteration {state['iteration']}")
    if "rng_state" in request:
        _set_rng_state(loaded["rng_state"])
    elif not same_layout:
        log(f"resuming {info.folder}, saved at layout [{state.get('layout')}], at [{layout_description}]: weights "
            + ("and optimizer state (Adam moments, main params, step) " if load_optimizer else "")
            + "resharded; RNG state starts anew")
    else:
        log("--no-load-rng: the RNG state starts from --seed")
    return state
