"""Llama and Mistral: the dense decoder (pre-RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, no linear biases
but optional QKV biases; per-head q/k RMSNorms where a family sets `qk_layernorm`) in Megatron's terms. Mistral's
`sliding_window` is read but not applied: ORPO sequences are shorter than Mistral's window. Families built on this
decoder (`mixtral.py`) subclass it and replace its MLP (the `_mlp_*` methods).

Tensor layout: Megatron's `linear_qkv` interleaves q/k/v per query group; `linear_fc1` holds the gate rows, then
the up rows; the norms before attention and before a dense MLP are fused into `linear_qkv` and `linear_fc1`; the
q/k norms are `self_attention.q_layernorm` / `k_layernorm` ([layers, head_dim]).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Container, Iterable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from orpo_megatron.families.base import LAYERS, HFModelConfig, ModelFamily


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


class Llama(ModelFamily):
    architectures = ("MistralForCausalLM", "LlamaForCausalLM")
    # An RMSNorm over each query and key head before RoPE (HF's `self_attn.q_norm` / `k_norm`).
    qk_layernorm: ClassVar[bool] = False

    @classmethod
    def read_fields(cls, field: Callable[..., Any], source: str) -> dict[str, Any]:
        return {}

    def transformer_fields(self, moe_aux_loss_coeff: float | None) -> dict[str, Any]:
        hf = self.hf
        return dict(
            num_layers=hf.num_layers,
            hidden_size=hf.hidden_size,
            num_attention_heads=hf.num_attention_heads,
            num_query_groups=hf.num_key_value_heads,
            kv_channels=hf.head_dim,
            ffn_hidden_size=hf.intermediate_size,
            normalization="RMSNorm",
            layernorm_epsilon=hf.rms_norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=hf.attention_bias,
            qk_layernorm=self.qk_layernorm,
            init_method_std=hf.initializer_range,
        )

    def megatron_args(self, *, padded_vocab_size: int, make_vocab_size_divisible_by: int,
                      iteration: int) -> dict[str, Any]:
        hf = self.hf
        return dict(
            num_layers=hf.num_layers, hidden_size=hf.hidden_size, ffn_hidden_size=hf.intermediate_size,
            num_attention_heads=hf.num_attention_heads, kv_channels=hf.head_dim,
            group_query_attention=hf.num_key_value_heads != hf.num_attention_heads,
            num_query_groups=hf.num_key_value_heads, max_position_embeddings=hf.max_position_embeddings,
            position_embedding_type="rope", add_position_embedding=False, use_rotary_position_embeddings=True,
            rotary_base=int(hf.rope_theta), rotary_percent=1.0, rotary_interleaved=False,
            normalization="RMSNorm", norm_epsilon=hf.rms_norm_eps, apply_layernorm_1p=False, swiglu=True,
            squared_relu=False, add_bias_linear=False, add_qkv_bias=hf.attention_bias, qk_layernorm=self.qk_layernorm,
            untie_embeddings_and_output_weights=not hf.tie_word_embeddings,
            attention_dropout=0.0, hidden_dropout=0.0, init_method_std=hf.initializer_range,
            vocab_size=hf.vocab_size, padded_vocab_size=padded_vocab_size,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by, tokenizer_type="HuggingFaceTokenizer",
            num_experts=hf.num_experts, ckpt_format="torch_dist", use_dist_ckpt=True, iteration=iteration,
            use_distributed_optimizer=True, dist_ckpt_optim_fully_reshardable=True,
        )

    def stored_model(self, args: argparse.Namespace) -> dict[str, object]:
        """Megatron-LM's defaults for arguments an older checkpoint lacks; the experts are compared for every
        family, so a dense config given for an MoE checkpoint (or the reverse) is named."""
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

    def config_model(self) -> dict[str, object]:
        hf = self.hf
        return {
            "num_hidden_layers": hf.num_layers, "hidden_size": hf.hidden_size,
            "num_attention_heads": hf.num_attention_heads, "num_key_value_heads": hf.num_key_value_heads,
            "head_dim": hf.head_dim, "intermediate_size": hf.intermediate_size, "rope_theta": int(hf.rope_theta),
            "tie_word_embeddings": hf.tie_word_embeddings, "num_local_experts": hf.num_experts,
            "num_experts_per_tok": hf.num_experts_per_tok, "attention_bias": hf.attention_bias,
        }

    def required_args(self) -> list[tuple[str, object, object]]:
        return [
            ("normalization", "RMSNorm", "LayerNorm"),
            ("swiglu", True, False),
            ("position_embedding_type", "rope", "learned_absolute"),
            ("add_bias_linear", False, True),
            ("qk_layernorm", self.qk_layernorm, False),
        ]

    # ------------------------------------------------------------------------------------- tensor mapping
    def hf_layer_shapes(self, layer: int, present: Container[str] = ()) -> dict[str, tuple[int, ...]]:
        hf, p = self.hf, f"model.layers.{layer}."
        h, q_rows, kv_rows = hf.hidden_size, hf.num_attention_heads * hf.head_dim, hf.num_key_value_heads * hf.head_dim
        shapes = {p + "input_layernorm.weight": (h,), p + "self_attn.o_proj.weight": (h, q_rows),
                  p + "post_attention_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (q_rows, h),
                  p + "self_attn.k_proj.weight": (kv_rows, h), p + "self_attn.v_proj.weight": (kv_rows, h)}
        if hf.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q_rows,), p + "self_attn.k_proj.bias": (kv_rows,),
                           p + "self_attn.v_proj.bias": (kv_rows,)})
        if self.qk_layernorm:
            shapes.update({p + f"self_attn.{x}_norm.weight": (hf.head_dim,) for x in "qk"})
        return shapes | self._hf_mlp_shapes(p, present)

    def _hf_mlp_shapes(self, p: str, present: Container[str]) -> dict[str, tuple[int, ...]]:
        h, ffn = self.hf.hidden_size, self.hf.intermediate_size
        return {p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
                p + "mlp.down_proj.weight": (h, ffn)}

    def megatron_layer_shapes(self) -> dict[str, tuple[int, ...]]:
        hf = self.hf
        h, q_rows, kv_rows = hf.hidden_size, hf.num_attention_heads * hf.head_dim, hf.num_key_value_heads * hf.head_dim
        shapes = {
            LAYERS + "self_attention.linear_qkv.layer_norm_weight": (h,),
            LAYERS + "self_attention.linear_qkv.weight": (q_rows + 2 * kv_rows, h),
            LAYERS + "self_attention.linear_proj.weight": (h, q_rows),
        }
        if hf.attention_bias:
            shapes[LAYERS + "self_attention.linear_qkv.bias"] = (q_rows + 2 * kv_rows,)
        if self.qk_layernorm:
            shapes.update({LAYERS + "self_attention.q_layernorm.weight": (hf.head_dim,),
                           LAYERS + "self_attention.k_layernorm.weight": (hf.head_dim,)})
        return shapes | self._megatron_mlp_shapes()

    def _megatron_mlp_shapes(self) -> dict[str, tuple[int, ...]]:
        h, ffn = self.hf.hidden_size, self.hf.intermediate_size
        return {LAYERS + "mlp.linear_fc1.layer_norm_weight": (h,), LAYERS + "mlp.linear_fc1.weight": (2 * ffn, h),
                LAYERS + "mlp.linear_fc2.weight": (h, ffn)}

    def extra_state_keys(self) -> dict[str, tuple[int, ...]]:
        """The TE spec's linear layers and standalone norms each have one (FP8 metadata); the local spec's linear
        layers and `model.StandaloneRMSNorm` have the same keys with no content."""
        layers = (self.hf.num_layers,)
        keys = {LAYERS + "self_attention.linear_qkv._extra_state": layers,
                LAYERS + "self_attention.linear_proj._extra_state": layers,
                "decoder.final_layernorm._extra_state": (1,)}
        if self.qk_layernorm:
            keys.update({LAYERS + "self_attention.q_layernorm._extra_state": layers,
                         LAYERS + "self_attention.k_layernorm._extra_state": layers})
        return keys | self._mlp_extra_state_keys()

    def _mlp_extra_state_keys(self) -> dict[str, tuple[int, ...]]:
        return {LAYERS + f"mlp.{fc}._extra_state": (self.hf.num_layers,) for fc in ("linear_fc1", "linear_fc2")}

    def hf_layer_to_megatron(self, tensors: Mapping[str, torch.Tensor], layer: int,
                             keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        p, m = f"model.layers.{layer}.", LAYERS
        qkv = lambda kind: qkv_to_megatron(*(tensors[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"),  # noqa: E731
                                           self.hf)
        build = {
            m + "self_attention.linear_qkv.layer_norm_weight": lambda: tensors[p + "input_layernorm.weight"],
            m + "self_attention.linear_qkv.weight": lambda: qkv("weight"),
            m + "self_attention.linear_qkv.bias": lambda: qkv("bias"),
            m + "self_attention.linear_proj.weight": lambda: tensors[p + "self_attn.o_proj.weight"],
            m + "self_attention.q_layernorm.weight": lambda: tensors[p + "self_attn.q_norm.weight"],
            m + "self_attention.k_layernorm.weight": lambda: tensors[p + "self_attn.k_norm.weight"],
            **self._mlp_to_megatron(tensors, p),
        }
        return {key: build[key]() for key in (self.megatron_layer_shapes() if keys is None else keys)}

    def _mlp_to_megatron(self, tensors: Mapping[str, torch.Tensor],
                         p: str) -> dict[str, Callable[[], torch.Tensor]]:
        """Stacked Megatron key -> how to build its layer slice from the HF tensors of the layer at prefix `p`."""
        return {
            LAYERS + "mlp.linear_fc1.layer_norm_weight": lambda: tensors[p + "post_attention_layernorm.weight"],
            LAYERS + "mlp.linear_fc1.weight": lambda: torch.cat([tensors[p + "mlp.gate_proj.weight"],
                                                                 tensors[p + "mlp.up_proj.weight"]]),
            LAYERS + "mlp.linear_fc2.weight": lambda: tensors[p + "mlp.down_proj.weight"],
        }

    def megatron_layer_to_hf(self, tensors: Mapping[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
        p, m = f"model.layers.{layer}.", LAYERS
        out = {p + "input_layernorm.weight": tensors[m + "self_attention.linear_qkv.layer_norm_weight"],
               p + "self_attn.o_proj.weight": tensors[m + "self_attention.linear_proj.weight"]}
        for kind in ("weight", "bias") if self.hf.attention_bias else ("weight",):
            for x, t in zip("qkv", qkv_from_megatron(tensors[m + f"self_attention.linear_qkv.{kind}"], self.hf)):
                out[p + f"self_attn.{x}_proj.{kind}"] = t
        if self.qk_layernorm:
            for x in "qk":
                out[p + f"self_attn.{x}_norm.weight"] = tensors[m + f"self_attention.{x}_layernorm.weight"]
        out.update(self._mlp_to_hf(tensors, p))
        return {name: tensor.contiguous() for name, tensor in out.items()}

    def _mlp_to_hf(self, tensors: Mapping[str, torch.Tensor], p: str) -> dict[str, torch.Tensor]:
        gate, up = tensors[LAYERS + "mlp.linear_fc1.weight"].chunk(2)
        return {p + "post_attention_layernorm.weight": tensors[LAYERS + "mlp.linear_fc1.layer_norm_weight"],
                p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                p + "mlp.down_proj.weight": tensors[LAYERS + "mlp.linear_fc2.weight"]}
