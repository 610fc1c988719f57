"""The torch_dist writers: a checkpoint folder written as Megatron-LM writes it.

- `save`: synchronously and in-process, with tensors that may be produced only when the writer reaches them
  (conversion streams one layer at a time through it).
- `save_request`: megatron-core's own writer (Megatron-LM's, sync or `--async-save`) as a request that is either
  executed in place or handed to a background process; training checkpoints go through it, so a synchronous
  and an asynchronous save of the same state write the same bytes.
"""
from __future__ import annotations

import os
import queue
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)

from orpo_megatron.checkpoint.format import DEFAULT_CONTENT_METADATA


class _Planner(MCoreSavePlanner):
    """Megatron-core's planner, with tensors that may be produced only when the writer asks for them.

    `producers[key](offset)` makes the chunk of `key` stored at `offset`; DCP's file writer resolves the chunks
    one at a time while writing (`SavePlanner.resolve_data`, the documented place for lazy production), so a
    streamed save holds one chunk at a time. tests/test_checkpoint_format.py pins that behaviour.
    """

    def __init__(self, producers: dict[str, Callable[[tuple[int, ...]], torch.Tensor]]):
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
        self.producers = producers

    def resolve_data(self, write_item):
        produce = self.producers.get(write_item.index.fqn)
        if produce is None:
            return super().resolve_data(write_item)
        return produce(tuple(write_item.index.offset))


class _SynchronousTorchDistSave(TorchDistSaveShardedStrategy):
    """The torch_dist format written in-process by torch.distributed.checkpoint.

    Megatron's own writer forks a writer process per save and collects results through a spawned
    multiprocessing Manager, which re-imports the launching script (about 10 s per process on CPU, and a hang
    unless the script is guarded by `__main__`). The files are the same torch_dist files; loading uses
    Megatron's standard torch_dist strategy.
    """

    def __init__(self, producers: dict | None = None):
        super().__init__("torch_dist", 1)
        self.producers = producers or {}

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        dcp.save(
            mcore_to_pyt_state_dict(state_dict, False),
            storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1),
            planner=_Planner(self.producers),
        )


def save(folder: str, state_dict: dict, content_metadata: dict, producers: dict | None = None) -> None:
    """Collective: write a checkpoint folder (created if needed) as Megatron-LM does, synchronously."""
    _make_folder(folder)
    dist_checkpointing.save(state_dict, folder, sharded_strategy=_SynchronousTorchDistSave(producers),
                            content_metadata=_stored(content_metadata))


def save_request(folder: str, state_dict: dict, content_metadata: dict, asynchronous: bool = False) -> AsyncRequest:
    """Collective: megatron-core's torch_dist save of `state_dict` into `folder` (created if needed), as Megatron-LM
    makes it: common.pt is written now; the tensors are written when the returned request runs, in place
    (`request.execute_sync()`) or, `asynchronous`, in a forked process (`AsyncCallsQueue.schedule_async_request`);
    the request's finalize functions then write `.metadata` and metadata.json, once every rank has written."""
    _make_folder(folder)
    _use_results_queue(asynchronous)
    return dist_checkpointing.save(state_dict, folder, sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1,
                                                                                                     thread_count=1),
                                   async_sharded_save=True, content_metadata=_stored(content_metadata))


def _make_folder(folder: str) -> None:
    if dist.get_rank() == 0:
        os.makedirs(folder, exist_ok=True)
    dist.barrier()


def _stored(content_metadata: dict) -> dict:
    """The content metadata a checkpoint records: all but the run's process group (`sharded_metadata`)."""
    return {k: v for k, v in content_metadata.items() if k != "dp_cp_group"}


_background_results = None  # megatron-core's queue for results from a background writer, once made


def _use_results_queue(asynchronous: bool) -> None:
    """The queue megatron-core's writer reports its results through (each save takes the current one).

    megatron-core makes one, on first use, in a spawned multiprocessing Manager: a fresh interpreter that
    re-imports the launching script (seconds per rank). A background writer needs it (its results may exceed a
    pipe's buffer before the trainer reads them); a save in place reports from this process, so a plain queue
    serves it and a run that never saves in the background never starts the Manager."""
    global _background_results
    if not asynchronous:
        filesystem_async._results_queue = queue.Queue()
        return
    if _background_results is None:
        filesystem_async._results_queue = None
        _background_results = filesystem_async._get_write_results_queue()
    filesystem_async._results_queue = _background_results


def sharded_metadata(content_metadata: dict | None = None) -> dict:
    """The `metadata` argument of `sharded_state_dict()`: a checkpoint's content metadata (Megatron-LM's
    defaults for new ones) and this rank's data-parallel group."""
    return {**DEFAULT_CONTENT_METADATA, **(content_metadata or {}),
            "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
