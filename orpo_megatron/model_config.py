"""Hugging Face `config.json` -> Megatron-Core `TransformerConfig`.

Owns the reading of Mixtral / Mistral / Llama configs and the translation of every architectural field into
Megatron's names, plus vocabulary padding. It does not build modules (`model.py`) or move weights
(`checkpoint/hf_mapping.py`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from orpo_megatron.errors import UserError

SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM", "MistralForCausalLM", "LlamaForCausalLM")


class ModelConfigError(UserError, ValueError):
    """A config.json this project cannot run, with the file and field named."""


@dataclasses.dataclass(frozen=True)
class HFModelConfig:
    """The architectural fields of a Mixtral-family `config.json`, validated.

    `num_experts` is None for the dense (Mistral / Llama) members of the family.
    """

    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    initializer_range: float
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    router_aux_loss_coef: float = 0.0
    attention_bias: bool = False
    sliding_window: int | None = None
    raw: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config.json") -> "HFModelConfig":
        architectures = config.get("architectures") or []
        architecture = architectures[0] if architectures else None
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"{source}: architectures={architectures!r} is not supported; expected one of "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def field(name: str, default: Any = KeyError) -> Any:
            if name in config and config[name] is not None:
                return config[name]
            if default is KeyError:
                raise ModelConfigError(f"{source}: required field '{name}' is missing")
            return default

        # transformers v5 moved rope_theta / rope_scaling into rope_parameters.
        rope = config.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", "default")
        if config.get("rope_scaling") or rope_type not in ("default", None):
            raise ModelConfigError(
                f"{source}: RoPE scaling ({config.get('rope_scaling') or rope}) is not supported; "
                "only plain RoPE (Mixtral, Mistral, Llama 2) is"
            )
        rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        if field("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"{source}: hidden_act={config['hidden_act']!r}; expected 'silu'")

        hidden_size = int(field("hidden_size"))
        heads = int(field("num_attention_heads"))
        is_moe = architecture == "MixtralForCausalLM"
        return cls(
            architecture=architecture,
            num_layers=int(field("num_hidden_layers")),
            hidden_size=hidden_size,
            num_attention_heads=heads,
            num_key_value_heads=int(field("num_key_value_heads", heads)),
            head_dim=int(field("head_dim", hidden_size // heads)),
            intermediate_size=int(field("intermediate_size")),
            vocab_size=int(field("vocab_size")),
            max_position_embeddings=int(field("max_position_embeddings")),
            rope_theta=rope_theta,
            rms_norm_eps=float(field("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(field("tie_word_embeddings", False)),
            initializer_range=float(field("initializer_range", 0.02)),
            num_experts=int(field("num_local_experts")) if is_moe else None,
            num_experts_per_tok=int(field("num_experts_per_tok")) if is_moe else None,
            router_aux_loss_coef=float(field("router_aux_loss_coef", 0.0)) if is_moe else 0.0,
            attention_bias=bool(field("attention_bias", False)),
            sliding_window=config.get("sliding_window"),
            raw=dict(config),
        )

    @classmethod
    def from_file(cls, path: str) -> "HFModelConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except FileNotFoundError:
            raise ModelConfigError(f"{path}: no such file; expected a Hugging Face config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(config, source=path)


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
    sequence_parallel: bool = False,
    precision: PrecisionConfig | None = None,
    moe_aux_loss_coeff: float | None = None,
    moe_token_dispatcher_type: str = "alltoall",
    recompute_granularity: str | None = None,
    kernels: FusedKernels | None = None,
) -> TransformerConfig:
    """Translate an HF config into a TransformerConfig for the given parallel layout.

    Routing equals HF Mixtral's: top-k over the router logits, then a softmax over those k
    (`moe_router_pre_softmax=False`), which is the same as softmax-all, top-k, renormalize. The router runs
    in fp32. Dropout is off (ORPO fine-tuning, as TRL's `disable_dropout=True`). `kernels` (default: none) are
    the fused GPU kernels of the Transformer Engine spec.
    """
    precision = precision or PrecisionConfig()
    kernels = kernels or FusedKernels()
    on_gpu = torch.cuda.is_available()
    moe_kwargs: dict[str, Any] = {}
    if hf.is_moe:
        moe_kwargs = dict(
            num_moe_experts=hf.num_experts,
            moe_router_topk=hf.num_experts_per_tok,
            moe_router_pre_softmax=False,
            moe_router_dtype="fp32",
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=hf.router_aux_loss_coef if moe_aux_loss_coeff is None else moe_aux_loss_coeff,
            moe_token_dispatcher_type=moe_token_dispatcher_type,
            moe_grouped_gemm=kernels.moe_grouped_gemm,
            moe_permute_fusion=kernels.moe_permute_fusion,
            # FP8 grouped GEMMs take each expert's rows in multiples of 16: the alltoall dispatcher can pad the
            # routing map once per layer, otherwise TEGroupedMLP pads and unpads its inputs and probs on every
            # pass (megatron-core refuses it with the allgather dispatcher).
            moe_router_padding_for_quantization=bool(precision.fp8_format) and kernels.moe_grouped_gemm
            and moe_token_dispatcher_type == "alltoall",
            moe_ffn_hidden_size=hf.intermediate_size,
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
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=hf.initializer_range,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        overlap_p2p_comm=interleaved,
        batch_p2p_comm=not interleaved,
        expert_model_parallel_size=expert_model_parallel_size,
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
