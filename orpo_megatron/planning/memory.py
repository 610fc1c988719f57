"""Per-GPU memory of an ORPO training run on Megatron-Core, before launching it.

Owns the arithmetic behind `tools/estimate_memory.py`: which parameters each rank holds, the DDP buffers and
distributed-optimizer shards Megatron-Core 0.16 allocates for them, a rough activation formula, and the
busiest rank of a layout. It builds nothing and needs no GPU.

Exact parts (checked against the real allocation of the tiny model): the parameter list of a pipeline stage
(local layer spec order; the TE spec fuses the norms into the linear layers, same counts); DDP's buffers
(each parameter starts at a multiple of 64 elements, each bucket is padded to lcm(DP, 128); with
`overlap_grad_reduce` (the GPU default) buckets of max(40M, 1M x DP) parameters on the first pipeline stage, one
bucket per buffer otherwise); the distributed optimizer's shard of each bucket per DP rank, and
what each optimizer mode keeps for the elements of that shard on the GPU and on the host
(`optimizer_bytes_per_element`, the one place that says so). Expert parameters (EP > 1) live in their own
buffer, sharded over the expert-data-parallel group of size TP*DP / (ETP*EP); everything else over DP.
With offload, Megatron moves whole parameter shards to the host until the fraction is reached; the estimate
takes the fraction exactly (it differs from the real split by less than one parameter shard).

Rough parts: activations (see `layer_activation_bytes`), with balanced expert routing; NCCL's buffers (see
`NCCL_COMMUNICATOR_BYTES`), per process group this rank communicates in.
"""
from __future__ import annotations

import dataclasses
import functools
import math

from orpo_megatron.model_config import HFModelConfig, padded_vocab_size
from orpo_megatron.optimizer import DTYPES, OptimizerMode
from orpo_megatron.parallel import LayoutError, ParallelLayout, sequence_parallel

GB = 1024**3
# DDP alignment rules of megatron/core/distributed/param_and_grad_buffer.py (distributed optimizer on).
PARAM_START_ALIGNMENT = 64
BUCKET_ALIGNMENT = 128


# NCCL's device buffers per communicator, outside PyTorch's allocator (NCCL 2.x `src/init.cc` defaults): each
# channel's connection to a peer receives into a SIMPLE buffer (NCCL_BUFFSIZE, 4 MiB), an LL128 one
# (120 x 640 x 8 steps x 8 B = 4.69 MiB) and an LL one (8 x 512 x 8 x 16 B = 0.5 MiB). Assumed: 32 channels (the
# most NCCL opens on NVLink/NVSwitch H100s) with one ring connection each, 294 MiB per communicator of 2+ ranks;
# tree, NVLS and point-to-point connections add more, lazily. NCCL_BUFFSIZE / NCCL_MAX_NCHANNELS shrink it.
NCCL_CONNECTION_BYTES = (1 << 22) + 120 * 640 * 8 * 8 + 8 * 512 * 8 * 16
NCCL_CHANNELS = 32
NCCL_COMMUNICATOR_BYTES = NCCL_CHANNELS * NCCL_CONNECTION_BYTES


@dataclasses.dataclass(frozen=True)
class MemoryLayout:
    """The run's parallel layout (the trainer's) and the knobs that change memory (Megatron-LM flag names)."""

    parallel: ParallelLayout = ParallelLayout()
    micro_batch_size: int = 1  # pairs (2x as many sequences), or sequences when not `pairs`
    seq_length: int = 2048
    pairs: bool = True  # ORPO pairs; False: pretraining-style single sequences
    bf16: bool = True
    fp8: bool = False
    recompute_full: bool = False
    flash_attention: bool = True  # TE/flash attention keeps no S x S scores; the CPU local spec does
    optimizer: OptimizerMode = OptimizerMode()
    overlap_grad_reduce: bool = True  # the trainer's GPU default: bucketed gradient reduction
    ddp_bucket_size: int | None = None  # None: Megatron-Core's max(40M, 1M x DP)
    num_micro_batches: int | None = None  # per step and DP rank; None: enough to fill the pipeline
    make_vocab_size_divisible_by: int = 128

    @classmethod
    def planned(cls, *, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                expert_model_parallel_size: int = 1, expert_tensor_parallel_size: int | None = None,
                virtual_pipeline_model_parallel_size: int | None = None, data_parallel_size: int = 1,
                **knobs) -> "MemoryLayout":
        """The layout of `data_parallel_size` replicas of the TP x PP model, run with --sequence-parallel
        whenever TP > 1 (the estimator's assumption: it has no such flag)."""
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        return cls(ParallelLayout(
            world_size=tp * pp * data_parallel_size, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
            expert_model_parallel_size=expert_model_parallel_size, expert_tensor_parallel_size=expert_tensor_parallel_size,
            sequence_parallel=sequence_parallel(tp > 1, tp, is_moe=False)), **knobs)

    @property
    def tp(self) -> int:
        return self.parallel.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.parallel.pipeline_model_parallel_size

    @property
    def ep(self) -> int:
        return self.parallel.expert_model_parallel_size

    @property
    def etp(self) -> int:
        return self.parallel.expert_tensor_parallel

    @property
    def vp(self) -> int:
        return self.parallel.virtual_pipeline_model_parallel_size or 1

    @property
    def dp(self) -> int:
        return self.parallel.data_parallel_size

    @property
    def world_size(self) -> int:
        return self.parallel.world_size

    @property
    def expert_data_parallel_size(self) -> int:
        return self.parallel.expert_data_parallel_size

    def validate(self, hf: HFModelConfig) -> None:
        """The trainer's layout rules (`ParallelLayout.validate`), then the optimizer mode's."""
        # The estimator's report names heads and KV groups in one problem (its command line's output).
        if hf.num_attention_heads % self.tp or hf.num_key_value_heads % self.tp:
            raise LayoutError(f"{hf.num_attention_heads} heads / {hf.num_key_value_heads} KV groups are not "
                              f"divisible by TP={self.tp}")
        self.parallel.validate(hf)
        problems = self.optimizer.problems(self.bf16)
        if problems:
            raise LayoutError("; ".join(problems))

    def bucket_size(self, pp_rank: int) -> int | None:
        """Parameters per DDP bucket on a pipeline stage (None: one bucket); later stages are not bucketed."""
        if not self.overlap_grad_reduce or pp_rank > 0:
            return None
        return self.ddp_bucket_size or max(40_000_000, 1_000_000 * self.dp)

    @property
    def micro_batch_sequences(self) -> int:
        return (2 if self.pairs else 1) * self.micro_batch_size

    @property
    def param_size(self) -> int:
        return 2 if self.bf16 else 4

    @property
    def grad_size(self) -> int:
        """DDP's gradient buffer: fp32, or bf16 with the precision-aware optimizer's bf16 main grads."""
        return DTYPES[self.optimizer.main_grads_dtype].itemsize if self.bf16 else 4

    @property
    def sequence_parallel(self) -> bool:
        return self.parallel.sequence_parallel


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
        if hf.family.qk_layernorm:  # per-head RMSNorms of q and k (Qwen3-MoE), replicated over TP
            params += [ParamSpec(prefix + f"self_attention.{norm}_layernorm.weight", hf.head_dim, False)
                       for norm in ("q", "k")]
        params.append(ParamSpec(prefix + "pre_mlp_layernorm.weight", h, False))
        if hf.is_moe:
            f = hf.expert_intermediate_size // etp
            params.append(ParamSpec(prefix + "mlp.router.weight", hf.num_experts * h, False))
            for e in range(hf.num_experts // layout.ep):
                expert_prefix = f"{prefix}mlp.experts.local_experts.{e}."
                params += [ParamSpec(expert_prefix + "linear_fc1.weight", 2 * f * h, expert),
                           ParamSpec(expert_prefix + "linear_fc2.weight", h * f, expert)]
            if hf.shared_expert_intermediate_size:  # Qwen2-MoE: a dense MLP split by TP, and its [1, h] gate
                shared = hf.shared_expert_intermediate_size // tp
                params += [ParamSpec(prefix + "mlp.shared_experts.linear_fc1.weight", 2 * shared * h, False),
                           ParamSpec(prefix + "mlp.shared_experts.linear_fc2.weight", h * shared, False),
                           ParamSpec(prefix + "mlp.shared_experts.gate_weight", h, False)]
        else:
            f = hf.intermediate_size // tp
            params += [ParamSpec(prefix + "mlp.linear_fc1.weight", 2 * f * h, False),
                       ParamSpec(prefix + "mlp.linear_fc2.weight", h * f, False)]
    if last:
        params.append(ParamSpec("decoder.final_layernorm.weight", h, False))
        if not (hf.tie_word_embeddings and first):
            params.append(ParamSpec("output_layer.weight", vocab // tp * h, False))
    return params


def total_parameters(hf: HFModelConfig) -> int:
    """Every parameter of the model once (as one unsplit rank holds them)."""
    return sum(param.numel for param in chunk_parameters(hf, MemoryLayout(), 0))


def _pad(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class BufferLayout:
    """A DDP param/grad buffer: its padded size and its buckets, each (start, end, its parameters' ranges)."""

    numel: int
    buckets: tuple[tuple[int, int, tuple[tuple[int, int], ...]], ...]

    @classmethod
    def of(cls, numels: list[int], dp: int, bucket_size: int | None = None) -> "BufferLayout":
        """Megatron's layout: parameters in reverse order (roughly backprop order), each starting at a multiple of
        64; a bucket closes once it holds `bucket_size` elements, its end padded to lcm(DP, 128)."""
        bucket_alignment = math.lcm(dp, BUCKET_ALIGNMENT)
        buckets, ranges, start, bucket_start = [], [], 0, 0
        for numel in reversed(numels):
            start = _pad(start, PARAM_START_ALIGNMENT)
            ranges.append((start, start + numel))
            start += numel
            if bucket_size is not None and start - bucket_start >= bucket_size:
                buckets.append((bucket_start, _pad(start, bucket_alignment), tuple(ranges)))
                start = bucket_start = buckets[-1][1]
                ranges = []
        if ranges:
            buckets.append((bucket_start, _pad(start, bucket_alignment), tuple(ranges)))
        return cls(buckets[-1][1] if buckets else 0, tuple(buckets))

    def shard_elements(self, dp: int) -> tuple[int, ...]:
        """Parameter elements (padding excluded) in the distributed optimizer's shard of each DP rank: its 1/DP
        slice of every bucket. Cached: a search asks for every rank of every buffer many times."""
        if dp not in self._shards:
            owned = [0] * dp
            for bucket_start, bucket_end, ranges in self.buckets:
                size = (bucket_end - bucket_start) // dp
                for start, end in ranges if size else ():  # each range adds its overlap with the slices it spans
                    for rank in range((start - bucket_start) // size, (end - 1 - bucket_start) // size + 1):
                        lo = bucket_start + rank * size
                        owned[rank] += min(end, lo + size) - max(start, lo)
            self._shards[dp] = tuple(owned)
        return self._shards[dp]

    @functools.cached_property
    def _shards(self) -> dict[int, tuple[int, ...]]:
        return {}


@dataclasses.dataclass(frozen=True)
class OptimizerBytes:
    """Bytes per element of a rank's optimizer shard: main params and optimizer state on the GPU, all on the host."""

    gpu_main_params: float
    gpu_state: float
    host: float


def optimizer_bytes_per_element(mode: OptimizerMode, bf16: bool) -> OptimizerBytes:
    """Where each optimizer mode keeps what, per shard element, as Megatron-Core 0.16.1 allocates it.

    plain                GPU: fp32 main copy of a bf16 param (4; fp32 params are stepped in place: 0), fp32 moments (8)
    precision-aware      GPU (TE FusedAdam): main param in its dtype (fp32 4: whole copies, param remainders off
                         (`optimizer.optimizer_config`); fp16 2), exp_avg and exp_avg_sq in their dtypes (fp8: 1)
    offload f            (precision-aware, HybridDeviceOptimizer; both parts step fp32 copies of the bf16 params)
                         GPU: (1 - f) x (fp32 copy 4 + moments 8, + an fp32 gradient copy 4 with bf16 main grads)
                         host: f x (fp32 copy 4 + fp32 gradient copy 4 + moments 8)
    The model's bf16 params and its gradient buffer are DDP's, counted apart (`rank_memory`).
    """
    size = {name: dtype.itemsize for name, dtype in DTYPES.items()}
    if mode.offload:
        f = mode.offload_fraction
        grad_copy = 4 if mode.main_grads_dtype != "fp32" else 0
        return OptimizerBytes(gpu_main_params=(1 - f) * 4, gpu_state=(1 - f) * (8 + grad_copy), host=f * 16)
    if mode.precision_aware:
        return OptimizerBytes(gpu_main_params=size[mode.main_params_dtype],
                              gpu_state=size[mode.exp_avg_dtype] + size[mode.exp_avg_sq_dtype],
                              host=0)
    return OptimizerBytes(gpu_main_params=4 if bf16 else 0, gpu_state=8, host=0)


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
    nccl_bytes: int
    host_bytes: int

    @property
    def gpu_bytes(self) -> int:
        return (self.param_bytes + self.grad_bytes + self.main_param_bytes + self.optimizer_state_bytes
                + self.activation_bytes + self.nccl_bytes)


def communicating_groups(layout: MemoryLayout, moe: bool) -> dict[str, int]:
    """Size of each process group a rank runs collectives in (each its own NCCL communicator, created at its first
    collective): the world (the trainer's stop and skip agreement), Megatron-Core 0.16.1's tensor, pipeline,
    data and model (TP x PP: the grad norm) groups, and with experts the expert, expert-data and expert-model
    (ETP x EP x PP: the experts' grad norm) groups."""
    groups = {"world": layout.world_size, "tensor": layout.tp, "pipeline": layout.pp, "data": layout.dp,
              "model": layout.tp * layout.pp}
    if moe:
        groups.update({"expert": layout.ep, "expert-data": layout.expert_data_parallel_size,
                       "expert-model": layout.etp * layout.ep * layout.pp})
    return groups


def nccl_buffer_bytes(layout: MemoryLayout, moe: bool) -> int:
    """NCCL's buffers on one GPU: a communicator's worth for every group of 2+ ranks (one rank sends nothing)."""
    return NCCL_COMMUNICATOR_BYTES * sum(size > 1 for size in communicating_groups(layout, moe).values())


def stage_buffers(hf: HFModelConfig, layout: MemoryLayout, pp_rank: int) -> tuple[int, list]:
    """Parameter count and (buffer, is_expert) of every DDP buffer of a pipeline rank's model chunks."""
    # The buffers do not depend on the optimizer, micro-batches or sequences: cache on what they depend on.
    return _stage_buffers(hf, dataclasses.replace(layout, optimizer=OptimizerMode(), micro_batch_size=1,
                                                  seq_length=1, pairs=True, num_micro_batches=None,
                                                  recompute_full=False),
                          pp_rank)


@functools.lru_cache(maxsize=1024)
def _stage_buffers(hf: HFModelConfig, layout: MemoryLayout, pp_rank: int) -> tuple[int, list]:
    num_params, buffers = 0, []
    for vp_stage in range(layout.vp):  # each model chunk is its own DDP with its own buffers
        params = chunk_parameters(hf, layout, pp_rank, vp_stage)
        num_params += sum(p.numel for p in params)
        for is_expert, dp in ((False, layout.dp), (True, layout.expert_data_parallel_size)):
            buffers.append((BufferLayout.of([p.numel for p in params if p.expert == is_expert], dp,
                                            layout.bucket_size(pp_rank)), is_expert))
    return num_params, buffers


def owned_elements(hf: HFModelConfig, layout: MemoryLayout, pp_rank: int) -> tuple[list[int], list[int]]:
    """Parameter elements in the distributed optimizer's shards of a pipeline stage: of its dense buffers per
    DP rank, and of its expert buffers per expert-DP rank."""
    dense, expert = [0] * layout.dp, [0] * layout.expert_data_parallel_size
    for buffer, is_expert in stage_buffers(hf, layout, pp_rank)[1]:
        owned = expert if is_expert else dense
        for rank, elements in enumerate(buffer.shard_elements(len(owned)) if buffer.numel else ()):
            owned[rank] += elements
    return dense, expert


def rank_memory(hf: HFModelConfig, layout: MemoryLayout, pp_rank: int, dp_rank: int = 0,
                expert_dp_rank: int = 0) -> RankMemory:
    """Memory of the rank at (pipeline stage, DP rank, expert-DP rank); TP/EP ranks of a stage hold the same."""
    layout.validate(hf)
    num_params, buffers = stage_buffers(hf, layout, pp_rank)
    buffer_numel = sum(buffer.numel for buffer, _ in buffers)
    dense, expert = owned_elements(hf, layout, pp_rank)
    owned = dense[dp_rank] + expert[expert_dp_rank]
    optimizer = optimizer_bytes_per_element(layout.optimizer, layout.bf16)
    fp8_weight_copies = 2 * num_params if layout.fp8 else 0  # TE's fp8 weight and its transpose
    return RankMemory(
        pp_rank=pp_rank, dp_rank=dp_rank, expert_dp_rank=expert_dp_rank, num_params=num_params,
        param_bytes=buffer_numel * layout.param_size + fp8_weight_copies,
        grad_bytes=buffer_numel * layout.grad_size,
        main_param_bytes=round(optimizer.gpu_main_params * owned),
        optimizer_state_bytes=round(optimizer.gpu_state * owned),
        activation_bytes=stage_activation_bytes(hf, layout, pp_rank),
        nccl_bytes=nccl_buffer_bytes(layout, hf.is_moe),
        host_bytes=round(optimizer.host * owned),
    )


def layer_activation_bytes(hf: HFModelConfig, layout: MemoryLayout) -> int:
    """Bytes one transformer layer keeps for backward for one micro-batch (`micro_batch_sequences`).

    Per token, with b bytes per activation (2 in bf16, 1 for fp8 GEMM inputs of the linear layers), TP = t,
    sequence parallel splitting the residual stream (r = t with SP, else 1), ETP = e:
      attention  b * (2h/r + (q + 2kv)/t + q/t + h/r)      norm in, QKV in, Q/K/V, context, residual
                 + 2b * heads/t * S                          scores and softmax (unfused attention only)
      MoE        b * 2h/r + 8E/r                            norm in, router in; fp32 router logits, probs
                 + top_k * e/r * b * (h + 3f/e)             per row the experts compute: FC1 in, FC1 out (2f/e),
                                                            activation out (f/e); the router probs scale the
                                                            activation (megatron-core 0.16 `experts.py`), so FC2's
                                                            output is not kept. Balanced routing: a rank's
                                                            experts get top_k copies of N/r tokens and all-gather
                                                            their e expert-TP peers' rows
      dense MLP  b * (3h/r + 3f/t)
    (q = heads*head_dim, kv = kv_heads*head_dim, f = FFN size.) A rough formula in the spirit of Korthikanti
    et al. 2022; implementation-specific copies (GQA expansion, fp32 norms on CPU) are not itemized.
    """
    t, r, e = layout.tp, (layout.tp if layout.sequence_parallel else 1), layout.etp
    h, s = hf.hidden_size, layout.seq_length
    q, kv = hf.num_attention_heads * hf.head_dim, hf.num_key_value_heads * hf.head_dim
    b = 2 if layout.bf16 else 4
    b_gemm = 1 if layout.fp8 else b
    tokens = layout.micro_batch_sequences * s
    attention = b * (2 * h / r + h / r) + b_gemm * ((q + 2 * kv) / t + q / t)
    if not layout.flash_attention:
        attention += 2 * b * hf.num_attention_heads / t * s
    if hf.is_moe:
        mlp = (b * 2 * h / r + 8 * hf.num_experts / r
               + hf.num_experts_per_tok * e / r * (b_gemm * h + b * 3 * hf.expert_intermediate_size / e))
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
    tokens = layout.micro_batch_sequences * layout.seq_length
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

    DP ranks differ only by padding inside their optimizer shards, and every mode keeps a fixed number of bytes
    per shard element: the rank with the largest dense shard (DP rank) and the largest expert shard (expert-DP
    rank) is the busiest of its stage (and the one with the most host memory).
    """
    layout.validate(hf)
    candidates = []
    for pp_rank in range(layout.pp):
        dense, expert = owned_elements(hf, layout, pp_rank)
        dp_rank, edp_rank = dense.index(max(dense)), expert.index(max(expert))
        candidates.append(rank_memory(hf, layout, pp_rank, dp_rank, edp_rank))
    return max(candidates, key=lambda m: m.gpu_bytes)
