"""Per-GPU memory of an ORPO training run on Megatron-Core, before launching it.

Owns the arithmetic behind `tools/estimate_memory.py`: which parameters each rank holds, the DDP buffers and
distributed-optimizer shards Megatron-Core 0.16 allocates for them, a rough activation formula, and the
busiest rank of a layout. It builds nothing and needs no GPU.

Exact parts (checked against the real allocation of the tiny model): the parameter list of a pipeline stage
(local layer spec order; the TE spec fuses the norms into the linear layers, same counts); DDP's buffers
(each parameter starts at a multiple of 64 elements, each bucket is padded to lcm(DP, 128); one bucket per
buffer, as with `overlap_grad_reduce` off); the distributed optimizer's shard of each bucket per DP rank,
with fp32 main copies of bf16 parameters and Adam's two fp32 moments for the elements the shard holds.
Expert parameters (EP > 1) live in their own buffer, sharded over the expert-data-parallel group of size
TP*DP / (ETP*EP); everything else over DP.

Rough part: activations (see `layer_activation_bytes`), with balanced expert routing.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import math

from orpo_megatron.model_config import HFModelConfig, padded_vocab_size

GB = 1024**3
# DDP alignment rules of megatron/core/distributed/param_and_grad_buffer.py (distributed optimizer on).
PARAM_START_ALIGNMENT = 64
BUCKET_ALIGNMENT = 128


class MemoryLayoutError(ValueError):
    """A layout the estimator cannot place on the model, with the numbers named."""


@dataclasses.dataclass(frozen=True)
class MemoryLayout:
    """The run's parallel layout and the knobs that change memory (Megatron-LM flag names)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None  # None: = TP (what parallel.initialize sets up)
    virtual_pipeline_model_parallel_size: int | None = None
    data_parallel_size: int = 1
    micro_batch_size: int = 1  # pairs: 2x as many sequences
    seq_length: int = 2048
    bf16: bool = True
    fp8: bool = False
    grad_reduce_in_fp32: bool = True
    recompute_full: bool = False
    flash_attention: bool = True  # TE/flash attention keeps no S x S scores; the CPU local spec does
    optimizer_offload_fraction: float = 0.0
    num_micro_batches: int | None = None  # per step and DP rank; None: enough to fill the pipeline
    make_vocab_size_divisible_by: int = 128

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def ep(self) -> int:
        return self.expert_model_parallel_size

    @property
    def etp(self) -> int:
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    @property
    def vp(self) -> int:
        return self.virtual_pipeline_model_parallel_size or 1

    @property
    def dp(self) -> int:
        return self.data_parallel_size

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def expert_data_parallel_size(self) -> int:
        return self.tp * self.dp // (self.etp * self.ep)

    def validate(self, hf: HFModelConfig) -> None:
        problems = []
        if (self.tp * self.dp) % (self.etp * self.ep):
            problems.append(f"TP*DP = {self.tp * self.dp} is not divisible by ETP*EP = {self.etp * self.ep}")
        if hf.num_layers % (self.pp * self.vp):
            problems.append(f"{hf.num_layers} layers are not divisible by PP*VP = {self.pp * self.vp}")
        if hf.num_attention_heads % self.tp or hf.num_key_value_heads % self.tp:
            problems.append(f"{hf.num_attention_heads} heads / {hf.num_key_value_heads} KV groups are not "
                            f"divisible by TP={self.tp}")
        if hf.is_moe and hf.num_experts % self.ep:
            problems.append(f"{hf.num_experts} experts are not divisible by EP={self.ep}")
        if not hf.is_moe and self.ep > 1:
            problems.append(f"EP={self.ep} needs a mixture-of-experts model")
        if hf.intermediate_size % self.etp:
            problems.append(f"FFN size {hf.intermediate_size} is not divisible by ETP={self.etp}")
        if not 0.0 <= self.optimizer_offload_fraction <= 1.0:
            problems.append(f"optimizer offload fraction {self.optimizer_offload_fraction} is not in [0, 1]")
        if problems:
            raise MemoryLayoutError("; ".join(problems))

    @property
    def sequence_parallel(self) -> bool:
        return self.tp > 1  # forced on for MoE with TP > 1, and what one runs with TP > 1 anyway


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    name: str
    numel: int
    expert: bool  # in the expert-parallel buffer (only when EP > 1, as Megatron marks `allreduce=False`)


def chunk_parameters(hf: HFModelConfig, layout: MemoryLayout, pp_rank: int, vp_stage: int = 0) -> list[ParamSpec]:
    """One model chunk's parameters on one rank, in `named_parameters()` order of the local layer spec."""
    tp, etp, h = layout.tp, layout.etp, hf.hidden_size
    q, kv = hf.num_attention_heads * hf.head_dim, hf.num_key_value_heads * hf.head_dim
    vocab = padded_vocab_size(hf.vocab_size, layout.make_vocab_size_divisible_by, tp)
    first = pp_rank == 0 and vp_stage == 0
    last = pp_rank == layout.pp - 1 and vp_stage == layout.vp - 1
    expert = layout.ep > 1
    params = []
    if first:
        params.append(ParamSpec("embedding.word_embeddings.weight", vocab // tp * h, False))
    for i in range(hf.num_layers // (layout.pp * layout.vp)):
        prefix = f"decoder.layers.{i}."
        params += [ParamSpec(prefix + "input_layernorm.weight", h, False),
                   ParamSpec(prefix + "self_attention.linear_proj.weight", h * q // tp, False),
                   ParamSpec(prefix + "self_attention.linear_qkv.weight", (q + 2 * kv) // tp * h, False)]
        if hf.attention_bias:
            params.append(ParamSpec(prefix + "self_attention.linear_qkv.bias", (q + 2 * kv) // tp, False))
        params.append(ParamSpec(prefix + "pre_mlp_layernorm.weight", h, False))
        if hf.is_moe:
            f = hf.intermediate_size // etp
            params.append(ParamSpec(prefix + "mlp.router.weight", hf.num_experts * h, False))
            for e in range(hf.num_experts // layout.ep):
                expert_prefix = f"{prefix}mlp.experts.local_experts.{e}."
                params += [ParamSpec(expert_prefix + "linear_fc1.weight", 2 * f * h, expert),
                           ParamSpec(expert_prefix + "linear_fc2.weight", h * f, expert)]
        else:
            f = hf.intermediate_size // tp
            params += [ParamSpec(prefix + "mlp.linear_fc1.weight", 2 * f * h, False),
                       ParamSpec(prefix + "mlp.linear_fc2.weight", h * f, False)]
    if last:
        params.append(ParamSpec("decoder.final_layernorm.weight", h, False))
        if not (hf.tie_word_embeddings and first):
            params.append(ParamSpec("output_layer.weight", vocab // tp * h, False))
    return params


def _pad(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class BufferLayout:
    """A DDP param/grad buffer: its padded size and where each parameter sits (single bucket)."""

    numel: int
    param_ranges: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, numels: list[int], dp: int) -> "BufferLayout":
        ranges, start = [], 0
        for numel in reversed(numels):  # Megatron fills buffers in reverse (roughly backprop) order
            start = _pad(start, PARAM_START_ALIGNMENT)
            ranges.append((start, start + numel))
            start += numel
        return cls(_pad(start, math.lcm(dp, BUCKET_ALIGNMENT)) if numels else 0, tuple(ranges))

    def shard_elements(self, dp: int, dp_rank: int) -> int:
        """Parameter elements (padding excluded) in the distributed optimizer's shard of `dp_rank`."""
        size = self.numel // dp
        return self._elements_below((dp_rank + 1) * size) - self._elements_below(dp_rank * size)

    @functools.cached_property
    def _ends_and_counts(self) -> tuple[list[int], list[int]]:
        """Range ends (ascending: ranges are laid out in order) and the elements of all ranges up to each."""
        counts = list(itertools.accumulate(end - start for start, end in self.param_ranges))
        return [end for _, end in self.param_ranges], counts

    def _elements_below(self, position: int) -> int:
        """Parameter elements at buffer positions < `position`."""
        ends, counts = self._ends_and_counts
        index = bisect.bisect_right(ends, position)  # ranges [0, index) end at or before `position`
        below = counts[index - 1] if index else 0
        if index < len(ends):
            start = self.param_ranges[index][0]
            below += max(0, position - start)
        return below


@dataclasses.dataclass
class RankMemory:
    """Bytes one rank allocates on its GPU (and on the host for offloaded optimizer state)."""

    pp_rank: int
    dp_rank: int
    expert_dp_rank: int
    num_params: int
    param_bytes: int
    grad_bytes: int
    main_param_bytes: int
    optimizer_state_bytes: int
    activation_bytes: int
    host_bytes: int

    @property
    def gpu_bytes(self) -> int:
        return (self.param_bytes + self.grad_bytes + self.main_param_bytes + self.optimizer_state_bytes
                + self.activation_bytes)


@functools.lru_cache(maxsize=256)
def stage_buffers(hf: HFModelConfig, layout: MemoryLayout, pp_rank: int) -> tuple[int, list]:
    """Parameter count and (buffer, is_expert) of every DDP buffer of a pipeline rank's model chunks."""
    num_params, buffers = 0, []
    for vp_stage in range(layout.vp):  # each model chunk is its own DDP with its own buffers
        params = chunk_parameters(hf, layout, pp_rank, vp_stage)
        num_params += sum(p.numel for p in params)
        for is_expert, dp in ((False, layout.dp), (True, layout.expert_data_parallel_size)):
            buffers.append((BufferLayout.of([p.numel for p in params if p.expert == is_expert], dp), is_expert))
    return num_params, buffers


def rank_memory(hf: HFModelConfig, layout: MemoryLayout, pp_rank: int, dp_rank: int = 0,
                expert_dp_rank: int = 0) -> RankMemory:
    """Memory of the rank at (pipeline stage, DP rank, expert-DP rank); TP/EP ranks of a stage hold the same."""
    layout.validate(hf)
    param_size = 2 if layout.bf16 else 4
    grad_size = 4 if layout.grad_reduce_in_fp32 else param_size
    num_params, buffers = stage_buffers(hf, layout, pp_rank)
    buffer_numel = sum(buffer.numel for buffer, _ in buffers)
    owned = sum(buffer.shard_elements(layout.expert_data_parallel_size if is_expert else layout.dp,
                                      expert_dp_rank if is_expert else dp_rank)
                for buffer, is_expert in buffers if buffer.numel)
    # bf16 parameters get fp32 main copies for their shard; fp32 ones are stepped in place.
    main_param_bytes = 4 * owned if layout.bf16 else 0
    adam_bytes = 2 * 4 * owned
    offload = layout.optimizer_offload_fraction
    # Offloaded: the host keeps fp32 main params, both moments and an fp32 copy of the shard's gradients.
    host_bytes = round(offload * (4 * owned + adam_bytes + 4 * owned))
    fp8_weight_copies = 2 * num_params if layout.fp8 else 0  # TE's fp8 weight and its transpose
    return RankMemory(
        pp_rank=pp_rank, dp_rank=dp_rank, expert_dp_rank=expert_dp_rank, num_params=num_params,
        param_bytes=buffer_numel * param_size + fp8_weight_copies,
        grad_bytes=buffer_numel * grad_size,
        main_param_bytes=round((1 - offload) * main_param_bytes),
        optimizer_state_bytes=round((1 - offload) * adam_bytes),
        activation_bytes=stage_activation_bytes(hf, layout, pp_rank),
        host_bytes=host_bytes,
    )


def layer_activation_bytes(hf: HFModelConfig, layout: MemoryLayout) -> int:
    """Bytes one transformer layer keeps for backward for one micro-batch (2*micro_batch_size sequences).

    Per token, with b bytes per activation (2 in bf16, 1 for fp8 GEMM inputs of the linear layers), TP = t,
    sequence parallel splitting the residual stream (r = t with SP, else 1), ETP = e:
      attention  b * (2h/r + (q + 2kv)/t + q/t + h/r)      norm in, QKV in, Q/K/V, context, residual
                 + 2b * heads/t * S                          scores and softmax (unfused attention only)
      MoE        b * 2h/r + 8E/r                            norm in, router in; fp32 router logits, probs
                 + top_k * b * (2h + 3f/e)                  per routed copy: FC1 in, FC1 out (2f),
                                                            activation out (f) ... FC2 out; balanced routing
      dense MLP  b * (3h/r + 3f/t)
    (q = heads*head_dim, kv = kv_heads*head_dim, f = FFN size.) A rough formula in the spirit of Korthikanti
    et al. 2022; implementation-specific copies (GQA expansion, fp32 norms on CPU) are not itemized.
    """
    t, r, e = layout.tp, (layout.tp if layout.sequence_parallel else 1), layout.etp
    h, s = hf.hidden_size, layout.seq_length
    q, kv = hf.num_attention_heads * hf.head_dim, hf.num_key_value_heads * hf.head_dim
    b = 2 if layout.bf16 else 4
    b_gemm = 1 if layout.fp8 else b
    tokens = 2 * layout.micro_batch_size * s
    attention = b * (2 * h / r + h / r) + b_gemm * ((q + 2 * kv) / t + q / t)
    if not layout.flash_attention:
        attention += 2 * b * hf.num_attention_heads / t * s
    if hf.is_moe:
        mlp = (b * 2 * h / r + 8 * hf.num_experts / r
               + hf.num_experts_per_tok * (b_gemm * 2 * h + b * 3 * hf.intermediate_size / e))
    else:
        mlp = b * 3 * h / r + b_gemm * 3 * hf.intermediate_size / t
    return round(tokens * (attention + mlp))


def in_flight_micro_batches(layout: MemoryLayout, pp_rank: int) -> float:
    """Micro-batches whose activations a stage holds at its peak under (interleaved) 1F1B, in stage units."""
    pp, vp = layout.pp, layout.vp
    if vp == 1:
        count = pp - pp_rank
        return float(min(count, layout.num_micro_batches) if layout.num_micro_batches else count)
    # Interleaved: warm-up forwards of model chunks (each 1/vp of the stage's layers).
    chunks = (pp - pp_rank - 1) * 2 + (vp - 1) * pp + 1
    if layout.num_micro_batches:
        chunks = min(chunks, layout.num_micro_batches * vp)
    return chunks / vp


def stage_activation_bytes(hf: HFModelConfig, layout: MemoryLayout, pp_rank: int) -> int:
    """Peak activation bytes of a pipeline stage: in-flight micro-batches x its layers (+ embedding, logits).

    With full recompute a layer keeps only its input (b*h/r per token) and one layer's activations are
    rebuilt at a time during backward. The last stage also holds one micro-batch's logits: model-dtype
    logits plus the fp32 softmax the ORPO log-probs keep (V/t columns per token).
    """
    layers = hf.num_layers // layout.pp
    tokens = 2 * layout.micro_batch_size * layout.seq_length
    b = 2 if layout.bf16 else 4
    r = layout.tp if layout.sequence_parallel else 1
    residual = tokens * b * hf.hidden_size / r
    per_layer = layer_activation_bytes(hf, layout)
    in_flight = in_flight_micro_batches(layout, pp_rank)
    if layout.recompute_full:
        total = in_flight * layers * residual + per_layer
    else:
        total = in_flight * layers * per_layer
    if pp_rank == 0:
        total += in_flight * residual  # embedding output
    if pp_rank == layout.pp - 1:
        vocab = padded_vocab_size(hf.vocab_size, layout.make_vocab_size_divisible_by, layout.tp)
        total += residual + tokens * vocab / layout.tp * (b + 4)
    return round(total)


def busiest_rank(hf: HFModelConfig, layout: MemoryLayout) -> RankMemory:
    """The rank with the most GPU memory over pipeline stages and (expert-)data-parallel shards.

    DP ranks differ only by padding inside their optimizer shards; the dense shard (DP rank) and the expert
    shard (expert-DP rank) add up independently, so each is maximized on its own.
    """
    candidates = []
    for pp_rank in range(layout.pp):
        dp_rank = max(range(layout.dp), key=lambda r: rank_memory(hf, layout, pp_rank, r, 0).gpu_bytes)
        edp_rank = max(range(layout.expert_data_parallel_size),
                       key=lambda r: rank_memory(hf, layout, pp_rank, dp_rank, r).gpu_bytes)
        candidates.append(rank_memory(hf, layout, pp_rank, dp_rank, edp_rank))
    return max(candidates, key=lambda m: m.gpu_bytes)
