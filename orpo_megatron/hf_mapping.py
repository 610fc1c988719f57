"""Hugging Face <-> Megatron-Core tensor mapping for the Mixtral family, one layer at a time.

Works on full (unsharded) tensors with global layer and expert indices, so the same mapping serves the
conversion tool, loading HF weights straight into a parallel model, and export. Slicing a full tensor into
this rank's shard is `local_shard()`.

Megatron names are those of the local spec (`input_layernorm`, `local_experts.E.linear_fc1`, ...).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator

import torch
from megatron.core import parallel_state
from safetensors import safe_open

from orpo_megatron.model_config import HFModelConfig

ATTENTION = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
}


class MappingError(ValueError):
    """Tensors missing, unexpected or of the wrong shape, named."""


# ---------------------------------------------------------------------------------------------- QKV grouping
def qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hf: HFModelConfig) -> torch.Tensor:
    """Interleave q/k/v per query group: [q heads of group g, k_g, v_g] for each group g (GQA layout)."""
    groups, d = hf.num_key_value_heads, hf.head_dim
    heads_per_group = hf.num_attention_heads // groups
    trailing = q.shape[1:]
    qkv = torch.cat(
        [
            q.reshape(groups, heads_per_group * d, *trailing),
            k.reshape(groups, d, *trailing),
            v.reshape(groups, d, *trailing),
        ],
        dim=1,
    )
    return qkv.reshape(-1, *trailing)


def qkv_from_megatron(qkv: torch.Tensor, hf: HFModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, d = hf.num_key_value_heads, hf.head_dim
    heads_per_group = hf.num_attention_heads // groups
    trailing = qkv.shape[1:]
    grouped = qkv.reshape(groups, (heads_per_group + 2) * d, *trailing)
    q, k, v = torch.split(grouped, [heads_per_group * d, d, d], dim=1)
    return (
        q.reshape(-1, *trailing).contiguous(),
        k.reshape(-1, *trailing).contiguous(),
        v.reshape(-1, *trailing).contiguous(),
    )


# ------------------------------------------------------------------------------------------------ vocab rows
def pad_vocab(weight: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Append zero rows; padded rows are masked out of every softmax, so their values never matter."""
    if weight.shape[0] > padded_size:
        raise MappingError(f"vocabulary of {weight.shape[0]} rows exceeds the padded size {padded_size}")
    return torch.cat([weight, weight.new_zeros(padded_size - weight.shape[0], *weight.shape[1:])])


# ------------------------------------------------------------------------------------------- name tables
def hf_layer_names(hf: HFModelConfig, layer: int, fused_experts: bool = False) -> list[str]:
    """Every HF tensor name of one decoder layer (classic per-expert layout unless `fused_experts`)."""
    p = f"model.layers.{layer}."
    names = [p + name for name in ATTENTION]
    names += [p + f"self_attn.{proj}.weight" for proj in ("q_proj", "k_proj", "v_proj")]
    if hf.attention_bias:
        names += [p + f"self_attn.{proj}.bias" for proj in ("q_proj", "k_proj", "v_proj")]
    if not hf.is_moe:
        names += [p + f"mlp.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")]
    elif fused_experts:
        names += [p + "mlp.gate.weight", p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj"]
    else:
        names.append(p + "block_sparse_moe.gate.weight")
        for e in range(hf.num_experts):
            names += [p + f"block_sparse_moe.experts.{e}.{w}.weight" for w in ("w1", "w2", "w3")]
    return names


def hf_outer_names(hf: HFModelConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not hf.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def megatron_outer_names(hf: HFModelConfig) -> list[str]:
    names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
    if not hf.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


def megatron_layer_names(hf: HFModelConfig, layer: int) -> list[str]:
    p = f"decoder.layers.{layer}."
    names = [p + name for name in ATTENTION.values()] + [p + "self_attention.linear_qkv.weight"]
    if hf.attention_bias:
        names.append(p + "self_attention.linear_qkv.bias")
    if hf.is_moe:
        names.append(p + "mlp.router.weight")
        for e in range(hf.num_experts):
            names += [p + f"mlp.experts.local_experts.{e}.linear_fc{i}.weight" for i in (1, 2)]
    else:
        names += [p + f"mlp.linear_fc{i}.weight" for i in (1, 2)]
    return names


def hf_layer_shapes(hf: HFModelConfig, layer: int, fused_experts: bool = False) -> dict[str, tuple[int, ...]]:
    """The expected shape of every HF tensor of one decoder layer (same names as `hf_layer_names`)."""
    h, d, ffn = hf.hidden_size, hf.head_dim, hf.intermediate_size
    q_rows, kv_rows = hf.num_attention_heads * d, hf.num_key_value_heads * d
    by_suffix = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "q_proj.weight": (q_rows, h), "k_proj.weight": (kv_rows, h), "v_proj.weight": (kv_rows, h),
        "q_proj.bias": (q_rows,), "k_proj.bias": (kv_rows,), "v_proj.bias": (kv_rows,),
        "o_proj.weight": (h, q_rows),
        "gate_proj.weight": (ffn, h), "up_proj.weight": (ffn, h), "down_proj.weight": (h, ffn),
        "gate.weight": (hf.num_experts or 0, h),
        "w1.weight": (ffn, h), "w3.weight": (ffn, h), "w2.weight": (h, ffn),
        "experts.gate_up_proj": (hf.num_experts or 0, 2 * ffn, h),
        "experts.down_proj": (hf.num_experts or 0, h, ffn),
    }
    shapes = {}
    for name in hf_layer_names(hf, layer, fused_experts):
        suffix = next(s for s in by_suffix if name.endswith("." + s))
        shapes[name] = by_suffix[suffix]
    return shapes


def hf_outer_shapes(hf: HFModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (hf.vocab_size, hf.hidden_size), "model.norm.weight": (hf.hidden_size,)}
    if not hf.tie_word_embeddings:
        shapes["lm_head.weight"] = (hf.vocab_size, hf.hidden_size)
    return shapes


# ------------------------------------------------------------------------------------------ layer mapping
def _classic_experts(tensors: dict[str, torch.Tensor], prefix: str, hf: HFModelConfig) -> None:
    """Rewrite transformers v5 fused expert tensors (mlp.experts.gate_up_proj / down_proj) to w1/w2/w3."""
    fused_gate_up = tensors.pop(prefix + "mlp.experts.gate_up_proj", None)
    fused_down = tensors.pop(prefix + "mlp.experts.down_proj", None)
    if fused_gate_up is None and fused_down is None:
        return
    router = tensors.pop(prefix + "mlp.gate.weight", None)
    if fused_gate_up is None or fused_down is None or router is None:
        raise MappingError(f"{prefix}: incomplete fused expert tensors (need gate_up_proj, down_proj, gate)")
    tensors[prefix + "block_sparse_moe.gate.weight"] = router
    for e in range(hf.num_experts):
        w1, w3 = fused_gate_up[e].chunk(2, dim=0)  # gate rows first, then up
        tensors[prefix + f"block_sparse_moe.experts.{e}.w1.weight"] = w1
        tensors[prefix + f"block_sparse_moe.experts.{e}.w3.weight"] = w3
        tensors[prefix + f"block_sparse_moe.experts.{e}.w2.weight"] = fused_down[e]


def hf_layer_to_megatron(tensors: dict[str, torch.Tensor], layer: int, hf: HFModelConfig) -> dict[str, torch.Tensor]:
    """One decoder layer's HF tensors (either expert layout) -> Megatron tensors, full size."""
    p, m = f"model.layers.{layer}.", f"decoder.layers.{layer}."
    tensors = dict(tensors)
    _classic_experts(tensors, p, hf)
    out = {m + meg: tensors[p + name] for name, meg in ATTENTION.items()}
    out[m + "self_attention.linear_qkv.weight"] = qkv_to_megatron(
        *(tensors[p + f"self_attn.{x}_proj.weight"] for x in "qkv"), hf
    )
    if hf.attention_bias:
        out[m + "self_attention.linear_qkv.bias"] = qkv_to_megatron(
            *(tensors[p + f"self_attn.{x}_proj.bias"] for x in "qkv"), hf
        )
    if hf.is_moe:
        out[m + "mlp.router.weight"] = tensors[p + "block_sparse_moe.gate.weight"]
        for e in range(hf.num_experts):
            experts = p + f"block_sparse_moe.experts.{e}."
            local = m + f"mlp.experts.local_experts.{e}."
            out[local + "linear_fc1.weight"] = torch.cat([tensors[experts + "w1.weight"], tensors[experts + "w3.weight"]])
            out[local + "linear_fc2.weight"] = tensors[experts + "w2.weight"]
    else:
        out[m + "mlp.linear_fc1.weight"] = torch.cat([tensors[p + "mlp.gate_proj.weight"], tensors[p + "mlp.up_proj.weight"]])
        out[m + "mlp.linear_fc2.weight"] = tensors[p + "mlp.down_proj.weight"]
    return out


def megatron_layer_to_hf(tensors: dict[str, torch.Tensor], layer: int, hf: HFModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of `hf_layer_to_megatron`; writes the classic expert layout."""
    p, m = f"model.layers.{layer}.", f"decoder.layers.{layer}."
    out = {p + name: tensors[m + meg] for name, meg in ATTENTION.items()}
    for x, t in zip("qkv", qkv_from_megatron(tensors[m + "self_attention.linear_qkv.weight"], hf)):
        out[p + f"self_attn.{x}_proj.weight"] = t
    if hf.attention_bias:
        for x, t in zip("qkv", qkv_from_megatron(tensors[m + "self_attention.linear_qkv.bias"], hf)):
            out[p + f"self_attn.{x}_proj.bias"] = t
    if hf.is_moe:
        out[p + "block_sparse_moe.gate.weight"] = tensors[m + "mlp.router.weight"]
        for e in range(hf.num_experts):
            local = m + f"mlp.experts.local_experts.{e}."
            w1, w3 = tensors[local + "linear_fc1.weight"].chunk(2, dim=0)
            experts = p + f"block_sparse_moe.experts.{e}."
            out[experts + "w1.weight"], out[experts + "w3.weight"] = w1.contiguous(), w3.contiguous()
            out[experts + "w2.weight"] = tensors[local + "linear_fc2.weight"]
    else:
        gate, up = tensors[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate.contiguous(), up.contiguous()
        out[p + "mlp.down_proj.weight"] = tensors[m + "mlp.linear_fc2.weight"]
    return out


def hf_outer_to_megatron(tensors: dict[str, torch.Tensor], hf: HFModelConfig, padded_vocab: int) -> dict[str, torch.Tensor]:
    out = {
        "embedding.word_embeddings.weight": pad_vocab(tensors["model.embed_tokens.weight"], padded_vocab),
        "decoder.final_layernorm.weight": tensors["model.norm.weight"],
    }
    if not hf.tie_word_embeddings:
        out["output_layer.weight"] = pad_vocab(tensors["lm_head.weight"], padded_vocab)
    return out


def megatron_outer_to_hf(tensors: dict[str, torch.Tensor], hf: HFModelConfig) -> dict[str, torch.Tensor]:
    out = {
        "model.embed_tokens.weight": tensors["embedding.word_embeddings.weight"][: hf.vocab_size].contiguous(),
        "model.norm.weight": tensors["decoder.final_layernorm.weight"],
    }
    if not hf.tie_word_embeddings:
        out["lm_head.weight"] = tensors["output_layer.weight"][: hf.vocab_size].contiguous()
    return out


# -------------------------------------------------------------------------------------- reading HF folders
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


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
            with safe_open(single, framework="pt") as f:
                self.weight_map = {name: "model.safetensors" for name in f.keys()}

    def names(self) -> set[str]:
        return set(self.weight_map)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise MappingError(f"{self.hf_dir}: missing tensors: {', '.join(missing)}")
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for filename, file_names in by_file.items():
            with safe_open(os.path.join(self.hf_dir, filename), framework="pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
        return out

    def has_fused_experts(self, layer: int) -> bool:
        return f"model.layers.{layer}.mlp.experts.gate_up_proj" in self.weight_map

    def read_layer(self, hf: HFModelConfig, layer: int) -> dict[str, torch.Tensor]:
        return self.read(hf_layer_names(hf, layer, fused_experts=self.has_fused_experts(layer)))

    def check_complete(self, hf: HFModelConfig) -> None:
        """Every expected tensor is present and nothing else (names both missing and extra)."""
        expected = set(hf_outer_names(hf))
        for layer in range(hf.num_layers):
            expected.update(hf_layer_names(hf, layer, fused_experts=self.has_fused_experts(layer)))
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
            expected.update(hf_layer_shapes(hf, layer, fused_experts=self.has_fused_experts(layer)))
        by_file: dict[str, list[str]] = {}
        for name in expected:
            if name in self.weight_map:
                by_file.setdefault(self.weight_map[name], []).append(name)
        problems = []
        for filename, names in sorted(by_file.items()):
            with safe_open(os.path.join(self.hf_dir, filename), framework="pt") as f:
                for name in names:
                    tensor_slice = f.get_slice(name)
                    shape, dtype = tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()
                    if shape != expected[name]:
                        problems.append(f"{name}: expected shape {expected[name]}, got {shape}")
                    if dtype not in _FLOAT_DTYPES:
                        problems.append(f"{name}: dtype {dtype} is not a floating-point type")
        if problems:
            raise MappingError(f"{self.hf_dir}: tensors that do not match config.json: " + "; ".join(problems))


# ----------------------------------------------------------------------------------- sharding to this rank
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.*)")
_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(.*)")


@dataclasses.dataclass(frozen=True)
class TensorSplit:
    """How a full Megatron tensor is divided over tensor-parallel ranks.

    `axis` is None for replicated tensors (norms, router). `gated`: the SwiGLU fc1 holds [gate; up] and each
    rank holds [gate shard; up shard], not a plain row chunk. `expert`: split over the expert-TP group.
    `vocab`: rows are the (padded) vocabulary.
    """

    axis: int | None
    gated: bool = False
    expert: bool = False
    vocab: bool = False

    def rank_and_size(self) -> tuple[int, int]:
        if self.expert:
            return (
                parallel_state.get_expert_tensor_parallel_rank(),
                parallel_state.get_expert_tensor_parallel_world_size(),
            )
        return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def tensor_split(name: str) -> TensorSplit:
    """The tensor-parallel split of a Megatron tensor, given its (local-spec) name."""
    expert = ".local_experts." in name
    if name.endswith("linear_fc1.weight"):
        return TensorSplit(axis=0, gated=True, expert=expert)
    if name.endswith(("word_embeddings.weight", "output_layer.weight")):
        return TensorSplit(axis=0, vocab=True)
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return TensorSplit(axis=0, expert=expert)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return TensorSplit(axis=1, expert=expert)
    return TensorSplit(axis=None, expert=expert)  # norms and the router are replicated


def _swiglu_shard(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    gate, up = full.chunk(2, dim=0)
    return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]])


def local_shard(name: str, full: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a full Megatron tensor, given its (local-spec) name."""
    split = tensor_split(name)
    if split.axis is None:
        return full
    rank, size = split.rank_and_size()
    if split.gated:
        return _swiglu_shard(full, rank, size)
    return full.chunk(size, dim=split.axis)[rank]


# The Transformer Engine spec fuses the pre-attention norm (and, in dense layers, the pre-MLP norm) into the
# following linear layer; the stored names are the local spec's.
TE_FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def global_param_names(model_chunk: torch.nn.Module) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
    """(local name, global name, param) for each parameter of a chunk: global layer and expert indices, and
    local-spec names for the Transformer Engine spec's fused norms."""
    num_local_experts = None
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    layer_numbers = {}
    if hasattr(model_chunk, "decoder"):
        layer_numbers = {i: layer.layer_number - 1 for i, layer in enumerate(model_chunk.decoder.layers)}
    for local_name, param in model_chunk.named_parameters():
        name = local_name.removeprefix("module.")
        match = _LAYER.fullmatch(name)
        if match:
            local_layer, rest = int(match.group(1)), match.group(2)
            rest = TE_FUSED_NORMS.get(rest, rest)
            expert = _EXPERT.fullmatch(rest)
            if expert:
                if num_local_experts is None:
                    num_local_experts = len(model_chunk.decoder.layers[local_layer].mlp.experts.local_experts)
                global_expert = ep_rank * num_local_experts + int(expert.group(1))
                rest = f"mlp.experts.local_experts.{global_expert}.{expert.group(2)}"
            name = f"decoder.layers.{layer_numbers[local_layer]}.{rest}"
        yield local_name, name, param


@torch.no_grad()
def load_hf_checkpoint(model_chunks: list[torch.nn.Module], hf_dir: str, hf: HFModelConfig, padded_vocab: int) -> None:
    """Copy an HF checkpoint's weights into this rank's model chunks, one layer at a time."""
    reader = HFCheckpointReader(hf_dir)
    reader.check_complete(hf)
    wanted: dict[str, torch.nn.Parameter] = {}
    for chunk in model_chunks:
        for _, global_name, param in global_param_names(chunk):
            wanted[global_name] = param
    layers = sorted({int(_LAYER.fullmatch(n).group(1)) for n in wanted if _LAYER.fullmatch(n)})
    outer = hf_outer_to_megatron(reader.read(hf_outer_names(hf)), hf, padded_vocab)
    if hf.tie_word_embeddings:  # at PP > 1 the last stage holds its own copy of the tied embedding
        outer["output_layer.weight"] = outer["embedding.word_embeddings.weight"]
    groups = [outer]
    groups += (hf_layer_to_megatron(reader.read_layer(hf, layer), layer, hf) for layer in layers)
    loaded = set()
    for tensors in groups:
        for name, full in tensors.items():
            if name in wanted:
                shard = local_shard(name, full)
                param = wanted[name]
                if shard.shape != param.shape:
                    raise MappingError(f"{name}: shard shape {tuple(shard.shape)} != parameter {tuple(param.shape)}")
                param.copy_(shard)
                loaded.add(name)
    if set(wanted) - loaded:
        raise MappingError("parameters not found in the HF checkpoint: " + ", ".join(sorted(set(wanted) - loaded)))
