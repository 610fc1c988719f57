"""The on-disk checkpoint format: Megatron-LM's `torch_dist` layout, read and written.

A checkpoint root (a training `--save` folder, or the output of `tools/convert_hf.py hf-to-megatron`):

    ROOT/latest_checkpointed_iteration.txt   the newest complete iteration, or `release` for converted weights
    ROOT/iter_0000006/  (or ROOT/release/)   one checkpoint folder:
        metadata.json                        megatron-core's (sharded backend torch_dist, common backend torch)
        common.pt                            what is not sharded: `args` (Megatron-LM's argument names, read by
                                             its argument check), `checkpoint_version` 3.0, `iteration`,
                                             `content_metadata` (how the sharded state is laid out); training
                                             checkpoints add `opt_param_scheduler` and the optimizer's param groups
        .metadata, __0_0.distcp, ...         torch.distributed.checkpoint files with every tensor under its
                                             `GPTModel.sharded_state_dict()` key
        hf_files/                            ours: config.json, tokenizer files, generation_config.json
        train_state.json                     ours, training checkpoints only (see `training.py`)

The keys are the Transformer Engine spec's, whichever spec saved them: layers stacked on a leading axis
(`decoder.layers.self_attention.linear_qkv.weight` is [layers, rows, hidden]), experts on a second one, the
`_extra_state` objects of linear layers and standalone norms (TE's FP8 scaling state) included, the vocabulary
padded as the saving model pads it (any padding loads: megatron-core reads the overlap and zero-fills). So any
TP / PP / VP / EP layout loads any checkpoint, ours or Megatron-LM's, and Megatron-LM loads ours.

Owns: folder names and the tracker; describing a folder (its HF config, the Megatron-LM arguments in common.pt
checked against that config, refusing orpo-megatron's first format with the command that upgrades it); the
arguments written for Megatron-LM; the in-process torch_dist writer; model weights into and out of a parallel
model; and the one-layer-at-a-time writer and reader that conversion streams through. The HF <-> Megatron
tensor mapping is `hf_mapping.py`; trainer state (optimizer, RNG, data position, iterations) `training.py`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import shutil
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)

from orpo_megatron.checkpoint import hf_mapping
from orpo_megatron.errors import UserError
from orpo_megatron.model_config import HFModelConfig

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"
CHECKPOINT_VERSION = 3.0
HF_FILES_DIR = "hf_files"
# Files of an HF model folder that are not weights but are needed to use them.
HF_FILE_NAMES = (
    "config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)
LEGACY_FORMAT = "orpo-megatron-model-weights"  # metadata.json "format" of this project's first checkpoints
# Megatron-LM's defaults for how the sharded state dict is laid out (`_build_sharded_state_dict_metadata`).
DEFAULT_CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


class CheckpointFormatError(UserError, ValueError):
    """A checkpoint that is missing, incomplete, of another format, or does not fit the model, named."""


# --------------------------------------------------------------------------------------------- folder layout
def iteration_dir(root: str, iteration: int | str) -> str:
    return os.path.join(root, RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}")


def read_tracker(root: str) -> int | str | None:
    """The iteration (or `release`) the tracker file of `root` names, None without a tracker."""
    tracker = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(tracker):
        return None
    with open(tracker, encoding="utf-8") as f:
        text = f.read().strip()
    if text != RELEASE and not text.isdigit():
        raise CheckpointFormatError(f"{tracker}: expected an iteration number or 'release', found {text!r}")
    value = RELEASE if text == RELEASE else int(text)
    if not os.path.isdir(iteration_dir(root, value)):
        raise CheckpointFormatError(f"{tracker} names {text}, but {iteration_dir(root, value)} is missing")
    return value


def write_tracker(root: str, value: int | str) -> None:
    """Point the tracker at a complete folder; atomic, so readers never see a half-written one."""
    tmp = os.path.join(root, f".{TRACKER_FILE}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(str(value))
    os.replace(tmp, os.path.join(root, TRACKER_FILE))


def copy_hf_files(source: str, target_dir: str) -> list[str]:
    """Copy config.json and the tokenizer / generation files of an HF folder (or another checkpoint's
    hf_files/) into `target_dir`/hf_files."""
    target = os.path.join(target_dir, HF_FILES_DIR)
    os.makedirs(target, exist_ok=True)
    copied = []
    for name in HF_FILE_NAMES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
            copied.append(name)
    return copied


def _refuse_first_format(folder: str, named: str) -> None:
    """This project's first format kept its own metadata.json where megatron-core keeps its."""
    try:
        with open(os.path.join(folder, "metadata.json"), encoding="utf-8") as f:
            first_format = json.load(f).get("format") == LEGACY_FORMAT
    except (OSError, ValueError, AttributeError):
        return
    if first_format:
        raise CheckpointFormatError(
            f"{folder} is in orpo-megatron's first checkpoint format (per-layer folders), which Megatron-LM cannot "
            "read and this version no longer loads. Convert it once with:\n"
            f"    python tools/convert_hf.py upgrade --load {named} --output NEW_FOLDER")


# ------------------------------------------------------------------------------------- what a folder holds
@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint folder: its model, where its tokenizer is, and what common.pt says."""

    folder: str
    hf: HFModelConfig
    hf_files: str  # folder with config.json and the tokenizer files
    args: argparse.Namespace | None  # Megatron-LM's arguments, as stored
    iteration: int
    content_metadata: dict

    @property
    def release(self) -> bool:
        return os.path.basename(self.folder) == RELEASE


def checkpoint_folder(path: str) -> str:
    """The checkpoint folder `path` names: itself, or the folder its tracker names."""
    if not os.path.exists(path):
        raise CheckpointFormatError(f"{path}: no such checkpoint")
    _refuse_first_format(path, path)
    tracked = read_tracker(path)
    folder = iteration_dir(path, tracked) if tracked is not None else path
    _refuse_first_format(folder, path)
    if not os.path.isfile(os.path.join(folder, "common.pt")) or not _is_torch_dist(folder):
        state = ("is incomplete (no metadata.json: its writer did not finish)"
                 if os.path.isfile(os.path.join(folder, ".metadata")) else "is not a checkpoint")
        raise CheckpointFormatError(
            f"{folder} {state}; expected a Megatron-LM torch_dist checkpoint folder (metadata.json, common.pt), or "
            f"a folder with {TRACKER_FILE} (the output of `tools/convert_hf.py hf-to-megatron` or a training "
            "--save folder)")
    check_complete(folder)
    return folder


def check_complete(folder: str) -> None:
    """Every file the folder's `.metadata` indexes is there and holds the bytes indexed: a checkpoint cut short
    (a full disk, a killed copy) is named before any work, not met as an unpickling error inside a load."""
    try:
        stored = dcp.FileSystemReader(folder).read_metadata()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, AttributeError) as err:
        raise CheckpointFormatError(f"{os.path.join(folder, '.metadata')} cannot be read ({type(err).__name__}: "
                                    f"{err}): the checkpoint is truncated or damaged") from None
    needed: dict[str, int] = {}
    for item in stored.storage_data.values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        path = os.path.join(folder, name)
        have = os.path.getsize(path) if os.path.isfile(path) else None
        if have is None or have < size:
            state = "is missing" if have is None else f"is truncated: {have} bytes"
            raise CheckpointFormatError(f"{path} {state}; the checkpoint's .metadata indexes {size} bytes in it")


def _is_torch_dist(folder: str) -> bool:
    try:
        return dist_checkpointing.check_is_distributed_checkpoint(folder)
    except (TypeError, ValueError, OSError):  # a metadata.json that is not megatron-core's
        return False


def read_common(folder: str) -> dict:
    """common.pt: Megatron-LM's arguments, iteration, versions and the other non-sharded state."""
    try:
        return dist_checkpointing.load_common_state_dict(folder)
    except (RuntimeError, EOFError, pickle.UnpicklingError, CheckpointingException) as err:
        raise CheckpointFormatError(f"{os.path.join(folder, 'common.pt')} cannot be read ({type(err).__name__}: "
                                    f"{str(err).split('. ')[0]}): the checkpoint is truncated or damaged") from None


def describe(path: str, hf_config: str | None = None) -> CheckpointInfo:
    """What the checkpoint at `path` (a folder, or a root with a tracker) holds, with its model checked.

    The model comes from the checkpoint's own hf_files/ or, for a checkpoint Megatron-LM wrote, from
    `hf_config` (an HF folder or config.json; its tokenizer files are used too). Either way the config must
    agree with the Megatron-LM arguments stored in common.pt.
    """
    folder = checkpoint_folder(path)
    common = read_common(folder)
    own = os.path.join(folder, HF_FILES_DIR)
    if hf_config is None and not os.path.isfile(os.path.join(own, "config.json")):
        raise CheckpointFormatError(
            f"{folder} has no {HF_FILES_DIR}/config.json (a checkpoint Megatron-LM wrote): pass --hf-config with "
            "the Hugging Face config.json (and tokenizer) of this model")
    config_path = hf_config if hf_config is not None else own
    hf = HFModelConfig.from_file(config_path)
    if hf_config is not None and os.path.isfile(os.path.join(own, "config.json")):
        check_model_config(HFModelConfig.from_file(own), hf, folder, config_path)
    args = common.get("args")
    if args is not None:
        check_args(args, hf, folder, config_path)
    hf_files = config_path if os.path.isdir(config_path) else os.path.dirname(os.path.abspath(config_path))
    content = dict(common.get("content_metadata") or DEFAULT_CONTENT_METADATA)
    iteration = 0 if os.path.basename(folder) == RELEASE else int(common.get("iteration", 0))
    return CheckpointInfo(folder, hf, hf_files, args, iteration, content)


def check_model_config(saved: HFModelConfig, given: HFModelConfig, folder: str, given_path: str) -> None:
    """The config given for a checkpoint is the one it was saved with (every architectural field)."""
    differing = [
        f"{f.name}: checkpoint {getattr(saved, f.name)!r}, {given_path} {getattr(given, f.name)!r}"
        for f in dataclasses.fields(HFModelConfig)
        if f.compare and getattr(saved, f.name) != getattr(given, f.name)
    ]
    if differing:
        raise CheckpointFormatError(f"{folder} was saved from a different model: " + "; ".join(differing))


# ---------------------------------------------------------------------------- Megatron-LM's arguments
def megatron_args(hf: HFModelConfig, run: dict, *, padded_vocab_size: int, make_vocab_size_divisible_by: int,
                  iteration: int) -> argparse.Namespace:
    """The `args` of common.pt: the model as Megatron-LM's flags describe it (what its `check_checkpoint_args`
    and `--use-checkpoint-args` read), then the run's own flags and layout (already Megatron-LM's names)."""
    model = dict(
        num_layers=hf.num_layers, hidden_size=hf.hidden_size, ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=hf.num_attention_heads, kv_channels=hf.head_dim,
        group_query_attention=hf.num_key_value_heads != hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads, max_position_embeddings=hf.max_position_embeddings,
        position_embedding_type="rope", add_position_embedding=False, use_rotary_position_embeddings=True,
        rotary_base=int(hf.rope_theta), rotary_percent=1.0, rotary_interleaved=False,
        normalization="RMSNorm", norm_epsilon=hf.rms_norm_eps, apply_layernorm_1p=False, swiglu=True,
        squared_relu=False, add_bias_linear=False, add_qkv_bias=hf.attention_bias,
        untie_embeddings_and_output_weights=not hf.tie_word_embeddings,
        attention_dropout=0.0, hidden_dropout=0.0, init_method_std=hf.initializer_range,
        vocab_size=hf.vocab_size, padded_vocab_size=padded_vocab_size,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by, tokenizer_type="HuggingFaceTokenizer",
        num_experts=hf.num_experts, ckpt_format="torch_dist", use_dist_ckpt=True, iteration=iteration,
        use_distributed_optimizer=True, dist_ckpt_optim_fully_reshardable=True,
    )
    if hf.is_moe:
        model.update(moe_ffn_hidden_size=hf.intermediate_size, moe_router_topk=hf.num_experts_per_tok,
                     moe_router_pre_softmax=False, moe_router_score_function="softmax", moe_layer_freq=1,
                     moe_router_load_balancing_type="aux_loss", moe_router_topk_scaling_factor=None,
                     moe_router_enable_expert_bias=False, moe_shared_expert_intermediate_size=None,
                     moe_grouped_gemm=False)
    return argparse.Namespace(**{**run, **model})


def _stored_model(args: argparse.Namespace) -> dict[str, object]:
    """What Megatron-LM's stored arguments say about the model, in config.json's terms (Megatron-LM's defaults
    for arguments an older checkpoint lacks)."""
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    heads, experts = get("num_attention_heads"), get("num_experts")
    return {
        "num_hidden_layers": get("num_layers"),
        "hidden_size": get("hidden_size"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("num_query_groups") if get("group_query_attention", False) else heads,
        "head_dim": get("kv_channels") or get("hidden_size") // heads,
        "intermediate_size": (get("moe_ffn_hidden_size") if experts else None) or get("ffn_hidden_size"),
        "rope_theta": int(get("rotary_base", 10000)),
        "tie_word_embeddings": not get("untie_embeddings_and_output_weights", False),
        "num_local_experts": experts,
        "num_experts_per_tok": get("moe_router_topk", 2) if experts else None,
        "attention_bias": get("add_qkv_bias", False),
    }


def _config_model(hf: HFModelConfig) -> dict[str, object]:
    return {
        "num_hidden_layers": hf.num_layers, "hidden_size": hf.hidden_size,
        "num_attention_heads": hf.num_attention_heads, "num_key_value_heads": hf.num_key_value_heads,
        "head_dim": hf.head_dim, "intermediate_size": hf.intermediate_size, "rope_theta": int(hf.rope_theta),
        "tie_word_embeddings": hf.tie_word_embeddings, "num_local_experts": hf.num_experts,
        "num_experts_per_tok": hf.num_experts_per_tok, "attention_bias": hf.attention_bias,
    }


# What the Mixtral family implies about the rest of the architecture: (argument, required, Megatron-LM default).
_REQUIRED_ARGS = [
    ("normalization", "RMSNorm", "LayerNorm"),
    ("swiglu", True, False),
    ("position_embedding_type", "rope", "learned_absolute"),
    ("add_bias_linear", False, True),
]
# Routing as HF Mixtral's: top-k of the router logits, softmax over those k, no scaling, bias or shared expert.
_REQUIRED_MOE_ARGS = [
    ("moe_router_pre_softmax", False, False),
    ("moe_router_score_function", "softmax", "softmax"),
    ("moe_router_topk_scaling_factor", None, None),
    ("moe_router_enable_expert_bias", False, False),
    ("moe_shared_expert_intermediate_size", None, None),
    ("moe_layer_freq", 1, 1),
]


def check_args(args: argparse.Namespace, hf: HFModelConfig, folder: str, config_path: str) -> None:
    """The HF config describes the model the checkpoint's stored arguments describe; names every difference."""
    stored, given = _stored_model(args), _config_model(hf)
    differing = [f"{field}: {config_path} has {given[field]!r}, the checkpoint {stored[field]!r}"
                 for field in given if stored[field] != given[field]]
    for name, required, default in _REQUIRED_ARGS + (_REQUIRED_MOE_ARGS if hf.is_moe else []):
        if getattr(args, name, default) != required:
            differing.append(f"{name}={getattr(args, name, default)!r} in the checkpoint; {hf.architecture} needs "
                             f"{required!r}")
    if differing:
        raise CheckpointFormatError(
            f"{config_path} does not describe the model of {folder} (Megatron-LM arguments in its common.pt): "
            + "; ".join(differing))


# --------------------------------------------------------------------------------------- torch_dist writer
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


# ------------------------------------------------------------------------------ model weights, any layout
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
        raise CheckpointFormatError(f"{what}: " + "; ".join(everything))


def apply_model_state(model_chunks: list[torch.nn.Module], loaded: dict) -> None:
    """Copy loaded model state into the chunks; every parameter must be there (`_extra_state` may be absent)."""
    chunks = [hf_mapping.unwrap(chunk) for chunk in model_chunks]
    names = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, name in zip(chunks, names):
        result = chunk.load_state_dict(loaded[name], strict=False)
        missing = [key for key in result.missing_keys if not key.endswith("_extra_state")]
        unexpected = [key for key in result.unexpected_keys if not key.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointFormatError(f"model state does not fit: missing {missing}, unexpected {unexpected}")


@torch.no_grad()
def load_model_weights(info: CheckpointInfo, model_chunks: list[torch.nn.Module]) -> None:
    """Collective: the weights of a checkpoint into this rank's model chunks, whatever layout saved them."""
    request = model_state_dicts(model_chunks, sharded_metadata(info.content_metadata))
    fit_to_checkpoint(request, info.folder)
    apply_model_state(model_chunks, dist_checkpointing.load(request, info.folder))


# ------------------------------------------------------------------- one layer at a time, one process
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
    for key, shape in hf_mapping.megatron_layer_shapes(hf).items():
        for layer in range(layers):
            state[f"{key}.{layer}"] = ShardedTensor.from_rank_offsets(
                key, _placeholder((1, *shape), dtype), (0, layer, layers), replica_id=0)
        producers[key] = lambda offset, key=key: layer_tensor(key, offset[0]).to(dtype).unsqueeze(0).contiguous()
    for key, shape in hf_mapping.megatron_outer_shapes(hf, padded_vocab).items():
        state[key] = ShardedTensor.from_rank_offsets(key, _placeholder(shape, dtype), replica_id=0)
        producers[key] = lambda offset, key=key: outer_tensor(key).to(dtype).contiguous()
    for key, grid in hf_mapping.extra_state_keys(hf).items():
        for index in torch.cartesian_prod(*(torch.arange(n) for n in grid)).reshape(-1, len(grid)).tolist():
            state[f"{key}.{index}"] = ShardedObject(key, None, grid, tuple(index), replica_id=0)
    save(folder, {"model": state, **common}, DEFAULT_CONTENT_METADATA, producers)


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
    for key, shape in hf_mapping.megatron_layer_shapes(hf).items():
        source = _stored_key(key, stored)
        if source not in stored:
            raise CheckpointFormatError(f"{folder}: {key} is missing")
        meta = stored[source]
        if tuple(meta.global_shape) != (hf.num_layers, *shape):
            raise CheckpointFormatError(f"{folder}: {source} has shape {tuple(meta.global_shape)}; the config "
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
            raise CheckpointFormatError(f"{folder}: {key} is missing")
        meta = stored[key]
        if key in (hf_mapping.EMBEDDING, hf_mapping.OUTPUT_LAYER):
            shape = (meta.global_shape[0], *shape[1:])
            if shape[0] < hf.vocab_size:
                raise CheckpointFormatError(
                    f"{folder}: {key} has {shape[0]} rows; the vocabulary has {hf.vocab_size}")
        if tuple(meta.global_shape) != shape:
            raise CheckpointFormatError(f"{folder}: {key} has shape {tuple(meta.global_shape)}; expected {shape}")
        requests[key] = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=meta.dtype), replica_id=0)
    loaded = dist_checkpointing.load(requests, folder, validate_access_integrity=False)
    return {key: loaded[key] for key in requests}
