"""Llama and Mistral: the dense decoder (pre-RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, no linear biases
but optional QKV biases) in Megatron's terms. Mistral's `sliding_window` is read but not applied: ORPO sequences
are shorter than Mistral's window. Families built on this decoder (`mixtral.py`) subclass it.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F

from orpo_megatron.families.base import ModelFamily


class Llama(ModelFamily):
    architectures = ("MistralForCausalLM", "LlamaForCausalLM")

    @classmethod
    def read_fields(cls, field: Callable[..., Any]) -> dict[str, Any]:
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
            squared_relu=False, add_bias_linear=False, add_qkv_bias=hf.attention_bias,
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
        ]
