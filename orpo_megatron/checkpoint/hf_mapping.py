"""Hugging Face <-> Megatron-Core tensors outside the decoder layers, and the reading of HF safetensors folders.

The Megatron side is the checkpoint's: the keys of `GPTModel.sharded_state_dict()` as the Transformer Engine
spec names them, layers stacked on a leading axis (`decoder.layers.self_attention.linear_qkv.weight` is
[layers, qkv rows, hidden]). A decoder layer's mapping is its model family's (`HFModelConfig.family`, in
`families/`), on one layer's slice of those tensors (the layer axis removed), so conversion and export hold one
layer at a time; the embedding, final norm and output layer, the same for every family, are mapped here.
Loading a parallel model goes through the model's own sharded state dict (`checkpoint/weights.py`), so
parameter names (local or TE spec, SequentialMLP or TEGroupedMLP experts) never need translating here.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open

from orpo_megatron.errors import UserError
from orpo_megatron.families.base import LAYERS
from orpo_megatron.model_config import HFModelConfig

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"
# The TE spec's key -> the one Megatron's stock local spec uses for the same tensor (it names the MoE pre-MLP
# norm after linear_fc1, as if fused; the TE spec keeps that norm a module of its own).
LOCAL_SPEC_KEYS = {LAYERS + "pre_mlp_layernorm.weight": LAYERS + "mlp.linear_fc1.layer_norm_weight"}


class MappingError(UserError, ValueError):
    """Tensors missing, unexpected or of the wrong shape, named."""


# ------------------------------------------------------------------------------------------------ vocab rows
def pad_vocab(weight: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Append zero rows; padded rows are masked out of every softmax, so their values never matter."""
    if weight.shape[0] > padded_size:
        raise MappingError(f"vocabulary of {weight.shape[0]} rows exceeds the padded size {padded_size}")
    return torch.cat([weight, weight.new_zeros(padded_size - weight.shape[0], *weight.shape[1:])])


# ------------------------------------------------------------------------------------------- name tables
def hf_outer_shapes(hf: HFModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (hf.vocab_size, hf.hidden_size), "model.norm.weight": (hf.hidden_size,)}
    if not hf.tie_word_embeddings:
        shapes["lm_head.weight"] = (hf.vocab_size, hf.hidden_size)
    return shapes


# ------------------------------------------------------------------------------------------ Megatron keys
def megatron_outer_shapes(hf: HFModelConfig, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """The tensors outside the decoder layers; the vocabulary padded to `padded_vocab` rows."""
    shapes = {EMBEDDING: (padded_vocab, hf.hidden_size), FINAL_NORM: (hf.hidden_size,)}
    if not hf.tie_word_embeddings:
        shapes[OUTPUT_LAYER] = (padded_vocab, hf.hidden_size)
    return shapes


# ------------------------------------------------------------------------------------------ outer mapping
def hf_outer_to_megatron(tensors: Mapping[str, torch.Tensor], hf: HFModelConfig, padded_vocab: int,
                         keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Embedding, final norm and output layer (only `keys` if given), the vocabulary padded with zero rows."""
    build = {
        EMBEDDING: lambda: pad_vocab(tensors["model.embed_tokens.weight"], padded_vocab),
        FINAL_NORM: lambda: tensors["model.norm.weight"],
    }
    if not hf.tie_word_embeddings:
        build[OUTPUT_LAYER] = lambda: pad_vocab(tensors["lm_head.weight"], padded_vocab)
    return {key: build[key]() for key in (build if keys is None else keys)}


def megatron_outer_to_hf(tensors: Mapping[str, torch.Tensor], hf: HFModelConfig) -> dict[str, torch.Tensor]:
    out = {
        "model.embed_tokens.weight": tensors[EMBEDDING][: hf.vocab_size].contiguous(),
        "model.norm.weight": tensors[FINAL_NORM],
    }
    if not hf.tie_word_embeddings:
        out["lm_head.weight"] = tensors[OUTPUT_LAYER][: hf.vocab_size].contiguous()
    return out


# -------------------------------------------------------------------------------------- reading HF folders
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _open_safetensors(path: str):
    """`safe_open`, with a missing, truncated or damaged file named (safetensors checks the header against the
    file size when opening)."""
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as err:
        raise MappingError(f"{path}: cannot be read as safetensors ({err}); the file is missing, truncated or "
                           "damaged: copy or download it again") from None


class HFCheckpointReader:
    """Lazy reader of a Hugging Face safetensors folder (sharded with an index, or a single file)."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                self.weight_map: dict[str, str] = json.load(f)["weight_map"]
        else:
            single = os.path.join(hf_dir, "model.safetensors")
            if not os.path.exists(single):
                raise MappingError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
            with _open_safetensors(single) as f:
                self.weight_map = {name: "model.safetensors" for name in f.keys()}

    def names(self) -> set[str]:
        return set(self.weight_map)

    def lazy(self) -> Mapping[str, torch.Tensor]:
        """The folder's tensors by name, each read from disk when asked for (and not kept)."""
        return _LazyTensors(self)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise MappingError(f"{self.hf_dir}: missing tensors: {', '.join(missing)}")
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for filename, file_names in by_file.items():
            with _open_safetensors(os.path.join(self.hf_dir, filename)) as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
        return out

    def check_complete(self, hf: HFModelConfig) -> None:
        """Every expected tensor is present and nothing else (names both missing and extra)."""
        expected = set(hf_outer_shapes(hf))
        for layer in range(hf.num_layers):
            expected.update(hf.family.hf_layer_shapes(layer, present=self.weight_map))
        present = self.names()
        problems = []
        if expected - present:
            problems.append("missing tensors: " + ", ".join(sorted(expected - present)))
        if present - expected:
            problems.append("unexpected tensors: " + ", ".join(sorted(present - expected)))
        if problems:
            raise MappingError(f"{self.hf_dir}: " + "; ".join(problems))

    def check_shapes(self, hf: HFModelConfig) -> None:
        """Every tensor has the shape `config.json` implies and a floating-point dtype (all problems named).

        Reads only the safetensors headers, so it is cheap enough to run before any conversion work.
        """
        expected = hf_outer_shapes(hf)
        for layer in range(hf.num_layers):
            expected.update(hf.family.hf_layer_shapes(layer, present=self.weight_map))
        by_file: dict[str, list[str]] = {}
        for name in expected:
            if name in self.weight_map:
                by_file.setdefault(self.weight_map[name], []).append(name)
        problems = []
        for filename, names in sorted(by_file.items()):
            with _open_safetensors(os.path.join(self.hf_dir, filename)) as f:
                for name in names:
                    tensor_slice = f.get_slice(name)
                    shape, dtype = tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()
                    if shape != expected[name]:
                        problems.append(f"{name}: expected shape {expected[name]}, got {shape}")
                    if dtype not in _FLOAT_DTYPES:
                        problems.append(f"{name}: dtype {dtype} is not a floating-point type")
        if problems:
            raise MappingError(f"{self.hf_dir}: tensors that do not match config.json: " + "; ".join(problems))


class _LazyTensors(Mapping):
    def __init__(self, reader: HFCheckpointReader):
        self.reader = reader

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.reader.read([name])[name]

    def __contains__(self, name) -> bool:
        return name in self.reader.weight_map

    def __iter__(self) -> Iterator[str]:
        return iter(self.reader.weight_map)

    def __len__(self) -> int:
        return len(self.reader.weight_map)


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not hasattr(chunk, "decoder") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
