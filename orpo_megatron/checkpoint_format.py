"""The on-disk format of model weights, shared by the converter and the trainer, and its save and load.

Owns the layout of a weights folder, its `metadata.json`, collective save and load of a parallel model at any
TP / PP / VP / EP layout, and the single-process full-tensor reader and writer that conversion streams through.
It does not own the HF <-> Megatron name mapping (`hf_mapping.py`) or trainer state (optimizer, RNG, data
position, iteration folders, the `latest` pointer's writing).

A weights folder:

    metadata.json            format and version, the HF config.json content, vocabulary sizes, stored dtype,
                             what produced it, the training iteration (null after conversion); written last
    hf_files/                tokenizer files and generation_config.json of the HF model it came from
    model/layer_0000/ ...    one Megatron-Core `dist_checkpointing` torch_dist checkpoint per decoder layer
    model/outer/             the same for the embedding, final norm and output layer

Every tensor is stored under its global Megatron name (global layer and expert index, local-spec names such as
`decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight`) with its full global shape; each rank writes
its TP / expert-TP shard at the right offsets, and replicated copies (norms, router, DP replicas) are written
once. Two tensors are stored in a layout that loads at any TP:
- SwiGLU `linear_fc1` as a [2, ffn, hidden] view (gate, up), so a TP shard [gate_i; up_i] is one slice on axis 1;
- the embedding and output layer without vocabulary padding ([vocab_size, hidden]); each layout pads for
  itself on load, with zero rows.
Because each layer is its own checkpoint, conversion and export hold one layer at a time.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)

from orpo_megatron.hf_mapping import global_param_names, tensor_split
from orpo_megatron.model_config import HFModelConfig

FORMAT = "orpo-megatron-model-weights"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
HF_FILES_DIR = "hf_files"
MODEL_DIR = "model"
OUTER_DIR = "outer"
# Files of an HF model folder that are not weights but are needed to use them.
HF_FILE_NAMES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")


class CheckpointFormatError(ValueError):
    """A weights folder that is missing, incomplete, of another format, or does not fit the model."""


@dataclasses.dataclass
class WeightsMetadata:
    """The content of `metadata.json`."""

    hf_config: dict
    dtype: str  # torch dtype name of the stored tensors, e.g. "bfloat16"
    produced_by: str
    vocab_size: int  # true vocabulary; the stored embedding / output layer have exactly these rows
    padded_vocab_size: int | None = None  # padding of the model that saved it (informational)
    iteration: int | None = None
    created: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def model_config(self) -> HFModelConfig:
        return HFModelConfig.from_dict(self.hf_config, source=f"{METADATA_FILE} hf_config")


# --------------------------------------------------------------------------------------------- folder layout
def layer_dir(ckpt_dir: str, layer: int) -> str:
    return os.path.join(ckpt_dir, MODEL_DIR, f"layer_{layer:04d}")


def outer_dir(ckpt_dir: str) -> str:
    return os.path.join(ckpt_dir, MODEL_DIR, OUTER_DIR)


def _is_weights_dir(path: str) -> bool:
    try:
        with open(os.path.join(path, METADATA_FILE), encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_metadata(ckpt_dir: str) -> WeightsMetadata:
    """The metadata of the weights folder `ckpt_dir`; a clear error for anything else or an unfinished one.

    (A trainer save folder is resolved to its newest iteration folder by `checkpointing.resolve`.)
    """
    path = os.path.join(ckpt_dir, METADATA_FILE)
    if not os.path.isfile(path):
        if not os.path.isdir(ckpt_dir):
            raise CheckpointFormatError(f"{ckpt_dir}: no such directory")
        state = "is incomplete (its writer did not finish)" if os.path.isdir(os.path.join(ckpt_dir, MODEL_DIR)) \
            else "is not a model-weights checkpoint"
        raise CheckpointFormatError(
            f"{ckpt_dir} {state}: no {METADATA_FILE} (written last by tools/convert_hf.py hf-to-megatron and by "
            "the trainer)"
        )
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if raw.get("format") != FORMAT:
        raise CheckpointFormatError(f"{path}: format {raw.get('format')!r}; expected {FORMAT!r}")
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{path}: format version {raw['format_version']} is newer than this code reads ({FORMAT_VERSION})"
        )
    fields = {f.name for f in dataclasses.fields(WeightsMetadata)}
    return WeightsMetadata(**{k: v for k, v in raw.items() if k in fields})


def write_metadata(ckpt_dir: str, metadata: WeightsMetadata) -> None:
    """Write metadata.json atomically; writers call it last, so a folder without it is incomplete."""
    metadata.created = metadata.created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    path = os.path.join(ckpt_dir, METADATA_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        content = dataclasses.asdict(metadata)
        # Format first, the long config last, for people reading the file.
        ordered = {key: content.pop(key) for key in ("format", "format_version")}
        hf_config = content.pop("hf_config")
        json.dump({**ordered, **content, "hf_config": hf_config}, f, indent=2)
    os.replace(path + ".tmp", path)


def copy_hf_files(source: str, ckpt_dir: str) -> list[str]:
    """Copy the tokenizer / generation files from an HF folder, or from another weights folder's hf_files/."""
    if _is_weights_dir(source):
        source = os.path.join(source, HF_FILES_DIR)
    target = os.path.join(ckpt_dir, HF_FILES_DIR)
    os.makedirs(target, exist_ok=True)
    copied = []
    for name in HF_FILE_NAMES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
            copied.append(name)
    return copied


def check_model_config(metadata: WeightsMetadata, hf: HFModelConfig, where: str) -> None:
    """The model being loaded into has the architecture the weights were saved from."""
    saved = metadata.model_config()
    differing = [
        f"{f.name}: checkpoint {getattr(saved, f.name)!r}, model {getattr(hf, f.name)!r}"
        for f in dataclasses.fields(HFModelConfig)
        if f.compare and getattr(saved, f.name) != getattr(hf, f.name)
    ]
    if differing:
        raise CheckpointFormatError(f"{where} was saved from a different model: " + "; ".join(differing))


# ----------------------------------------------------------------------------------------- sharded tensors
class _SynchronousTorchDistSave(TorchDistSaveShardedStrategy):
    """The torch_dist format written in-process by torch.distributed.checkpoint.

    Megatron's own writer forks a writer process per save and collects results through a spawned
    multiprocessing Manager, which re-imports the launching script (about 10 s per process on CPU, and a hang
    unless the script is guarded by `__main__`). The files are the same torch_dist files; loading uses
    Megatron's standard torch_dist strategy.
    """

    def __init__(self):
        super().__init__("torch_dist", 1)

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        dcp.save(
            mcore_to_pyt_state_dict(state_dict, False),
            storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1),
            planner=MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False),
        )


def _data_parallel_rank(expert: bool) -> int:
    """Rank among the processes that hold identical copies of this tensor."""
    if expert:
        return parallel_state.get_expert_data_parallel_rank()
    return parallel_state.get_data_parallel_rank(with_context_parallel=True)


def _sharded(name: str, local: torch.Tensor, key: str | None = None) -> ShardedTensor:
    """This rank's shard (parameter layout) of a non-vocabulary tensor, placed in its global tensor.

    Replica ids are (0, TP rank if replicated over TP else 0, data-parallel rank): all zeros for exactly one
    holder of each shard.
    """
    split = tensor_split(name)
    rank, size = split.rank_and_size()
    dp = _data_parallel_rank(split.expert)
    if split.gated:
        local = local.view(2, local.shape[0] // 2, *local.shape[1:])
    if split.axis is None:
        return ShardedTensor.from_rank_offsets(key or name, local, replica_id=(0, rank, dp))
    axis = 1 if split.gated else split.axis
    return ShardedTensor.from_rank_offsets(key or name, local, (axis, rank, size), replica_id=(0, 0, dp))


def _sharded_vocab(key: str, full: torch.Tensor, duplicate: int = 0) -> ShardedTensor:
    """An unpadded vocabulary tensor, held whole by every TP rank; `duplicate` 1 marks a tied output copy."""
    replica = (duplicate, parallel_state.get_tensor_model_parallel_rank(), _data_parallel_rank(False))
    return ShardedTensor.from_rank_offsets(key, full, replica_id=replica)


def _save_group(folder: str, sharded: dict[str, ShardedTensor]) -> None:
    """Collective: every rank calls it for every folder, with an empty dict if it holds nothing there."""
    if dist.get_rank() == 0:
        os.makedirs(folder, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(sharded, folder, sharded_strategy=_SynchronousTorchDistSave())


_NOT_WRITTEN = "missing or incomplete torch_dist checkpoint (no .metadata)"


def _stored_tensors(folder: str) -> dict[str, ShardedTensor] | None:
    """Global shape and dtype of every tensor in a torch_dist folder; None if it was never fully written."""
    if not os.path.isfile(os.path.join(folder, ".metadata")):
        return None
    return dist_checkpointing.load_tensors_metadata(folder)


# ----------------------------------------------------------------------------- full tensors, one process
def write_layer(ckpt_dir: str, layer: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write one decoder layer's full Megatron tensors (global names). One process, no model parallelism."""
    _save_group(layer_dir(ckpt_dir, layer), {name: _sharded(name, t) for name, t in tensors.items()})


def write_outer(ckpt_dir: str, tensors: dict[str, torch.Tensor], vocab_size: int) -> None:
    """Write the outer tensors; the embedding / output layer must have exactly `vocab_size` rows (unpadded)."""
    sharded = {}
    for name, tensor in tensors.items():
        if tensor_split(name).vocab:
            if tensor.shape[0] != vocab_size:
                raise CheckpointFormatError(f"{name}: {tensor.shape[0]} rows; stored rows must be {vocab_size}")
            sharded[name] = _sharded_vocab(name, tensor)
        else:
            sharded[name] = _sharded(name, tensor)
    _save_group(outer_dir(ckpt_dir), sharded)


def _read_group(folder: str) -> dict[str, torch.Tensor]:
    stored = _stored_tensors(folder)
    if stored is None:
        raise CheckpointFormatError(f"{folder}: {_NOT_WRITTEN}")
    requests = {
        key: ShardedTensor.from_rank_offsets(key, torch.empty(meta.global_shape, dtype=meta.dtype))
        for key, meta in stored.items()
    }
    # Every caller reads whole tensors, so shards overlap across ranks by design.
    loaded = dist_checkpointing.load(requests, folder, validate_access_integrity=False)
    return {
        key: tensor.reshape(-1, *tensor.shape[2:]) if tensor_split(key).gated else tensor
        for key, tensor in loaded.items()
    }


def read_layer(ckpt_dir: str, layer: int) -> dict[str, torch.Tensor]:
    """One decoder layer's full Megatron tensors (fc1 back in its [gate; up] parameter layout)."""
    return _read_group(layer_dir(ckpt_dir, layer))


def read_outer(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """Embedding, final norm and output layer; vocabulary tensors unpadded."""
    return _read_group(outer_dir(ckpt_dir))


# ------------------------------------------------------------------------------------ parallel model save/load
def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not hasattr(chunk, "decoder") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _params_by_group(model_chunks: list[torch.nn.Module], num_layers: int) -> tuple[dict, dict]:
    """This rank's parameters by global name: ({layer: {name: param}}, {outer name: param})."""
    layers: dict[int, dict[str, torch.nn.Parameter]] = {layer: {} for layer in range(num_layers)}
    outer: dict[str, torch.nn.Parameter] = {}
    for chunk in model_chunks:
        for _, name, param in global_param_names(_unwrap(chunk)):
            match = _LAYER.match(name)
            (layers[int(match.group(1))] if match else outer)[name] = param
    return layers, outer


def _gather_vocab(param: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The full, unpadded vocabulary tensor from this rank's vocab-parallel rows."""
    size = parallel_state.get_tensor_model_parallel_world_size()
    local = param.detach().contiguous()
    if size == 1:
        return local[:vocab_size]
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts)[:vocab_size]


def _tied_output_copy(name: str, hf: HFModelConfig) -> bool:
    """With tied embeddings the last pipeline stage holds a copy of the embedding as its output layer."""
    return name == OUTPUT_LAYER and hf.tie_word_embeddings


@torch.no_grad()
def save_model_weights(
    ckpt_dir: str,
    model_chunks: list[torch.nn.Module],
    hf: HFModelConfig,
    *,
    hf_files_from: str | None = None,
    iteration: int | None = None,
    produced_by: str = "orpo_megatron",
) -> None:
    """Collective: write this model's weights as a weights folder at `ckpt_dir` (created if needed).

    `hf_files_from` is an HF folder or a weights folder whose tokenizer files are copied along.
    metadata.json is written last, after every rank finished, so an interrupted save never looks complete.
    """
    layers, outer = _params_by_group(model_chunks, hf.num_layers)
    for layer, params in layers.items():
        _save_group(layer_dir(ckpt_dir, layer), {name: _sharded(name, p.detach()) for name, p in params.items()})
    sharded = {}
    for name, param in outer.items():
        if _tied_output_copy(name, hf):
            continue  # the first stage's embedding is the stored copy
        if tensor_split(name).vocab:
            sharded[name] = _sharded_vocab(name, _gather_vocab(param, hf.vocab_size))
        else:
            sharded[name] = _sharded(name, param.detach())
    _save_group(outer_dir(ckpt_dir), sharded)
    dist.barrier()
    if dist.get_rank() == 0:  # the first pipeline stage: it holds the embedding
        embedding = outer[EMBEDDING]
        if hf_files_from:
            copy_hf_files(hf_files_from, ckpt_dir)
        write_metadata(ckpt_dir, WeightsMetadata(
            hf_config=hf.raw,
            dtype=str(embedding.dtype).removeprefix("torch."),
            produced_by=produced_by,
            vocab_size=hf.vocab_size,
            padded_vocab_size=embedding.shape[0] * parallel_state.get_tensor_model_parallel_world_size(),
            iteration=iteration,
        ))
    dist.barrier()


def _load_request(name: str, param: torch.Tensor, stored: ShardedTensor, hf: HFModelConfig) -> ShardedTensor:
    """A receive buffer of the stored dtype, placed where this rank's shard sits in the global tensor."""
    split = tensor_split(name)
    if split.vocab:
        key = EMBEDDING if _tied_output_copy(name, hf) else name
        duplicate = int(key != name and not parallel_state.is_pipeline_first_stage(ignore_virtual=True))
        buffer = torch.empty((hf.vocab_size, *param.shape[1:]), dtype=stored.dtype)
        return _sharded_vocab(key, buffer, duplicate)
    return _sharded(name, torch.empty(param.shape, dtype=stored.dtype))


def _check_shapes(requests: dict[str, ShardedTensor], stored: dict[str, ShardedTensor]) -> list[str]:
    problems = []
    for request in requests.values():
        got, needed = tuple(stored[request.key].global_shape), tuple(request.global_shape)
        if got != needed:
            problems.append(f"{request.key}: stored shape {got}, this model needs {needed}")
    return problems


def _raise_on_any_rank(problems: list[str], folder: str) -> None:
    """Raise on every rank if any rank found a problem, so no rank is left waiting in a collective."""
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems)
    everything = sorted({p for rank_problems in gathered for p in rank_problems or []})
    if everything:
        raise CheckpointFormatError(f"cannot load model weights from {folder}: " + "; ".join(everything))


def _load_group(folder: str, params: dict[str, torch.nn.Parameter], hf: HFModelConfig) -> None:
    stored, problems, requests = _stored_tensors(folder), [], {}
    if stored is None:
        problems.append(_NOT_WRITTEN)
    else:
        for name, param in params.items():
            key = EMBEDDING if _tied_output_copy(name, hf) else name
            if key in stored:
                requests[name] = _load_request(name, param, stored[key], hf)
            else:
                problems.append(f"{key} is missing")
        problems = problems or _check_shapes(requests, stored)
    _raise_on_any_rank(problems, folder)
    loaded = dist_checkpointing.load(requests, folder)
    for name, param in params.items():
        tensor = loaded[name]
        if tensor_split(name).vocab:
            rank = parallel_state.get_tensor_model_parallel_rank()
            rows = param.shape[0]
            mine = tensor[rank * rows:(rank + 1) * rows]
            param.zero_()  # padding rows: masked out of every softmax, zero by convention
            param[: mine.shape[0]].copy_(mine)
        else:
            param.copy_(tensor.reshape(param.shape))


@torch.no_grad()
def load_model_weights(ckpt_dir: str, model_chunks: list[torch.nn.Module], hf: HFModelConfig) -> WeightsMetadata:
    """Collective: copy the weights of the weights folder `ckpt_dir` into this rank's model chunks, whatever
    layout saved them. Returns the folder's metadata."""
    metadata = read_metadata(ckpt_dir)
    check_model_config(metadata, hf, ckpt_dir)
    layers, outer = _params_by_group(model_chunks, hf.num_layers)
    for layer, params in layers.items():
        _load_group(layer_dir(ckpt_dir, layer), params, hf)
    _load_group(outer_dir(ckpt_dir), outer, hf)
    return metadata
