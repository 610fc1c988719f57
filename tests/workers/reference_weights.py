"""Whole-model reference loads for the test workers: an HF checkpoint's weights straight into this rank's model
chunks, with no checkpoint file involved (whole model in memory: tests and small models only), and the pieces
that slice a full tensor to this rank's part."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

from orpo_megatron.checkpoint import hf_mapping
from orpo_megatron.model_config import HFModelConfig


def _slice(entry: ShardedTensor, full: torch.Tensor) -> torch.Tensor:
    """The part of a full (global) tensor that a ShardedTensor describes, in the shape of its data; rows past
    the end of `full` (vocabulary padding the full tensor lacks) are zeros."""
    prepended = entry.prepend_axis_num
    index = tuple(slice(offset, offset + (1 if axis < prepended else entry.local_shape[axis - prepended]))
                  for axis, offset in enumerate(entry.global_offset))
    part = full[index]
    if part.shape[prepended:] != tuple(entry.local_shape):  # padding rows beyond the full tensor
        padded = part.new_zeros((*part.shape[:prepended], *entry.local_shape))
        padded[tuple(slice(0, n) for n in part.shape)] = part
        part = padded
    return part.reshape(entry.local_shape)


def local_part(entry: ShardedTensor | ShardedTensorFactory, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of a full tensor for one entry of a model's sharded state dict, shaped like the parameter.

    A factory (the SwiGLU fc1, whose TP shard is [gate shard; up shard]) is built into its pieces, each sliced,
    and merged back by the factory's own merge function.
    """
    if isinstance(entry, ShardedTensorFactory):
        pieces = entry.build()
        pieces = pieces if isinstance(pieces, list) else [pieces]
        return entry.merge_fn([_slice(piece, full) for piece in pieces])
    return _slice(entry, full)


def model_parameters(model_chunk: torch.nn.Module) -> Iterator[tuple[str, ShardedTensor | ShardedTensorFactory]]:
    """(checkpoint key, entry) for each parameter of a GPTModel chunk; `entry.data` is the parameter.

    Replicas included (every rank gets its copy); with tied embeddings at PP > 1, the last stage's copy of the
    embedding is the output layer's parameter and carries the embedding's key.
    """
    for entry in model_chunk.sharded_state_dict().values():
        if isinstance(entry, (ShardedTensor, ShardedTensorFactory)) and isinstance(entry.data, torch.nn.Parameter):
            yield entry.key, entry


def stack_layers(per_layer: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-layer slices -> full stacked tensors (whole model in memory: tests and small models only)."""
    return {key: torch.stack([layer[key] for layer in per_layer]) for key in per_layer[0]}


@torch.no_grad()
def load_hf_checkpoint(model_chunks: list[torch.nn.Module], hf_dir: str, hf: HFModelConfig) -> None:
    """Copy an HF checkpoint's weights into this rank's model chunks (whole model in memory; a reference path
    for tests that does not go through any checkpoint file)."""
    reader = hf_mapping.HFCheckpointReader(hf_dir)
    reader.check_complete(hf)
    tensors = reader.lazy()
    full = stack_layers([hf.family.hf_layer_to_megatron(tensors, layer) for layer in range(hf.num_layers)])
    full.update(hf_mapping.hf_outer_to_megatron(tensors, hf, padded_vocab=hf.vocab_size))
    full.update({local: full[te] for te, local in hf_mapping.LOCAL_SPEC_KEYS.items() if te in full})
    for chunk in model_chunks:
        for key, entry in model_parameters(hf_mapping.unwrap(chunk)):
            if key not in full:
                raise hf_mapping.MappingError(f"{key}: no such tensor in the HF checkpoint mapping")
            entry.data.copy_(local_part(entry, full[key]))
