"""Worker: forward + backward of the tiny model at each parallel layout of `--layouts` in turn (one launch,
Megatron's parallel state rebuilt between them), compared with transformers.

Two samples are processed per run whatever the layout (micro-batches x DP ranks = 2), with the loss
L = sum(logits[:, :, :true_vocab] * R) for a fixed random R per sample, averaged over samples by Megatron's
schedule (1/num_microbatches) and DDP (1/DP). Each rank compares its logits and its local gradient shards
with transformers' model on the same weights (computed once per launch), and writes its report and the gathered
logits for cross-layout comparison to `<out>/<layout name>/`.
"""
import argparse
import json
import os
from functools import cache, partial

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from layout_runs import run_each_layout
import reference_weights
from orpo_megatron import parallel
from orpo_megatron.checkpoint import hf_mapping
from orpo_megatron.model_config import HFModelConfig
from orpo_megatron.rank_model import build_for_rank

SAMPLES, BATCH, SEQ = 2, 2, 16


def sample(index: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + index)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=generator)
    weights = torch.randn(BATCH, SEQ, vocab, generator=generator)
    return ids, weights


def true_vocab_columns(local_logits: torch.Tensor, true_vocab: int) -> tuple[torch.Tensor, slice]:
    """Mask of this TP rank's columns that are real tokens, and their slice of the global vocabulary."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    width = local_logits.shape[-1]
    start = rank * width
    columns = torch.arange(start, start + width)
    return columns < true_vocab, slice(start, min(start + width, true_vocab))


@cache
def hf_reference(hf_dir: str) -> tuple[dict, dict]:
    """Logits per sample and the HF-named gradients of the sample-averaged loss, from transformers."""
    from transformers import AutoModelForCausalLM

    hf = HFModelConfig.from_file(hf_dir)
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    samples = range(SAMPLES)
    logits = {}
    for index in samples:
        ids, weights = sample(index, hf.vocab_size)
        out = ref(ids).logits
        (out * weights).sum().div(len(samples)).backward()
        logits[index] = out.detach()
    return logits, {name: p.grad for name, p in ref.named_parameters()}


def run(args: argparse.Namespace) -> None:
    hf = HFModelConfig.from_file(args.hf_dir)
    layout_kwargs = dict(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        expert_model_parallel_size=args.ep,
        expert_tensor_parallel_size=args.etp,
        virtual_pipeline_model_parallel_size=args.vp,
        sequence_parallel=args.tp > 1,
    )
    layout = parallel.initialize(layout_kwargs, hf)
    built = build_for_rank(hf, layout, moe_token_dispatcher_type=args.dispatcher)
    config, vocab, chunks = built.config, built.vocab, built.chunks
    reference_weights.load_hf_checkpoint(chunks, args.hf_dir, hf)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False)
    chunks = [DistributedDataParallel(config, ddp_config, chunk) for chunk in chunks]
    config.finalize_model_grads_func = finalize_model_grads

    dp_rank, dp = parallel_state.get_data_parallel_rank(), layout.data_parallel_size
    num_microbatches = SAMPLES // dp
    my_samples = [dp_rank * num_microbatches + m for m in range(num_microbatches)]
    # The interleaved schedule reads one iterator per model chunk.
    batches = [iter([sample(i, hf.vocab_size) for i in my_samples]) for _ in chunks]
    gathered_logits = []

    def loss_func(weights: torch.Tensor, output: torch.Tensor):
        real, cols = true_vocab_columns(output, hf.vocab_size)
        local_weights = torch.zeros_like(output)
        local_weights[..., real] = weights[..., cols]
        loss = (output * local_weights).sum()
        full = tensor_parallel.gather_from_tensor_model_parallel_region(output.detach())[..., : hf.vocab_size]
        gathered_logits.append(full)
        return loss, {}

    def forward_step(data_iterator, chunk):
        ids, weights = next(data_iterator)
        positions = torch.arange(SEQ).expand(BATCH, SEQ)
        return chunk(ids, positions, attention_mask=None), partial(loss_func, weights)

    for chunk in chunks:
        chunk.zero_grad_buffer()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches if len(chunks) > 1 else batches[0],
        model=chunks,
        num_microbatches=num_microbatches,
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=False,
    )

    ref_logits, hf_grads = hf_reference(args.hf_dir)
    # The reference gradients as full Megatron tensors; padded vocabulary rows get zero gradient (nothing reads them).
    ref_grads = reference_weights.stack_layers([hf.family.hf_layer_to_megatron(hf_grads, layer)
                                         for layer in range(hf.num_layers)])
    ref_grads.update(hf_mapping.hf_outer_to_megatron(hf_grads, hf, vocab.padded_size))

    report = {"layout": layout.describe(), "architecture": hf.architecture, "logits_max_abs_diff": 0.0,
              "grad_max_rel_diff": 0.0, "grads_checked": 0, "worst_grad": None}
    if parallel_state.is_pipeline_last_stage():
        for index, logits in zip(my_samples, gathered_logits):
            diff = (logits - ref_logits[index]).abs().max().item()
            report["logits_max_abs_diff"] = max(report["logits_max_abs_diff"], diff)
        if parallel_state.get_tensor_model_parallel_rank() == 0:  # one writer per DP rank
            torch.save({i: l for i, l in zip(my_samples, gathered_logits)},
                       os.path.join(args.out, f"logits_dp{dp_rank}.pt"))

    for chunk in chunks:
        for key, entry in reference_weights.model_parameters(chunk.module):
            name = f"{key}{tuple(entry.global_offset) if hasattr(entry, 'global_offset') else ''}"
            expected = reference_weights.local_part(entry, ref_grads[key])
            got = entry.data.main_grad
            scale = expected.abs().max().item() or 1.0
            rel = (got - expected).abs().max().item() / scale
            report["grads_checked"] += 1
            if rel >= report["grad_max_rel_diff"]:
                report["grad_max_rel_diff"], report["worst_grad"] = rel, name

    with open(os.path.join(args.out, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump(report, f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--vp", type=int, default=None)
    parser.add_argument("--etp", type=int, default=None)
    parser.add_argument("--dispatcher", default="alltoall")
    run_each_layout(parser, run)


if __name__ == "__main__":
    main()
