"""The torch_dist writer: a checkpoint folder written as Megatron-LM writes it, synchronously and in-process, with
tensors that may be produced only when the writer reaches them (conversion streams one layer at a time through it).
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing, parallel_state
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
    if dist.get_rank() == 0:
        os.makedirs(folder, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state_dict, folder, sharded_strategy=_SynchronousTorchDistSave(producers),
                            content_metadata={k: v for k, v in content_metadata.items() if k != "dp_cp_group"})


def sharded_metadata(content_metadata: dict | None = None) -> dict:
    """The `metadata` argument of `sharded_state_dict()`: a checkpoint's content metadata (Megatron-LM's
    defaults for new ones) and this rank's data-parallel group."""
    return {**DEFAULT_CONTENT_METADATA, **(content_metadata or {}),
            "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
