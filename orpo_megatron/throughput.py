"""Model FLOPs of a model family's transformer, and the throughput figures derived from them.

Owns the FLOP count (per sequence, forward and training), tokens/s, TFLOP/s per GPU and MFU against a peak
from a small table of accelerators or `--peak-tflops`. It does not time anything itself: the trainer
(`train.py`) times each step and passes its totals to `FlopsCounter.step_metrics`; the tracker logs the result.

Counting convention (Megatron-LM's `num_floating_point_operations`, so TFLOP/s and MFU compare with its
reports): only matrix multiplications, 2 FLOPs per multiply-add; norms, activations, softmax and the embedding
lookup are not counted. Only real sequences count, each at its own length S: padding is computed but is not
model work, and a packed row's attention spans one sequence at a time. Per token and layer:
  attention projections   2*h*(q + 2*kv) + 2*q*h            q = heads*head_dim, kv = kv_heads*head_dim
  attention scores/values (2*q*S + 2*q*S) / 2               causal: half of the S x S products, as Megatron-LM
                                                            counts since 2025-03 (commit 8873b55d6a; before it,
                                                            the full S x S: published figures of that time are
                                                            2*q*S per token and layer higher)
  router                  2*h*E                             MoE only (Megatron-LM leaves it out: < 0.01%)
  feed-forward            top_k * 3 * 2*h*f                 dense: top_k = 1 (gate, up and down projections);
                                                            f: an expert's FFN size (Qwen-MoE's moe_intermediate_size)
  shared expert           3 * 2*h*f_s + 2*h                 Qwen2-MoE: its three projections and its [1, h] gate
plus the output layer 2*h*V per token. Training = 3x forward (backward computes two products per forward
one); activation recomputation adds hardware FLOPs but not model FLOPs, so it does not change MFU.
"""
from __future__ import annotations

import dataclasses

from orpo_megatron.model_config import HFModelConfig

# Dense (no sparsity) peak TFLOP/s per GPU from the vendors' data sheets, by substring of the device name.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp8": 1979.0},
    "H100 SXM": {"bf16": 989.0, "fp8": 1979.0},
    "H100 80GB HBM3": {"bf16": 989.0, "fp8": 1979.0},  # torch's name for the SXM part
    "H100 PCIe": {"bf16": 756.0, "fp8": 1513.0},
    "H100": {"bf16": 989.0, "fp8": 1979.0},
    "A100": {"bf16": 312.0},
}


@dataclasses.dataclass(frozen=True)
class TokenFlops:
    """Forward matmul FLOPs per token, split by where they run (the terms of the module docstring)."""

    attention_projections: float  # per layer: QKV and output projections
    attention_per_position: float  # per layer and query x key position: scores and values
    router: float  # per layer (MoE only)
    feed_forward: float  # per layer: top_k experts' (or the dense MLP's) gate, up and down projections
    shared_expert: float  # per layer: the shared expert and its sigmoid gate (Qwen2-MoE; else 0)
    output_layer: float  # once per token


def token_flops(hf: HFModelConfig, vocab_size: int | None = None) -> TokenFlops:
    """`vocab_size` defaults to the config's; pass the padded size to count what the output layer computes."""
    h = hf.hidden_size
    q = hf.num_attention_heads * hf.head_dim
    kv = hf.num_key_value_heads * hf.head_dim
    vocab = hf.vocab_size if vocab_size is None else vocab_size
    top_k = hf.num_experts_per_tok if hf.is_moe else 1
    return TokenFlops(attention_projections=2 * h * (q + 2 * kv) + 2 * q * h, attention_per_position=4 * q,
                      router=2 * h * hf.num_experts if hf.is_moe else 0,
                      feed_forward=top_k * 6 * h * hf.expert_intermediate_size,
                      shared_expert=(6 * h * hf.shared_expert_intermediate_size + 2 * h
                                     if hf.shared_expert_intermediate_size else 0),
                      output_layer=2 * h * vocab)


# Share of a causal sequence's S x S attention products that count: Megatron-LM's count, and about what flash
# attention's causal kernels compute (they skip the masked blocks).
CAUSAL_ATTENTION_FRACTION = 0.5


def causal_attention_positions(seq_length):
    """Query x key positions the attention of one causal sequence counts."""
    return CAUSAL_ATTENTION_FRACTION * seq_length * seq_length


def forward_flops(hf: HFModelConfig, tokens, attention_positions, vocab_size: int | None = None):
    """Matmul FLOPs of one forward pass over sequences of `tokens` tokens in all whose attention counts
    `attention_positions` query x key positions (`causal_attention_positions` summed over the sequences).
    Numbers or numpy arrays."""
    t = token_flops(hf, vocab_size)
    per_layer = t.attention_projections + t.router + t.feed_forward + t.shared_expert
    return hf.num_layers * (per_layer * tokens + t.attention_per_position * attention_positions) + t.output_layer * tokens


def forward_flops_per_sequence(hf: HFModelConfig, seq_length: int, vocab_size: int | None = None) -> float:
    """Matmul FLOPs of one forward pass over one sequence of `seq_length` tokens (causal attention counted half).

    `vocab_size` defaults to the config's; pass the padded size to count what the output layer computes.
    """
    return float(forward_flops(hf, seq_length, causal_attention_positions(seq_length), vocab_size))


def training_flops(hf: HFModelConfig, num_sequences: int, seq_length: int, vocab_size: int | None = None) -> float:
    """Model FLOPs of forward + backward over `num_sequences` sequences padded to `seq_length`."""
    return 3.0 * num_sequences * forward_flops_per_sequence(hf, seq_length, vocab_size)


def peak_tflops_for(device_name: str | None, fp8: bool = False) -> float | None:
    """The table's dense peak for a device name (torch.cuda.get_device_name()); None when unknown or CPU."""
    if not device_name:
        return None
    for key, peaks in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return peaks.get("fp8" if fp8 else "bf16")
    return None


def default_peak_tflops(fp8: bool = False) -> float | None:
    """Peak of this process's GPU from the table; None on CPU (no MFU is reported there)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return peak_tflops_for(torch.cuda.get_device_name(), fp8)


@dataclasses.dataclass(frozen=True)
class Throughput:
    tokens_per_second: float
    tflops_per_gpu: float
    mfu: float | None  # fraction of the peak; None without a peak


def throughput(tokens: int, model_flops: float, seconds: float, num_gpus: int,
               peak_tflops: float | None = None) -> Throughput:
    """Figures for `tokens` tokens and `model_flops` FLOPs (totals over all GPUs) done in `seconds`."""
    if seconds <= 0 or num_gpus < 1:
        raise ValueError(f"throughput needs seconds > 0 and num_gpus >= 1 (got {seconds}, {num_gpus})")
    tflops_per_gpu = model_flops / seconds / num_gpus / 1e12
    mfu = tflops_per_gpu / peak_tflops if peak_tflops else None
    return Throughput(tokens / seconds, tflops_per_gpu, mfu)


class FlopsCounter:
    """Per-step throughput metrics of a model: what the trainer adds to each logged step's metrics."""

    def __init__(self, hf: HFModelConfig, peak_tflops: float | None = None, world_size: int = 1,
                 vocab_size: int | None = None, fp8: bool = False):
        self.hf = hf
        self.vocab_size = vocab_size
        self.world_size = world_size
        self.peak_tflops = peak_tflops if peak_tflops is not None else default_peak_tflops(fp8)

    def sequences_flops(self, sequence_lengths) -> float:
        """Training model FLOPs of sequences of these lengths (real tokens only)."""
        return sum(training_flops(self.hf, 1, length, vocab_size=self.vocab_size) for length in sequence_lengths)

    def step_metrics(self, real_tokens: int, computed_positions: int, model_flops: float,
                     seconds: float) -> dict[str, float]:
        """`tokens_per_second`, `tflops_per_gpu`, (with a peak) `mfu`, and `real_token_fraction` (real tokens /
        positions computed) of one optimizer step, from the step's totals over all data-parallel ranks."""
        figures = throughput(real_tokens, model_flops, seconds, self.world_size, self.peak_tflops)
        metrics = {"tokens_per_second": figures.tokens_per_second, "tflops_per_gpu": figures.tflops_per_gpu,
                   "real_token_fraction": real_tokens / computed_positions}
        if figures.mfu is not None:
            metrics["mfu"] = figures.mfu
        return metrics
