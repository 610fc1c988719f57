"""Hugging Face <-> Megatron-Core tensor mapping for the Mixtral family, one layer at a time.

The Megatron side is the checkpoint's: the keys of `GPTModel.sharded_state_dict()` as the Transformer Engine
spec names them, layers stacked on a leading axis (`decoder.layers.self_attention.linear_qkv.weight` is
[layers, qkv rows, hidden]) and experts on a second one (`decoder.layers.mlp.experts.experts.linear_fc1.weight`
is [layers, experts, 2 x ffn, hidden], gate rows then up rows). The mapping works on one layer's slice of
those tensors (the layer axis removed), so conversion and export hold one layer at a time; loading a parallel
model goes through the model's own sharded state dict (`checkpoint/weights.py`), so parameter names (local or
TE spec, SequentialMLP or TEGroupedMLP experts) never need translating here.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open

from orpo_megatron.errors import UserError
from orpo_megatron.model_config import HFModelConfig

LAYERS = "decoder.layers."
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"
# The TE spec's key -> the one Megatron's stock local spec uses for the same tensor (it names the MoE pre-MLP
# norm after linear_fc1, as if fused; the TE spec keeps that norm a module of its own).
LOCAL_SPEC_KEYS = {LAYERS + "pre_mlp_layernorm.weight": LAYERS + "mlp.linear_fc1.layer_norm_weight"}


class MappingError(UserError, ValueError):
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
    names = [p + name for name in ("input_layernorm.weight", "self_attn.o_proj.weight",
                                   "post_attention_layernorm.weight")]
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


# ------------------------------------------------------------------------------------------ Megatron keys
def megatron_layer_shapes(hf: HFModelConfig) -> dict[str, tuple[int, ...]]:
    """Stacked checkpoint key -> the shape of one layer's slice of it (the layer axis removed)."""
    h, d, ffn = hf.hidden_size, hf.head_dim, hf.intermediate_size
    q_rows, kv_rows = hf.num_attention_heads * d, hf.num_key_value_heads * d
    shapes = {
        LAYERS + "self_attention.linear_qkv.layer_norm_weight": (h,),
        LAYERS + "self_attention.linear_qkv.weight": (q_rows + 2 * kv_rows, h),
        LAYERS + "self_attention.linear_proj.weight": (h, q_rows),
    }
    if hf.attention_bias:
        shapes[LAYERS + "self_attention.linear_qkv.bias"] = (q_rows + 2 * kv_rows,)
    if hf.is_moe:
        e = hf.num_experts
        shapes[LAYERS + "pre_mlp_layernorm.weight"] = (h,)
        shapes[LAYERS + "mlp.router.weight"] = (e, h)
        shapes[LAYERS + "mlp.experts.experts.linear_fc1.weight"] = (e, 2 * ffn, h)
        shapes[LAYERS + "mlp.experts.experts.linear_fc2.weight"] = (e, h, ffn)
    else:
        shapes[LAYERS + "mlp.linear_fc1.layer_norm_weight"] = (h,)
        shapes[LAYERS + "mlp.linear_fc1.weight"] = (2 * ffn, h)
        shapes[LAYERS + "mlp.linear_fc2.weight"] = (h, ffn)
    return shapes


def megatron_outer_shapes(hf: HFModelConfig, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """The tensors outside the decoder layers; the vocabulary padded to `padded_vocab` rows."""
    shapes = {EMBEDDING: (padded_vocab, hf.hidden_size), FINAL_NORM: (hf.hidden_size,)}
    if not hf.tie_word_embeddings:
        shapes[OUTPUT_LAYER] = (padded_vocab, hf.hidden_size)
    return shapes


def extra_state_keys(hf: HFModelConfig) -> dict[str, tuple[int, ...]]:
    """Keys of the `_extra_state` objects a model saves -> their grid: (layers,), (layers, experts) or (1,).

    The TE spec's linear layers and standalone norms each have one (FP8 metadata); the local spec's linear
    layers and `model.StandaloneRMSNorm` have the same keys with no content.
    """
    layers = (hf.num_layers,)
    keys = {LAYERS + "self_attention.linear_qkv._extra_state": layers,
            LAYERS + "self_attention.linear_proj._extra_state": layers,
            "decoder.final_layernorm._extra_state": (1,)}
    if hf.is_moe:
        keys[LAYERS + "pre_mlp_layernorm._extra_state"] = layers
        for fc in ("linear_fc1", "linear_fc2"):
            keys[LAYERS + f"mlp.experts.experts.{fc}._extra_state"] = (hf.num_layers, hf.num_experts)
    else:
        for fc in ("linear_fc1", "linear_fc2"):
            keys[LAYERS + f"mlp.{fc}._extra_state"] = layers
    return keys


# ------------------------------------------------------------------------------------------ layer mapping
def _experts(tensors: Mapping[str, torch.Tensor], p: str, hf: HFModelConfig) -> dict[str, Callable[[], torch.Tensor]]:
    """Router and stacked expert weights from either HF layout (classic w1/w2/w3, or transformers v5's fused
    `mlp.experts.gate_up_proj` [E, 2 x ffn, h] / `down_proj` [E, h, ffn], which are already Megatron's stacks)."""
    if p + "mlp.experts.gate_up_proj" in tensors:
        return {"router": lambda: tensors[p + "mlp.gate.weight"],
                "fc1": lambda: tensors[p + "mlp.experts.gate_up_proj"],
                "fc2": lambda: tensors[p + "mlp.experts.down_proj"]}
    experts = [p + f"block_sparse_moe.experts.{e}." for e in range(hf.num_experts)]
    fc1 = lambda x: torch.cat([tensors[x + "w1.weight"], tensors[x + "w3.weight"]])  # noqa: E731  gate rows, then up
    return {"router": lambda: tensors[p + "block_sparse_moe.gate.weight"],
            "fc1": lambda: torch.stack([fc1(x) for x in experts]),
            "fc2": lambda: torch.stack([tensors[x + "w2.weight"] for x in experts])}


def hf_layer_to_megatron(tensors: Mapping[str, torch.Tensor], layer: int, hf: HFModelConfig,
                         keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """One decoder layer's HF tensors -> its slice of each stacked Megatron key (only `keys` if given).

    `tensors` may be lazy (`HFCheckpointReader.lazy()`): only the HF tensors the requested keys need are read.
    """
    p, m = f"model.layers.{layer}.", LAYERS
    qkv = lambda kind: qkv_to_megatron(*(tensors[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"), hf)  # noqa: E731
    build = {
        m + "self_attention.linear_qkv.layer_norm_weight": lambda: tensors[p + "input_layernorm.weight"],
        m + "self_attention.linear_qkv.weight": lambda: qkv("weight"),
        m + "self_attention.linear_qkv.bias": lambda: qkv("bias"),
        m + "self_attention.linear_proj.weight": lambda: tensors[p + "self_attn.o_proj.weight"],
    }
    if hf.is_moe:
        experts = _experts(tensors, p, hf)
        build.update({
            m + "pre_mlp_layernorm.weight": lambda: tensors[p + "post_attention_layernorm.weight"],
            m + "mlp.router.weight": experts["router"],
            m + "mlp.experts.experts.linear_fc1.weight": experts["fc1"],
            m + "mlp.experts.experts.linear_fc2.weight": experts["fc2"],
        })
    else:
        build.update({
            m + "mlp.linear_fc1.layer_norm_weight": lambda: tensors[p + "post_attention_layernorm.weight"],
            m + "mlp.linear_fc1.weight": lambda: torch.cat([tensors[p + "mlp.gate_proj.weight"],
                                                            tensors[p + "mlp.up_proj.weight"]]),
            m + "mlp.linear_fc2.weight": lambda: tensors[p + "mlp.down_proj.weight"],
        })
    return {key: build[key]() for key in (megatron_layer_shapes(hf) if keys is None else keys)}


def megatron_layer_to_hf(tensors: Mapping[str, torch.Tensor], layer: int, hf: HFModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of `hf_layer_to_megatron` (one layer's slices); writes the classic expert layout."""
    p, m = f"model.layers.{layer}.", LAYERS
    out = {p + "input_layernorm.weight": tensors[m + "self_attention.linear_qkv.layer_norm_weight"],
           p + "self_attn.o_proj.weight": tensors[m + "self_attention.linear_proj.weight"]}
    kinds = ("weight", "bias") if hf.attention_bias else ("weight",)
    for kind in kinds:
        for x, t in zip("qkv", qkv_from_megatron(tensors[m + f"self_attention.linear_qkv.{kind}"], hf)):
            out[p + f"self_attn.{x}_proj.{kind}"] = t
    if hf.is_moe:
        out[p + "post_attention_layernorm.weight"] = tensors[m + "pre_mlp_layernorm.weight"]
        out[p + "block_sparse_moe.gate.weight"] = tensors[m + "mlp.router.weight"]
        fc1 = tensors[m + "mlp.experts.experts.linear_fc1.weight"]
        fc2 = tensors[m + "mlp.experts.experts.linear_fc2.weight"]
        for e in range(hf.num_experts):
            w1, w3 = fc1[e].chunk(2, dim=0)
            experts = p + f"block_sparse_moe.experts.{e}."
            out[experts + "w1.weight"], out[experts + "w3.weight"] = w1, w3
            out[experts + "w2.weight"] = fc2[e]
    else:
        out[p + "post_attention_layernorm.weight"] = tensors[m + "mlp.linear_fc1.layer_norm_weight"]
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = tensors[m + "mlp.linear_fc1.weight"].chunk(2)
        out[p + "mlp.down_proj.weight"] = tensors[m + "mlp.linear_fc2.weight"]
    return {name: tensor.contiguous() for name, tensor in out.items()}


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

    def has_fused_experts(self, layer: int) -> bool:
        return f"model.layers.{layer}.mlp.experts.gate_up_proj" in self.weight_map

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
