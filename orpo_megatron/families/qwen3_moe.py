"""Qwen3-MoE: Mixtral's decoder with an RMSNorm over each query and key head before RoPE, an explicit `head_dim`,
experts of their own FFN size (`moe_intermediate_size`) and routing with or without top-k renormalization, in
Megatron's terms.

Only models whose every layer is MoE are supported (Qwen3-30B-A3B and 235B-A22B are): a config with
`mlp_only_layers` or `decoder_sparse_step` != 1 is refused.

Routing equals HF's for both values of `norm_topk_prob` (softmax over all experts, top-k, renormalized over the k
when True): True is Megatron's `moe_router_pre_softmax=False` (top-k over the logits, softmax over those k, the
same weights); False is `moe_router_pre_softmax=True` (softmax over all, then top-k, not renormalized).

Tensor layout: Mixtral's, with the q/k norms of `llama.py`; HF folders hold the experts as
`mlp.experts.E.{gate,up,down}_proj` (what transformers v5 writes by default) or fused as `mlp.experts.gate_up_proj`
/ `down_proj`, the router as `mlp.gate`.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from orpo_megatron.families.base import ModelConfigError
from orpo_megatron.families.mixtral import Mixtral


def refuse_dense_layers(field: Callable[..., Any], source: str) -> None:
    """Qwen-MoE configs may mix dense MLP layers among MoE ones; Megatron-Core can (`moe_layer_freq` as a list)
    but this project's layer specs and checkpoint mapping build every layer alike."""
    dense = field("mlp_only_layers", [])
    if dense:
        raise ModelConfigError(f"{source}: mlp_only_layers={dense!r} makes those layers dense MLPs; dense layers "
                               "among MoE layers are not supported yet (expected [])")
    step = field("decoder_sparse_step", 1)
    if step != 1:
        raise ModelConfigError(f"{source}: decoder_sparse_step={step!r} makes only one layer in {step} MoE; dense "
                               "layers among MoE layers are not supported yet (expected 1)")


class Qwen3Moe(Mixtral):
    architectures = ("Qwen3MoeForCausalLM",)
    hf_router = "mlp.gate.weight"
    hf_experts = "mlp.experts."
    hf_expert_names = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
    qk_layernorm = True

    @classmethod
    def read_fields(cls, field: Callable[..., Any], source: str) -> dict[str, Any]:
        refuse_dense_layers(field, source)
        if field("attention_bias", False):
            # HF's Qwen3 attention then has an o_proj bias too, which Megatron's `add_qkv_bias` does not build.
            raise ModelConfigError(f"{source}: attention_bias=true is not supported for Qwen3-MoE (expected false)")
        # transformers v5 writes `num_experts` under Mixtral's name, `num_local_experts`.
        experts = field("num_experts", None) or field("num_local_experts")
        return dict(num_experts=int(experts), num_experts_per_tok=int(field("num_experts_per_tok")),
                    moe_intermediate_size=int(field("moe_intermediate_size")),
                    norm_topk_prob=bool(field("norm_topk_prob", False)),
                    router_aux_loss_coef=float(field("router_aux_loss_coef", 0.0)))

    def transformer_fields(self, moe_aux_loss_coeff: float | None) -> dict[str, Any]:
        return dict(super().transformer_fields(moe_aux_loss_coeff), moe_router_pre_softmax=not self.hf.norm_topk_prob)

    def megatron_args(self, *, padded_vocab_size: int, make_vocab_size_divisible_by: int,
                      iteration: int) -> dict[str, Any]:
        return dict(super().megatron_args(padded_vocab_size=padded_vocab_size,
                                          make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                          iteration=iteration),
                    moe_router_pre_softmax=not self.hf.norm_topk_prob)

    def stored_model(self, args: argparse.Namespace) -> dict[str, object]:
        """The dense FFN size (`ffn_hidden_size`) and the experts' (`moe_ffn_hidden_size`) apart, and the
        renormalization of the top-k weights as Megatron-LM's `moe_router_pre_softmax` says it."""
        get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        return dict(super().stored_model(args), intermediate_size=get("ffn_hidden_size"),
                    moe_intermediate_size=get("moe_ffn_hidden_size"),
                    norm_topk_prob=not get("moe_router_pre_softmax", False))

    def config_model(self) -> dict[str, object]:
        return dict(super().config_model(), moe_intermediate_size=self.hf.moe_intermediate_size,
                    norm_topk_prob=self.hf.norm_topk_prob)

    def required_args(self) -> list[tuple[str, object, object]]:
        """`moe_router_pre_softmax` follows `norm_topk_prob` (compared in `stored_model`)."""
        return [arg for arg in super().required_args() if arg[0] != "moe_router_pre_softmax"]
