"""Model building: a Megatron-Core `GPTModel` for a model family's config (`families/`), on the TE or the local spec.

The backend is a spec choice, not branches inside layers: the Transformer Engine spec when TE and CUDA are
present (required for FP8; experts as TEGroupedMLP when the config asks for grouped GEMM), otherwise
Megatron's local spec with this module's RMSNorm, which (unlike Megatron's torch-norm wrapper) supports
sequence parallelism, and this module's core attention, which (unlike Megatron's unfused one) takes packed
rows: both specs attend only within each sequence of a packed row (THD). `check_backend` refuses, at start-up,
a Transformer Engine outside the versions megatron-core 0.16.1 supports and FP8 where it cannot run. Both
specs give the same checkpoint keys (`GPTModel.sharded_state_dict()`, the TE spec's names), so a checkpoint
saved on one loads on the other and in Megatron-LM.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import ModuleSpec, TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from orpo_megatron.errors import ConfigError, UserError
from orpo_megatron.model_config import HFModelConfig, padded_vocab_size


# Transformer Engine releases megatron-core 0.16.1 supports (its `dev` extra); setup.py's `te` extra pins the same.
TRANSFORMER_ENGINE_SUPPORTED = (">=2.9.0a0", "<2.12.0")
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)  # Ada / Hopper: TE's FP8 GEMMs


class BackendUnavailableError(UserError, RuntimeError):
    """The machine cannot run what the flags ask for (FP8, or the installed Transformer Engine), with the fix."""


def transformer_engine_importable() -> bool:
    """megatron-core's own verdict (`HAVE_TE` of its GPT layer specs, a real import of TE and of its TE layers),
    read when asked: a TE that is installed but does not import (built against another torch) must not choose
    the TE spec over megatron-core's missing TE classes."""
    import megatron.core.models.gpt.gpt_layer_specs as layer_specs

    return layer_specs.HAVE_TE


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and transformer_engine_importable()


def _installed_transformer_engine() -> str | None:
    if importlib.util.find_spec("transformer_engine") is None:
        return None
    for name in ("transformer-engine", "transformer_engine", "transformer-engine-cu12"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    import transformer_engine

    return str(transformer_engine.__version__)


def backend_problems(fp8_format: str | None, cuda: bool, te_version: str | None,
                     capability: tuple[int, int] | None, device_name: str = "this GPU") -> list[str]:
    """What stops this machine from running the flags: a Transformer Engine megatron-core 0.16.1 does not
    support (when it would be used), or FP8 without CUDA, TE or an FP8-capable GPU. Pure, so tests can ask
    about any machine."""
    from packaging.specifiers import SpecifierSet

    problems = []
    supported = SpecifierSet(",".join(TRANSFORMER_ENGINE_SUPPORTED))
    if cuda and te_version is not None and not supported.contains(te_version, prereleases=True):
        problems.append(f"transformer-engine {te_version} is installed, but megatron-core 0.16.1 supports "
                        f"transformer-engine{supported}: pip install 'orpo-megatron[te]' (or uninstall it to "
                        "run on Megatron's local layers, without FP8)")
    if not fp8_format:
        return problems
    if not cuda:
        problems.append(f"--fp8-format {fp8_format} needs a CUDA GPU with FP8 support (compute capability "
                        f"{'.'.join(map(str, FP8_MIN_COMPUTE_CAPABILITY))}+: Ada, Hopper or newer); this machine "
                        "has no CUDA device. Drop --fp8-format (use --bf16) to run here.")
    elif te_version is None:
        problems.append(f"--fp8-format {fp8_format} needs NVIDIA Transformer Engine, which is not installed. "
                        "Install it with: pip install 'orpo-megatron[te]'; or drop --fp8-format and train with "
                        "--bf16.")
    elif capability is not None and tuple(capability) < FP8_MIN_COMPUTE_CAPABILITY:
        problems.append(f"--fp8-format {fp8_format} needs compute capability "
                        f"{'.'.join(map(str, FP8_MIN_COMPUTE_CAPABILITY))}+ (Ada, Hopper or newer); {device_name} "
                        f"has {capability[0]}.{capability[1]}. Drop --fp8-format (use --bf16).")
    return problems


def check_backend(fp8_format: str | None) -> None:
    """Fail at start-up, before any work, when this machine cannot run the flags."""
    cuda = torch.cuda.is_available()
    capability = torch.cuda.get_device_capability() if cuda else None
    problems = backend_problems(fp8_format, cuda, _installed_transformer_engine(), capability,
                                torch.cuda.get_device_name() if cuda else "this GPU")
    if problems:
        raise BackendUnavailableError("; ".join(problems))


def _router_gemm_without_transformer_engine() -> None:
    """megatron-core 0.16.1's router calls `te_general_gemm` unless it is None, but binds the name only when TE
    imports: without TE every MoE forward would raise a NameError, on a GPU as on CPU. Binding it to None sends
    the router to its torch matmul."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


_router_gemm_without_transformer_engine()


class RMSNorm(torch.nn.Module):
    """RMSNorm computed in fp32 as HF Mixtral does, with a weight marked for sequence parallelism.

    Under sequence parallelism each TP rank normalizes a different slice of the sequence, so the weight's
    gradient is partial; the `sequence_parallel` attribute tells Megatron's DDP to all-reduce it over TP.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_fp32 = hidden_states.float()
        variance = hidden_fp32.pow(2).mean(-1, keepdim=True)
        normalized = hidden_fp32 * torch.rsqrt(variance + self.eps)
        return self.weight * normalized.to(input_dtype)


def block_causal_mask(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """[1, 1, length, length] bool, True where attention is blocked: a key in another segment or in the future."""
    positions = torch.arange(length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    segment = torch.searchsorted(cu_seqlens[1:], positions, right=True)
    blocked = (segment[:, None] != segment[None, :]) | (positions[None, :] > positions[:, None])
    return blocked[None, None]


class PackedDotProductAttention(DotProductAttention):
    """Megatron's unfused attention for padded rows and packed (THD) rows alike, always with an explicit mask.

    Megatron's own refuses `packed_seq_params`. A packed row arrives as [t, heads, dim] with its segment bounds in
    `cu_seqlens`; it is attended as one [t, 1, heads, dim] sequence under a block-diagonal causal mask, so no
    position sees another sequence (masked weights are exactly 0). Padded rows get the plain causal mask (the
    project's forward passes no mask of its own). The softmax is built for an arbitrary mask: its fused kernel
    would ignore any mask of a causal layer.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType, *args, **kwargs):
        super().__init__(config, layer_number, AttnMaskType.arbitrary, *args, **kwargs)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params: PackedSeqParams | None = None):
        if packed_seq_params is None:
            length = query.shape[0]
            mask = torch.ones(length, length, dtype=torch.bool, device=query.device).triu_(1)[None, None]
            return super().forward(query, key, value, mask, attention_bias=attention_bias)
        mask = block_causal_mask(packed_seq_params.cu_seqlens_q, query.shape[0])
        return super().forward(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), mask,
                               attention_bias=attention_bias)


class StandaloneRMSNorm(RMSNorm):
    """The RMSNorm where the TE spec has a norm module of its own (the MoE pre-MLP norm, the q/k norms, the final
    norm).

    Like Transformer Engine's norm it has an `_extra_state` entry (TE keeps FP8 metadata there): held as loaded
    and saved back, so a local-spec checkpoint has every key the TE spec asks for and a TE checkpoint's norm
    state survives a pass through the local spec. A checkpoint without the entry loads as "no extra state".
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(config, hidden_size, eps)
        self.extra_state = None
        self._register_load_state_dict_pre_hook(
            lambda state_dict, prefix, *args: state_dict.setdefault(f"{prefix}_extra_state")
        )

    def get_extra_state(self):
        return self.extra_state

    def set_extra_state(self, state) -> None:
        self.extra_state = state


def _local_layer_spec(config: TransformerConfig) -> ModuleSpec:
    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts, moe_grouped_gemm=False, normalization="RMSNorm",
        qk_layernorm=config.qk_layernorm,
    )
    attention = spec.submodules.self_attention
    # The per-head q/k norms (Qwen3) are standalone norms in the TE spec too (TENorm), named
    # `self_attention.q_layernorm` / `k_layernorm` in both.
    qk_norm = StandaloneRMSNorm if config.qk_layernorm else attention.submodules.q_layernorm
    attention = ModuleSpec(module=attention.module, params=attention.params,
                           submodules=dataclasses.replace(attention.submodules,
                                                          core_attention=PackedDotProductAttention,
                                                          q_layernorm=qk_norm, k_layernorm=qk_norm))
    moe = config.num_moe_experts is not None
    # Checkpoint keys as the TE spec names them. TE fuses the pre-attention norm into linear_qkv, and in dense
    # layers the pre-MLP norm into linear_fc1; in MoE layers the pre-MLP norm is a module of its own (Megatron's
    # local spec maps it into linear_fc1 there too, a key the TE spec never asks for).
    keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    if not moe:
        keys_map["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    submodules = dataclasses.replace(
        spec.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=StandaloneRMSNorm if moe else RMSNorm,
        self_attention=attention, sharded_state_dict_keys_map=keys_map,
    )
    return ModuleSpec(module=spec.module, params=spec.params, submodules=submodules)


def decoder_spec(config: TransformerConfig, use_transformer_engine: bool, vp_stage: int | None):
    """The decoder block spec for this rank's pipeline stage: TE layers, or local layers with our RMSNorm."""
    if use_transformer_engine:
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=config.qk_layernorm,
        )
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[_local_layer_spec(config)] * num_layers,
                                      layer_norm=StandaloneRMSNorm)


@dataclasses.dataclass(frozen=True)
class VocabInfo:
    """The tokenizer's true vocabulary and the padded size the embedding and output layer are built with."""

    true_size: int
    padded_size: int


def vocab_info(hf: HFModelConfig, make_vocab_size_divisible_by: int, tensor_parallel_size: int) -> VocabInfo:
    return VocabInfo(hf.vocab_size, padded_vocab_size(hf.vocab_size, make_vocab_size_divisible_by, tensor_parallel_size))


def build_model_chunk(
    config: TransformerConfig,
    hf: HFModelConfig,
    vocab: VocabInfo,
    use_transformer_engine: bool = False,
    vp_stage: int | None = None,
) -> GPTModel:
    """One GPTModel chunk: this rank's pipeline stage (or one virtual stage of it)."""
    pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_spec(config, use_transformer_engine, vp_stage),
        vocab_size=vocab.padded_size,
        max_sequence_length=hf.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=hf.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(hf.rope_theta),
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def build_model(
    config: TransformerConfig, hf: HFModelConfig, vocab: VocabInfo, use_transformer_engine: bool = False
) -> list[GPTModel]:
    """All model chunks of this rank: one, or `virtual_pipeline_model_parallel_size` with interleaving."""
    vp = config.virtual_pipeline_model_parallel_size
    stages = range(vp) if vp else [None]
    return [build_model_chunk(config, hf, vocab, use_transformer_engine, vp_stage=stage) for stage in stages]


def freeze_router(modules: list[torch.nn.Module]) -> int:
    """`--freeze-router`: the MoE routers' parameters take no gradient, so Megatron's DDP gives them no gradient
    buffer and the optimizer neither updates them nor holds state for them. They stay in the state dict
    (checkpoints and conversion are unchanged). Returns how many tensors it froze on this rank."""
    frozen = 0
    for module in modules:
        for router in (m for m in module.modules() if isinstance(m, TopKRouter)):
            for param in router.parameters():
                param.requires_grad_(False)
                frozen += 1
    if not frozen:
        raise ConfigError("--freeze-router needs an MoE model; this rank's layers have no router")
    return frozen


def check_freeze_router_resume(train_state: dict | None, freeze_router: bool) -> None:
    """A run resumes with `--freeze-router` as it was saved: the saved optimizer state holds the routers exactly
    when they were trained."""
    if train_state is None:
        return
    saved = bool(train_state.get("args", {}).get("freeze_router", False))
    if saved != freeze_router:
        raise ConfigError(f"the checkpoint was saved {'with' if saved else 'without'} --freeze-router; resume "
                         f"{'with' if saved else 'without'} it (its optimizer state "
                         f"{'has no' if saved else 'has'} router entries)")
