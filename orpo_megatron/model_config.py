"""A run's Megatron-Core `TransformerConfig`: the model family's architecture fields with the run's parallel
layout, numerics and fused kernels, plus vocabulary padding.

What a config.json means is its family's (`families/`); this module does not build modules (`model.py`) or move
weights (`checkpoint/hf_mapping.py`). `HFModelConfig` is imported from here by most of the package.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Any

import torch
from megatron.core.transformer import TransformerConfig

from orpo_megatron.families import HFModelConfig


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron's rule: round the vocabulary up so every TP rank holds an equal, aligned slice."""
    multiple = make_vocab_size_divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


@dataclasses.dataclass
class PrecisionConfig:
    """Numerics of a run: parameter dtype and the optional FP8 recipe (applied through Transformer Engine)."""

    bf16: bool = False
    fp8_format: str | None = None  # None, "e4m3" or "hybrid"
    fp8_recipe: str = "delayed"  # "delayed" or "tensorwise" (current scaling)
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    fp8_margin: int = 0

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


@dataclasses.dataclass(frozen=True)
class FusedKernels:
    """GPU kernels a run on the Transformer Engine spec uses; all off on the local spec (CPU), whose unfused
    paths are exact and run everywhere.

    moe_grouped_gemm: the local experts as TEGroupedMLP, one grouped GEMM per projection, instead of
        SequentialMLP's loop over experts.
    moe_permute_fusion: TE's fused token permutation in the MoE dispatcher.
    apply_rope_fusion, bias_dropout_fusion, masked_softmax_fusion: fused RoPE, residual add, softmax.
    gradient_accumulation_fusion: weight gradients accumulated straight into DDP's fp32 buffer; the output layer
        (Megatron's own linear) needs Apex's `fused_weight_gradient_mlp_cuda` for it.
    """

    moe_grouped_gemm: bool = False
    moe_permute_fusion: bool = False
    apply_rope_fusion: bool = False
    bias_dropout_fusion: bool = False
    masked_softmax_fusion: bool = False
    gradient_accumulation_fusion: bool = False

    @classmethod
    def for_backend(cls, use_transformer_engine: bool) -> "FusedKernels":
        """All of them on the TE spec (gradient accumulation fusion where Apex's kernel is installed)."""
        if not use_transformer_engine:
            return cls()
        return cls(moe_grouped_gemm=True, moe_permute_fusion=True, apply_rope_fusion=True, bias_dropout_fusion=True,
                   masked_softmax_fusion=True,
                   gradient_accumulation_fusion=importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None)


def build_transformer_config(
    hf: HFModelConfig,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
    sequence_parallel: bool = False,
    precision: PrecisionConfig | None = None,
    moe_aux_loss_coeff: float | None = None,
    moe_token_dispatcher_type: str = "alltoall",
    recompute_granularity: str | None = None,
    kernels: FusedKernels | None = None,
) -> TransformerConfig:
    """Translate an HF config into a TransformerConfig for the given parallel layout.

    The architecture's fields are its family's (`HFModelConfig.family`). Dropout is off (ORPO fine-tuning, as
    TRL's `disable_dropout=True`). `kernels` (default: none) are the fused GPU kernels of the Transformer Engine
    spec; `moe_aux_loss_coeff` None keeps the config's.
    """
    precision = precision or PrecisionConfig()
    kernels = kernels or FusedKernels()
    on_gpu = torch.cuda.is_available()
    moe_kwargs: dict[str, Any] = {}
    if hf.is_moe:
        moe_kwargs = dict(
            moe_token_dispatcher_type=moe_token_dispatcher_type,
            moe_grouped_gemm=kernels.moe_grouped_gemm,
            moe_permute_fusion=kernels.moe_permute_fusion,
            # FP8 grouped GEMMs take each expert's rows in multiples of 16: the alltoall dispatcher can pad the
            # routing map once per layer, otherwise TEGroupedMLP pads and unpads its inputs and probs on every
            # pass (megatron-core refuses it with the allgather dispatcher).
            moe_router_padding_for_quantization=bool(precision.fp8_format) and kernels.moe_grouped_gemm
            and moe_token_dispatcher_type == "alltoall",
        )
    # Interleaved schedule: megatron-core's default batched p2p sends an activation and a gradient in one call,
    # and at PP=2 both go to the one other rank, posted in another order than the receiver posts its receives:
    # matched by order, the two (same shape) swap silently. Megatron-LM forbids that mode at PP=2 for NCCL too;
    # its default for VP, overlapped p2p, exchanges each direction in its own call (and group at PP=2).
    interleaved = virtual_pipeline_model_parallel_size is not None
    fp8_kwargs: dict[str, Any] = {}
    if precision.fp8_format:
        fp8_kwargs = dict(
            fp8=precision.fp8_format,
            fp8_recipe=precision.fp8_recipe,
            fp8_amax_history_len=precision.fp8_amax_history_len,
            fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
            fp8_margin=precision.fp8_margin,
        )
    return TransformerConfig(
        **hf.family.transformer_fields(moe_aux_loss_coeff),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        overlap_p2p_comm=interleaved,
        batch_p2p_comm=not interleaved,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        sequence_parallel=sequence_parallel,
        bf16=precision.bf16,
        params_dtype=precision.params_dtype,
        pipeline_dtype=precision.params_dtype,
        autocast_dtype=precision.params_dtype,
        bias_dropout_fusion=kernels.bias_dropout_fusion,
        masked_softmax_fusion=kernels.masked_softmax_fusion,
        apply_rope_fusion=kernels.apply_rope_fusion,
        gradient_accumulation_fusion=kernels.gradient_accumulation_fusion,
        persist_layer_norm=False,
        use_cpu_initialization=not on_gpu,
        recompute_granularity=recompute_granularity,
        recompute_method="uniform" if recompute_granularity == "full" else None,
        recompute_num_layers=1 if recompute_granularity == "full" else None,
        **moe_kwargs,
        **fp8_kwargs,
    )
