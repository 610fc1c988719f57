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
checked against that config, recognising orpo-megatron's first format and refusing it with the command that
upgrades it); the arguments written for Megatron-LM. What those arguments say about the model, and what they must
say, is the model family's (`families/`). The torch_dist writer is `writer.py`; model weights into
and out of a parallel model, and the one-layer-at-a-time writer and reader that conversion streams through,
`weights.py`; the HF <-> Megatron tensor mapping `hf_mapping.py`; trainer state (optimizer, RNG, data position,
iterations) `training.py`; reading the first format's tensors, to upgrade it, `legacy.py`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import shutil

import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException

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
# This project's first checkpoints: a metadata.json of their own (where megatron-core keeps its) with this "format".
LEGACY_METADATA_FILE = "metadata.json"
LEGACY_FORMAT = "orpo-megatron-model-weights"
# Megatron-LM's defaults for how the sharded state dict is laid out (`_build_sharded_state_dict_metadata`).
DEFAULT_CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, incomplete, of another format, does not fit the model, or cannot be written,
    naming the path and what was expected."""


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
        raise CheckpointError(f"{tracker}: expected an iteration number or 'release', found {text!r}")
    value = RELEASE if text == RELEASE else int(text)
    if not os.path.isdir(iteration_dir(root, value)):
        raise CheckpointError(f"{tracker} names {text}, but {iteration_dir(root, value)} is missing")
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


def legacy_metadata(folder: str) -> dict | None:
    """The metadata.json of a folder in this project's first format (its HF config and dtype), None for any other
    folder."""
    try:
        with open(os.path.join(folder, LEGACY_METADATA_FILE), encoding="utf-8") as f:
            metadata = json.load(f)
    except (OSError, ValueError):
        return None
    return metadata if isinstance(metadata, dict) and metadata.get("format") == LEGACY_FORMAT else None


def _refuse_first_format(folder: str, named: str) -> None:
    if legacy_metadata(folder) is not None:
        raise CheckpointError(
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
        raise CheckpointError(f"{path}: no such checkpoint")
    _refuse_first_format(path, path)
    tracked = read_tracker(path)
    folder = iteration_dir(path, tracked) if tracked is not None else path
    _refuse_first_format(folder, path)
    if not os.path.isfile(os.path.join(folder, "common.pt")) or not _is_torch_dist(folder):
        state = ("is incomplete (no metadata.json: its writer did not finish)"
                 if os.path.isfile(os.path.join(folder, ".metadata")) else "is not a checkpoint")
        raise CheckpointError(
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
        raise CheckpointError(f"{os.path.join(folder, '.metadata')} cannot be read ({type(err).__name__}: "
                                    f"{err}): the checkpoint is truncated or damaged") from None
    needed: dict[str, int] = {}
    for item in stored.storage_data.values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        path = os.path.join(folder, name)
        have = os.path.getsize(path) if os.path.isfile(path) else None
        if have is None or have < size:
            state = "is missing" if have is None else f"is truncated: {have} bytes"
            raise CheckpointError(f"{path} {state}; the checkpoint's .metadata indexes {size} bytes in it")


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
        raise CheckpointError(f"{os.path.join(folder, 'common.pt')} cannot be read ({type(err).__name__}: "
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
        raise CheckpointError(
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
        raise CheckpointError(f"{folder} was saved from a different model: " + "; ".join(differing))


# ---------------------------------------------------------------------------- Megatron-LM's arguments
def megatron_args(hf: HFModelConfig, run: dict, *, padded_vocab_size: int, make_vocab_size_divisible_by: int,
                  iteration: int) -> argparse.Namespace:
    """The `args` of common.pt: the run's own flags and layout (already Megatron-LM's names), then the model as
    its family describes it in Megatron-LM's flags (what its `check_checkpoint_args` and `--use-checkpoint-args`
    read)."""
    model = hf.family.megatron_args(padded_vocab_size=padded_vocab_size,
                                    make_vocab_size_divisible_by=make_vocab_size_divisible_by, iteration=iteration)
    return argparse.Namespace(**{**run, **model})


def check_args(args: argparse.Namespace, hf: HFModelConfig, folder: str, config_path: str) -> None:
    """The HF config describes the model the checkpoint's stored arguments describe; names every difference."""
    family = hf.family
    stored, given = family.stored_model(args), family.config_model()
    differing = [f"{field}: {config_path} has {given[field]!r}, the checkpoint {stored[field]!r}"
                 for field in given if stored[field] != given[field]]
    for name, required, default in family.required_args():
        if getattr(args, name, default) != required:
            differing.append(f"{name}={getattr(args, name, default)!r} in the checkpoint; {hf.architecture} needs "
                             f"{required!r}")
    if differing:
        raise CheckpointError(
            f"{config_path} does not describe the model of {folder} (Megatron-LM arguments in its common.pt): "
            + "; ".join(differing))
