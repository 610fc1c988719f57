"""Mixtral: Mistral's decoder with every MLP a mixture of experts, in Megatron's terms.

Tensor layout: the router is `mlp.router`; the experts are stacked on a second axis after the layers
(`mlp.experts.experts.linear_fc1.weight` is [layers, experts, 2 x ffn, hidden], gate rows then up rows); the
pre-MLP norm is a module of its own (`pre_mlp_layernorm`). HF folders hold the experts either classic
(`block_sparse_moe.experts.E.w1/w2/w3`) or fused as transformers v5 writes them (`mlp.experts.gate_up_proj`
[E, 2 x ffn, h] and `down_proj` [E, h, ffn], already Megatron's stacks); export writes the classic layout.

Routing equals HF Mixtral's: top-k over the router logits, then a softmax over those k
(`moe_router_pre_softmax=False`), which is the same as softmax-all, top-k, renormalize; no scaling, expert bias
or shared expert. The router runs in fp32.
"""
from __future__ import annotations

from collections.abc import Callable, Container, Mapping
from typing import Any, ClassVar

import torch

from orpo_megatron.families.base import LAYERS
from orpo_megatron.families.llama import Llama


class Mixtral(Llama):
    architectures = ("MixtralForCausalLM",)
    # The classic HF layout's names in a decoder layer: the router, the experts' prefix (then `E.`), and each
    # expert's gate, up and down projections.
    hf_router: ClassVar[str] = "block_sparse_moe.gate.weight"
    hf_experts: ClassVar[str] = "block_sparse_moe.experts."
    hf_expert_names: ClassVar[tuple[str, str, str]] = ("w1.weight", "w3.weight", "w2.weight")

    @classmethod
    def read_fields(cls, field: Callable[..., Any], source: str) -> dict[str, Any]:
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
            moe_ffn_hidden_size=hf.expert_intermediate_size,
        )

    def megatron_args(self, *, padded_vocab_size: int, make_vocab_size_divisible_by: int,
                      iteration: int) -> dict[str, Any]:
        return dict(super().megatron_args(padded_vocab_size=padded_vocab_size,
                                          make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                          iteration=iteration),
                    moe_ffn_hidden_size=self.hf.expert_intermediate_size, moe_router_topk=self.hf.num_experts_per_tok,
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

    # ------------------------------------------------------------------------------------- tensor mapping
    def _hf_mlp_shapes(self, p: str, present: Container[str]) -> dict[str, tuple[int, ...]]:
        e, h, ffn = self.hf.num_experts, self.hf.hidden_size, self.hf.expert_intermediate_size
        if p + "mlp.experts.gate_up_proj" in present:
            return {p + "mlp.gate.weight": (e, h), p + "mlp.experts.gate_up_proj": (e, 2 * ffn, h),
                    p + "mlp.experts.down_proj": (e, h, ffn)}
        gate, up, down = self.hf_expert_names
        shapes = {p + self.hf_router: (e, h)}
        for expert in range(e):
            x = p + self.hf_experts + f"{expert}."
            shapes.update({x + gate: (ffn, h), x + down: (h, ffn), x + up: (ffn, h)})
        return shapes

    def _megatron_mlp_shapes(self) -> dict[str, tuple[int, ...]]:
        e, h, ffn = self.hf.num_experts, self.hf.hidden_size, self.hf.expert_intermediate_size
        return {LAYERS + "pre_mlp_layernorm.weight": (h,), LAYERS + "mlp.router.weight": (e, h),
                LAYERS + "mlp.experts.experts.linear_fc1.weight": (e, 2 * ffn, h),
                LAYERS + "mlp.experts.experts.linear_fc2.weight": (e, h, ffn)}

    def _mlp_extra_state_keys(self) -> dict[str, tuple[int, ...]]:
        keys = {LAYERS + "pre_mlp_layernorm._extra_state": (self.hf.num_layers,)}
        for fc in ("linear_fc1", "linear_fc2"):
            keys[LAYERS + f"mlp.experts.experts.{fc}._extra_state"] = (self.hf.num_layers, self.hf.num_experts)
        return keys

    def _mlp_to_megatron(self, tensors: Mapping[str, torch.Tensor],
                         p: str) -> dict[str, Callable[[], torch.Tensor]]:
        if p + "mlp.experts.gate_up_proj" in tensors:
            router = lambda: tensors[p + "mlp.gate.weight"]  # noqa: E731
            fc1 = lambda: tensors[p + "mlp.experts.gate_up_proj"]  # noqa: E731
            fc2 = lambda: tensors[p + "mlp.experts.down_proj"]  # noqa: E731
        else:
            gate, up, down = self.hf_expert_names
            experts = [p + self.hf_experts + f"{e}." for e in range(self.hf.num_experts)]
            router = lambda: tensors[p + self.hf_router]  # noqa: E731
            fc1 = lambda: torch.stack([torch.cat([tensors[x + gate], tensors[x + up]])  # noqa: E731
                                       for x in experts])
            fc2 = lambda: torch.stack([tensors[x + down] for x in experts])  # noqa: E731
        return {LAYERS + "pre_mlp_layernorm.weight": lambda: tensors[p + "post_attention_layernorm.weight"],
                LAYERS + "mlp.router.weight": router,
                LAYERS + "mlp.experts.experts.linear_fc1.weight": fc1,
                LAYERS + "mlp.experts.experts.linear_fc2.weight": fc2}

    def _mlp_to_hf(self, tensors: Mapping[str, torch.Tensor], p: str) -> dict[str, torch.Tensor]:
        gate, up, down = self.hf_expert_names
        out = {p + "post_attention_layernorm.weight": tensors[LAYERS + "pre_mlp_layernorm.weight"],
               p + self.hf_router: tensors[LAYERS + "mlp.router.weight"]}
        fc1 = tensors[LAYERS + "mlp.experts.experts.linear_fc1.weight"]
        fc2 = tensors[LAYERS + "mlp.experts.experts.linear_fc2.weight"]
        for e in range(self.hf.num_experts):
            x = p + self.hf_experts + f"{e}."
            out[x + gate], out[x + up] = fc1[e].chunk(2, dim=0)
            out[x + down] = fc2[e]
        return out
