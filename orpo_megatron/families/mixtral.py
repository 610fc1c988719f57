"""Mixtral: Mistral's decoder with every MLP a mixture of experts, in Megatron's terms.

Routing equals HF Mixtral's: top-k over the router logits, then a softmax over those k
(`moe_router_pre_softmax=False`), which is the same as softmax-all, top-k, renormalize; no scaling, expert bias
or shared expert. The router runs in fp32.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from orpo_megatron.families.llama import Llama


class Mixtral(Llama):
    architectures = ("MixtralForCausalLM",)

    @classmethod
    def read_fields(cls, field: Callable[..., Any]) -> dict[str, Any]:
        return dict(num_experts=int(field("num_local_experts")), num_experts_per_tok=int(field("num_experts_per_tok")),
                    router_aux_loss_coef=float(field("router_aux_loss_coef", 0.0)))

    def transformer_fields(self, moe_aux_loss_coeff: float | None) -> dict[str, Any]:
        """`moe_aux_loss_coeff` None: the config's `router_aux_loss_coef`."""
        hf = self.hf
        return dict(
            super().transformer_fields(moe_aux_loss_coeff),
            num_moe_experts=hf.num_experts,
            moe_router_topk=hf.num_experts_per_tok,
            moe_router_pre_softmax=False,
            moe_router_dtype="fp32",
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=hf.router_aux_loss_coef if moe_aux_loss_coeff is None else moe_aux_loss_coeff,
            moe_ffn_hidden_size=hf.intermediate_size,
        )

    def megatron_args(self, *, padded_vocab_size: int, make_vocab_size_divisible_by: int,
                      iteration: int) -> dict[str, Any]:
        return dict(super().megatron_args(padded_vocab_size=padded_vocab_size,
                                          make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                          iteration=iteration),
                    moe_ffn_hidden_size=self.hf.intermediate_size, moe_router_topk=self.hf.num_experts_per_tok,
                    moe_router_pre_softmax=False, moe_router_score_function="softmax", moe_layer_freq=1,
                    moe_router_load_balancing_type="aux_loss", moe_router_topk_scaling_factor=None,
                    moe_router_enable_expert_bias=False, moe_shared_expert_intermediate_size=None,
                    moe_grouped_gemm=False)

    def required_args(self) -> list[tuple[str, object, object]]:
        return super().required_args() + [
            ("moe_router_pre_softmax", False, False),
            ("moe_router_score_function", "softmax", "softmax"),
            ("moe_router_topk_scaling_factor", None, None),
            ("moe_router_enable_expert_bias", False, False),
            ("moe_shared_expert_intermediate_size", None, None),
            ("moe_layer_freq", 1, 1),
        ]
