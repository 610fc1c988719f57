"""Model weights in a checkpoint folder: into and out of a parallel model at any layout, and one decoder layer at a
time in one process (the writer and reader that conversion streams through).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

from orpo_megatron.checkpoint import format as fmt
from orpo_megatron.checkpoint import hf_mapping, writer
from orpo_megatron.model_config import HFModelConfig


def model_state_dicts(model_chunks: list[torch.nn.Module], metadata: dict) -> dict:
    """{"model": ...} (or "model0", "model1", ... with virtual pipeline chunks), as Megatron-LM nests them."""
    chunks = [hf_mapping.unwrap(chunk) for chunk in model_chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict(metadata=metadata)}
    return {f"model{i}": chunk.sharded_state_dict(metadata=metadata) for i, chunk in enumerate(chunks)}


def fit_to_checkpoint(request: dict, folder: str) -> None:
    """Adapt a model's sharded state dict to what `folder` stores (in place), or raise naming what is missing.

    Accepts the local spec's name of the MoE pre-MLP norm, and checkpoints without `_extra_state` objects
    (those modules then keep theirs); a tensor that is missing, or stored with another shape (the vocabulary
    aside), is an error on every rank, before any collective load starts.
    """
    stored = load_sharded_metadata(folder)
    stored_objects = {meta.unique_key for meta in stored.values() if isinstance(meta, ShardedObject)}
    problems = set()
    for entries in request.values():
        for name, entry in list(entries.items()):
            if isinstance(entry, ShardedObject):
                if entry.unique_key not in stored_objects:
                    del entries[name]
                continue
            if not isinstance(entry, (ShardedTensor, ShardedTensorFactory)):
                continue
            entry.key = _stored_key(entry.key, stored)
            if entry.key not in stored:
                problems.add(f"{entry.key} is missing")
            elif isinstance(entry, ShardedTensor) and not entry.allow_shape_mismatch:
                got, needed = tuple(stored[entry.key].global_shape), tuple(entry.global_shape)
                if got != needed:
                    problems.add(f"{entry.key}: stored shape {got}, this model needs {needed}")
    raise_on_any_rank(sorted(problems), f"cannot load the model from {folder}")


def raise_on_any_rank(problems: list[str], what: str) -> None:
    """Raise on every rank if any rank found a problem, so no rank is left waiting in a collective."""
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems)
    everything = sorted({p for rank_problems in gathered for p in rank_problems or []})
    if everything:
        raise fmt.CheckpointError(f"{what}: " + "; ".join(everything))


def apply_model_state(model_chunks: list[torch.nn.Module], loaded: dict) -> None:
    """Copy loaded model state into the chunks; every parameter must be there (`_extra_state` may be absent)."""
    chunks = [hf_mapping.unwrap(chunk) for chunk in model_chunks]
    names = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, name in zip(chunks, names):
        result = chunk.load_state_dict(loaded[name], strict=False)
        missing = [key for key in result.missing_keys if not key.endswith("_extra_state")]
        unexpected = [key for key in result.unexpected_keys if not key.endswith("_extra_state")]
        if missing or unexpected:
            raise fmt.CheckpointError(f"model state does not fit: missing {missing}, unexpected {unexpected}")


@torch.no_grad()
def load_model_weights(info: fmt.CheckpointInfo, model_chunks: list[torch.nn.Module]) -> None:
    """Collective: the weights of a checkpoint into this rank's model chunks, whatever layout saved them."""
    request = model_state_dicts(model_chunks, writer.sharded_metadata(info.content_metadata))
    fit_to_checkpoint(request, info.folder)
    apply_model_state(model_chunks, dist_checkpointing.load(request, info.folder))


# ------------------------------------------------------------------------ one layer at a time, one process
def _placeholder(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor with a shape and dtype but (almost) no memory: the data comes from a producer."""
    return torch.empty((), dtype=dtype).expand(*shape)


def write_streaming(folder: str, hf: HFModelConfig, padded_vocab: int, dtype: torch.dtype,
                    layer_tensor: Callable[[str, int], torch.Tensor], outer_tensor: Callable[[str], torch.Tensor],
                    common: dict) -> None:
    """Write a model-only checkpoint folder in one process, producing each layer's slice of each key when the
    writer reaches it: `layer_tensor(key, layer)` (the layer axis removed), `outer_tensor(key)`.

    Every key a model of `hf` saves is written, `_extra_state` objects included (empty, as a model without FP8
    state saves them), so the result loads strictly in Megatron-LM and at any layout here.
    """
    layers, state, producers = hf.num_layers, {}, {}
    for key, shape in hf.family.megatron_layer_shapes().items():
        for layer in range(layers):
            state[f"{key}.{layer}"] = ShardedTensor.from_rank_offsets(
                key, _placeholder((1, *shape), dtype), (0, layer, layers), replica_id=0)
        producers[key] = lambda offset, key=key: layer_tensor(key, offset[0]).to(dtype).unsqueeze(0).contiguous()
    for key, shape in hf_mapping.megatron_outer_shapes(hf, padded_vocab).items():
        state[key] = ShardedTensor.from_rank_offsets(key, _placeholder(shape, dtype), replica_id=0)
        producers[key] = lambda offset, key=key: outer_tensor(key).to(dtype).contiguous()
    for key, grid in hf.family.extra_state_keys().items():
        for index in torch.cartesian_prod(*(torch.arange(n) for n in grid)).reshape(-1, len(grid)).tolist():
            state[f"{key}.{index}"] = ShardedObject(key, None, grid, tuple(index), replica_id=0)
    writer.save(folder, {"model": state, **common}, fmt.DEFAULT_CONTENT_METADATA, producers)


def stored_tensors(folder: str) -> dict[str, ShardedTensor]:
    """Global shape and dtype of every tensor in a checkpoint folder."""
    return dist_checkpointing.load_tensors_metadata(folder)


def _stored_key(key: str, stored: dict) -> str:
    """The key a tensor is stored under: the TE spec's, or the one Megatron's stock local spec gives it."""
    alias = hf_mapping.LOCAL_SPEC_KEYS.get(key)
    return alias if key not in stored and alias in stored else key


def read_layer(folder: str, hf: HFModelConfig, layer: int, stored: dict | None = None) -> dict[str, torch.Tensor]:
    """One decoder layer's slice of every stacked key (the layer axis removed), read by slice in one process."""
    stored = stored if stored is not None else stored_tensors(folder)
    requests = {}
    for key, shape in hf.family.megatron_layer_shapes().items():
        source = _stored_key(key, stored)
        if source not in stored:
            raise fmt.CheckpointError(f"{folder}: {key} is missing")
        meta = stored[source]
        if tuple(meta.global_shape) != (hf.num_layers, *shape):
            raise fmt.CheckpointError(f"{folder}: {source} has shape {tuple(meta.global_shape)}; the config "
                                        f"implies {(hf.num_layers, *shape)}")
        requests[key] = ShardedTensor.from_rank_offsets(
            source, torch.empty((1, *shape), dtype=meta.dtype), (0, layer, hf.num_layers), replica_id=0)
    # Every process reads what it needs; the requests overlap across ranks by design.
    loaded = dist_checkpointing.load(requests, folder, validate_access_integrity=False)
    return {key: loaded[key][0] for key in requests}  # (the result also holds common.pt's entries)


def read_outer(folder: str, hf: HFModelConfig, stored: dict | None = None) -> dict[str, torch.Tensor]:
    """Embedding, final norm and output layer; the vocabulary with the rows it is stored with (padded)."""
    stored = stored if stored is not None else stored_tensors(folder)
    requests = {}
    for key, shape in hf_mapping.megatron_outer_shapes(hf, padded_vocab=0).items():
        if key not in stored:
            raise fmt.CheckpointError(f"{folder}: {key} is missing")
        meta = stored[key]
        if key in (hf_mapping.EMBEDDING, hf_mapping.OUTPUT_LAYER):
            shape = (meta.global_shape[0], *shape[1:])
            if shape[0] < hf.vocab_size:
                raise fmt.CheckpointError(
                    f"{folder}: {key} has {shape[0]} rows; the vocabulary has {hf.vocab_size}")
        if tuple(meta.global_shape) != shape:
            raise fmt.CheckpointError(f"{folder}: {key} has shape {tuple(meta.global_shape)}; expected {shape}")
        requests[key] = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=meta.dtype), replica_id=0)
    loaded = dist_checkpointing.load(requests, folder, validate_access_integrity=False)
    return {key: loaded[key] for key in requests}
