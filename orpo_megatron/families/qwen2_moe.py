"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen3-MoE's routed experts without the q/k norms, with QKV biases
(`qkv_bias`, default true) and a shared expert beside the routed ones, in Megatron's terms.

The shared expert is a SwiGLU MLP of `shared_expert_intermediate_size` whose output is scaled by a sigmoid gate,
sigmoid(x W) with W of [1, hidden] (HF's `shared_expert_gate`), and added to the routed experts' output: Megatron's
`moe_shared_expert_intermediate_size` with `moe_shared_expert_gate` (`SharedExpertMLP`, the same product).
Routing usually keeps the top-k weights unnormalized (`norm_topk_prob` false).

Tensor layout: Qwen3-MoE's MLP plus `mlp.shared_experts.linear_fc1` ([layers, 2 x shared ffn, hidden], gate rows then
up rows), `linear_fc2` and `gate_weight` ([layers, 1, hidden]); HF's `mlp.shared_expert.{gate,up,down}_proj` and
`mlp.shared_expert_gate`.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Container, Mapping
from typing import Any

import torch

from orpo_megatron.families.base import LAYERS
from orpo_megatron.families.qwen3_moe import Qwen3Moe, refuse_dense_layers

SHARED = LAYERS + "mlp.shared_experts."


class Qwen2Moe(Qwen3Moe):
    architectures = ("Qwen2MoeForCausalLM",)
    qk_layernorm = False

    @classmethod
    def read_fields(cls, field: Callable[..., Any], source: str) -> dict[str, Any]:
        refuse_dense_layers(field, source)
        return dict(num_experts=int(field("num_experts")), num_experts_per_tok=int(field("num_experts_per_tok")),
                    moe_intermediate_size=int(field("moe_intermediate_size")),
                    shared_expert_intermediate_size=int(field("shared_expert_intermediate_size")),
                    norm_topk_prob=bool(field("norm_topk_prob", False)),
                    router_aux_loss_coef=float(field("router_aux_loss_coef", 0.0)),
                    attention_bias=bool(field("qkv_bias", True)))

    def transformer_fields(self, moe_aux_loss_coeff: float | None) -> dict[str, Any]:
        return dict(super().transformer_fields(moe_aux_loss_coeff),
                    moe_shared_expert_intermediate_size=self.hf.shared_expert_intermediate_size,
                    moe_shared_expert_gate=True)

    def megatron_args(self, *, padded_vocab_size: int, make_vocab_size_divisible_by: int,
                      iteration: int) -> dict[str, Any]:
        return dict(super().megatron_args(padded_vocab_size=padded_vocab_size,
                                          make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                          iteration=iteration),
                    moe_shared_expert_intermediate_size=self.hf.shared_expert_intermediate_size,
                    moe_shared_expert_gate=True)

    def stored_model(self, args: argparse.Namespace) -> dict[str, object]:
        return dict(super().stored_model(args),
                    shared_expert_intermediate_size=getattr(args, "moe_shared_expert_intermediate_size", None))

    def config_model(self) -> dict[str, object]:
        return dict(super().config_model(), shared_expert_intermediate_size=self.hf.shared_expert_intermediate_size)

    def required_args(self) -> list[tuple[str, object, object]]:
        """The shared expert's size is compared in `stored_model`; its gate is required."""
        return [arg for arg in super().required_args() if arg[0] != "moe_shared_expert_intermediate_size"] + [
            ("moe_shared_expert_gate", True, False)]

    # ------------------------------------------------------------------------------------- tensor mapping
    def _hf_mlp_shapes(self, p: str, present: Container[str]) -> dict[str, tuple[int, ...]]:
        h, ffn = self.hf.hidden_size, self.hf.shared_expert_intermediate_size
        x = p + "mlp.shared_expert."
        return super()._hf_mlp_shapes(p, present) | {
            x + "gate_proj.weight": (ffn, h), x + "up_proj.weight": (ffn, h), x + "down_proj.weight": (h, ffn),
            p + "mlp.shared_expert_gate.weight": (1, h)}

    def _megatron_mlp_shapes(self) -> dict[str, tuple[int, ...]]:
        h, ffn = self.hf.hidden_size, self.hf.shared_expert_intermediate_size
        return super()._megatron_mlp_shapes() | {SHARED + "linear_fc1.weight": (2 * ffn, h),
                                                 SHARED + "linear_fc2.weight": (h, ffn),
                                                 SHARED + "gate_weight": (1, h)}

    def _mlp_extra_state_keys(self) -> dict[str, tuple[int, ...]]:
        return super()._mlp_extra_state_keys() | {SHARED + f"{fc}._extra_state": (self.hf.num_layers,)
                                                  for fc in ("linear_fc1", "linear_fc2")}

    def _mlp_to_megatron(self, tensors: Mapping[str, torch.Tensor],
                         p: str) -> dict[str, Callable[[], torch.Tensor]]:
        x = p + "mlp.shared_expert."
        return super()._mlp_to_megatron(tensors, p) | {
            SHARED + "linear_fc1.weight": lambda: torch.cat([tensors[x + "gate_proj.weight"],
                                                             tensors[x + "up_proj.weight"]]),
            SHARED + "linear_fc2.weight": lambda: tensors[x + "down_proj.weight"],
            SHARED + "gate_weight": lambda: tensors[p + "mlp.shared_expert_gate.weight"]}

    def _mlp_to_hf(self, tensors: Mapping[str, torch.Tensor], p: str) -> dict[str, torch.Tensor]:
        x = p + "mlp.shared_expert."
        gate, up = tensors[SHARED + "linear_fc1.weight"].chunk(2)
        return super()._mlp_to_hf(tensors, p) | {
            x + "gate_proj.weight": gate, x + "up_proj.weight": up,
            x + "down_proj.weight": tensors[SHARED + "linear_fc2.weight"],
            p + "mlp.shared_expert_gate.weight": tensors[SHARED + "gate_weight"]}
