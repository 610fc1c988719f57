"""orpo-megatron's first checkpoint format, read only to upgrade it (`tools/convert_hf.py upgrade`).

That format, written before checkpoints followed Megatron-LM: a folder with its own metadata.json (format
"orpo-megatron-model-weights", the HF config inside), hf_files/ (tokenizer files), and one megatron-core
torch_dist checkpoint per decoder layer (model/layer_NNNN/) plus one for the rest (model/outer/). Tensors were
stored whole under per-layer local-spec names with global layer and expert indices
(`decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight`), SwiGLU fc1 as [2, ffn, hidden], and the
vocabulary unpadded. A training save folder held such folders as iter_NNNNNNN/ under today's tracker file.
"""
from __future__ import annotations

import json
import os

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor

from orpo_megatron.checkpoint import format as fmt
from orpo_megatron.checkpoint.hf_mapping import FINAL_NORM, LAYERS, pad_vocab
from orpo_megatron.model_config import HFModelConfig


def weights_folder(path: str) -> str:
    """The weights folder of the first format that `path` names: itself, or its tracker's iteration."""
    if fmt.legacy_metadata(path) is not None:
        return path
    if os.path.isfile(os.path.join(path, fmt.TRACKER_FILE)):
        folder = fmt.iteration_dir(path, fmt.read_tracker(path))
        if fmt.legacy_metadata(folder) is not None:
            return folder
    raise fmt.CheckpointError(
        f"{path}: not a checkpoint of orpo-megatron's first format (no {fmt.LEGACY_METADATA_FILE} with format "
        f"{fmt.LEGACY_FORMAT!r}); checkpoints of today's format need no upgrade")


def model_config(folder: str) -> HFModelConfig:
    return HFModelConfig.from_dict(fmt.legacy_metadata(folder)["hf_config"],
                                   source=os.path.join(folder, fmt.LEGACY_METADATA_FILE))


def stored_dtype(folder: str) -> torch.dtype:
    return getattr(torch, fmt.legacy_metadata(folder)["dtype"])


def _read(group_dir: str, names: list[str]) -> dict[str, torch.Tensor]:
    """Whole tensors of one of the format's torch_dist folders."""
    stored = dist_checkpointing.load_tensors_metadata(group_dir)
    missing = [name for name in names if name not in stored]
    if missing:
        raise fmt.CheckpointError(f"{group_dir}: missing {', '.join(missing)}")
    requests = {name: ShardedTensor.from_rank_offsets(
        name, torch.empty(stored[name].global_shape, dtype=stored[name].dtype), replica_id=0) for name in names}
    loaded = dist_checkpointing.load(requests, group_dir, validate_access_integrity=False)
    return {name: loaded[name] for name in names}


def layer_tensor(folder: str, hf: HFModelConfig, key: str, layer: int) -> torch.Tensor:
    """One layer's slice of today's stacked `key`, from the per-layer names that format stored."""
    group_dir = os.path.join(folder, "model", f"layer_{layer:04d}")
    old, name = f"decoder.layers.{layer}.", key.removeprefix(LAYERS)
    if name.startswith("mlp.experts.experts."):
        fc = name.split(".")[3]
        names = [old + f"mlp.experts.local_experts.{e}.{fc}.weight" for e in range(hf.num_experts)]
        tensors = _read(group_dir, names)
        return torch.stack([tensors[n].reshape(-1, tensors[n].shape[-1]) for n in names])  # fc1: [2, ffn, h]
    renamed = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
               "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
    tensor = _read(group_dir, [old + renamed.get(name, name)])[old + renamed.get(name, name)]
    return tensor.reshape(-1, tensor.shape[-1]) if name == "mlp.linear_fc1.weight" else tensor


def outer_tensor(folder: str, key: str, padded_vocab: int) -> torch.Tensor:
    """Embedding, final norm or output layer; the vocabulary (stored unpadded) padded to `padded_vocab` rows."""
    tensor = _read(os.path.join(folder, "model", "outer"), [key])[key]
    return tensor if key == FINAL_NORM else pad_vocab(tensor, padded_vocab)


def copy_hf_files(source: str, folder: str) -> None:
    """The tokenizer files that format kept, and config.json from its metadata."""
    fmt.copy_hf_files(os.path.join(source, fmt.HF_FILES_DIR), folder)
    with open(os.path.join(folder, fmt.HF_FILES_DIR, "config.json"), "w", encoding="utf-8") as f:
        json.dump(fmt.legacy_metadata(source)["hf_config"], f, indent=2)
