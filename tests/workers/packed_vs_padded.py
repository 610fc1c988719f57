"""Worker: the same global batch packed and padded through the real data layer and pipeline at each layout of
`--layouts` in turn (one launch; Megatron's parallel state rebuilt between them).

The tiny Mixtral is loaded from its HF checkpoint; the bundled pairs are tokenized by our data layer, and one
global batch is built twice by `TrainPairIterator`: padded (`--no-packing`) and packed as this layout packs it
(one row per micro-batch without pipelining, fixed-length rows with it). Each rank writes `<name>/rank<r>.json`
per layout with:
- grads: the largest |packed - padded| / max |padded| over its gradient shards after one training pass each;
- metrics / load_balancing: the finalized ORPO metrics and the router's load-balancing loss of both (last stage);
- rope (no pipelining): per layer, the largest difference between the query and key its core attention receives
  (after RoPE) in the packed row and in the padded rows, sequence by sequence, and the largest |value| there;
- perturbation: with one pair's chosen completion replaced on DP rank 0 (the first segment of its packed row),
  the largest change of every other sequence's log-prob and of the perturbed one.
`--moe-aux-loss-coeff` sets the router's coefficient for the gradient passes; `--fixed-rows-length` (world 1)
adds a pass with fixed-length rows at the model's coefficient, whose load-balancing loss is also reported;
`--bf16` runs the model in bf16 (fp32 gradients).
"""
import argparse
import json
import os

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

from layout_runs import run_each_layout
import reference_weights
from orpo_megatron import arguments, parallel
from orpo_megatron.data.arguments import DataConfig, add_data_args
from orpo_megatron.data.batching import BatchLayout, TrainPairIterator, batch_layout
from orpo_megatron.data.pipeline import make_pair_tokenizer, tokenized_split
from orpo_megatron.model_config import HFModelConfig, PrecisionConfig
from orpo_megatron.objective import GlobalNormalizers, ORPOConfig
from orpo_megatron.schedule import run_micro_batches
from orpo_megatron.routing import RoutingStats
from orpo_megatron.rank_model import build_for_rank

BETA, GLOBAL_BATCH = 0.1, 8


def training_pass(chunks, step, orpo_config, routing: RoutingStats):
    """Gradients, TRL metrics, the load-balancing loss summed over layers, and the routing metrics."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    normalizers = GlobalNormalizers(step.num_pairs, step.num_nll_targets(orpo_config.nll_on_prompt))
    with routing.recording():
        result = run_micro_batches(chunks, step.micro_batches, orpo_config, forward_only=False,
                                   normalizers=normalizers)
    grads = {name: param.main_grad.clone() for chunk in chunks for name, param in chunk.named_parameters()}
    routing_metrics = routing.metrics(len(step.micro_batches))
    return grads, result.metrics(orpo_config), routing_metrics.get("moe_load_balancing_loss"), routing_metrics


def reference_routing(hf_dir: str, micro_batches) -> list[list[float]]:
    """transformers' Mixtral on this rank's sequences of padded micro-batches, one sequence at a time: per layer,
    how many tokens each expert's top-k takes, the router's softmax entropy summed, and the token count."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    config = reference.config
    table = torch.zeros(config.num_hidden_layers, config.num_local_experts + 2, dtype=torch.float64)
    with torch.no_grad():
        for batch in micro_batches:
            for ids, padding in zip(batch.input_ids, batch.padding_mask):
                logits_per_layer = reference(ids[~padding][None], output_router_logits=True).router_logits
                for layer, logits in enumerate(logits_per_layer):
                    probs = torch.softmax(logits.double(), dim=-1)
                    chosen = probs.topk(config.num_experts_per_tok, dim=-1).indices
                    table[layer, :-2] += torch.zeros_like(probs).scatter_(1, chosen, 1.0).sum(0)
                    table[layer, -2] += -torch.special.xlogy(probs, probs).sum()  # 0 log 0 = 0
                    table[layer, -1] += probs.shape[0]
    return table.tolist()


def worst_relative(packed: dict, padded: dict) -> float:
    return max((packed[n] - padded[n]).abs().max().item() / (padded[n].abs().max().item() or 1.0) for n in padded)


def attention_inputs(chunks, micro_batch, orpo_config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(query, key) after RoPE as each core attention of this rank receives them, for one micro-batch."""
    seen, hooks = [], []
    for chunk in chunks:
        for layer in chunk.module.decoder.layers:
            hooks.append(layer.self_attention.core_attention.register_forward_pre_hook(
                lambda module, args: seen.append((args[0].detach().clone(), args[1].detach().clone()))))
    with torch.no_grad():
        run_micro_batches(chunks, [micro_batch], orpo_config, forward_only=True)
    for hook in hooks:
        hook.remove()
    return seen


def rope_difference(chunks, packed, padded, orpo_config) -> list[dict]:
    """Per layer: each sequence's query and key in the packed row ([t, heads, dim]) against its padded row
    ([s, 2B, ...]), the largest difference and the largest magnitude."""
    layers = []
    bounds = packed.cu_seqlens.tolist()
    for (packed_q, packed_k), (padded_q, padded_k) in zip(attention_inputs(chunks, packed, orpo_config),
                                                          attention_inputs(chunks, padded, orpo_config)):
        worst, scale = 0.0, 0.0
        for sequence, length in enumerate(packed.sequence_lengths):
            start = bounds[sequence]
            for ours, theirs in ((packed_q, padded_q), (packed_k, padded_k)):
                theirs = theirs[:length, sequence]
                worst = max(worst, (ours[start:start + length] - theirs).abs().max().item())
                scale = max(scale, theirs.abs().max().item())
        layers.append({"difference": worst, "scale": scale})
    return layers


def perturbed(step, iterator, layout: BatchLayout, pad_id: int):
    """The step's micro-batches with the first pair of DP rank 0's first micro-batch given another chosen
    completion of the same length (its EOS kept); that pair's row index."""
    first = step.micro_batches[0]
    positions = {row: i for i, row in enumerate(iterator.pairs["row_index"])}
    columns = iterator.pairs[[positions[row] for row in first.row_index.tolist()]]
    chosen = columns["chosen_input_ids"][0]
    columns["chosen_input_ids"][0] = [(token + 7) % 500 + 3 for token in chosen[:-1]] + chosen[-1:]
    rebuilt = layout.build(columns, pad_id, first.input_ids.shape[1] if first.packed else None)
    assert rebuilt.input_ids.shape == first.input_ids.shape
    return [rebuilt] + step.micro_batches[1:], columns["row_index"][0]


def perturbation_report(chunks, step, iterator, layout, pad_id, orpo_config) -> dict:
    changed, row = perturbed(step, iterator, layout, pad_id)
    if parallel_state.get_data_parallel_rank() != 0:
        changed = step.micro_batches
    with torch.no_grad():
        before = run_micro_batches(chunks, step.micro_batches, orpo_config, forward_only=True, collect_pairs=True)
        after = run_micro_batches(chunks, changed, orpo_config, forward_only=True, collect_pairs=True)
    report = {"perturbed_change": 0.0, "others_change": 0.0}
    for batch, old, new in zip(step.micro_batches, before.pairs, after.pairs):
        for pair, source_row in enumerate(batch.row_index.tolist()):
            for name in ("chosen_logps", "rejected_logps"):
                change = abs(getattr(new, name)[pair].item() - getattr(old, name)[pair].item())
                hit = source_row == row and name == "chosen_logps" and parallel_state.get_data_parallel_rank() == 0
                key = "perturbed_change" if hit else "others_change"
                report[key] = max(report[key], change)
    return report


def run(args: argparse.Namespace) -> None:
    hf = HFModelConfig.from_file(args.hf_dir)
    layout = parallel.initialize(parallel.ParallelLayout.from_args(args, parallel.launch_env().world_size, hf.is_moe),
                                 hf)
    built = build_for_rank(hf, layout, precision=PrecisionConfig(bf16=args.bf16),
                           moe_aux_loss_coeff=args.moe_aux_loss_coeff)
    config, chunks = built.config, built.chunks
    reference_weights.load_hf_checkpoint(chunks, args.hf_dir, hf)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False)
    chunks = [DistributedDataParallel(config, ddp_config, chunk) for chunk in chunks]
    config.finalize_model_grads_func = finalize_model_grads
    if len(chunks) > 1:
        config.no_sync_func = [chunk.no_sync for chunk in chunks]

    data_config = DataConfig.from_args(args)
    pair_tokenizer = make_pair_tokenizer(data_config, args.hf_dir)
    pairs, _ = tokenized_split(data_config, pair_tokenizer, data_config.split)
    pad_id = pair_tokenizer.tokenizer.pad_id
    packed_layout = batch_layout(True, args.packed_length, layout, fp8=False)
    padded_layout = BatchLayout(packing=False, length_multiple=packed_layout.length_multiple)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), layout.data_parallel_size

    def step_of(batches: BatchLayout):
        iterator = TrainPairIterator(pairs, GLOBAL_BATCH, args.micro_batch_size, dp_rank, dp_size, 1234, pad_id,
                                     batches)
        return next(iterator), iterator

    orpo_config = ORPOConfig(vocab_size=hf.vocab_size, beta=BETA)
    routing = RoutingStats([chunk.module for chunk in chunks], hf.num_layers, hf.num_experts)
    (packed, iterator), (padded, _) = step_of(packed_layout), step_of(padded_layout)
    packed_grads, packed_metrics, packed_balancing, packed_routing = training_pass(chunks, packed, orpo_config,
                                                                                  routing)
    padded_grads, padded_metrics, padded_balancing, padded_routing = training_pass(chunks, padded, orpo_config,
                                                                                  routing)
    report = {"layout": layout.describe(), "grads": worst_relative(packed_grads, padded_grads),
              "rows": [tuple(b.input_ids.shape) for b in packed.micro_batches],
              "metrics": {"packed": packed_metrics, "padded": padded_metrics},
              "load_balancing": {"packed": packed_balancing, "padded": padded_balancing},
              "routing": {"packed": packed_routing, "padded": padded_routing},
              "data_parallel_rank": dp_rank,
              "reference_routing": reference_routing(args.hf_dir, padded.micro_batches)}
    if args.fixed_rows_length:
        coefficient, config.moe_aux_loss_coeff = config.moe_aux_loss_coeff, hf.router_aux_loss_coef
        fixed, _ = step_of(BatchLayout(fixed_length_rows=True, packed_length=args.fixed_rows_length))
        _, fixed_metrics, fixed_balancing, _ = training_pass(chunks, fixed, orpo_config, routing)
        _, _, padded_balancing, _ = training_pass(chunks, padded, orpo_config, routing)
        config.moe_aux_loss_coeff = coefficient
        report["fixed_rows"] = {"rows": len(fixed.micro_batches), "metrics": fixed_metrics,
                                "load_balancing": fixed_balancing, "padded_load_balancing": padded_balancing}
    if layout.pipeline_model_parallel_size == 1:
        report["rope"] = rope_difference(chunks, packed.micro_batches[0], padded.micro_batches[0], orpo_config)
    report["perturbation"] = perturbation_report(chunks, packed, iterator, packed_layout, pad_id, orpo_config)
    with open(os.path.join(args.out, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump(report, f)


def main() -> None:
    parser = argparse.ArgumentParser()
    arguments.add_parallel_args(parser)
    add_data_args(parser)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--moe-aux-loss-coeff", type=float, default=None)
    parser.add_argument("--fixed-rows-length", type=int, default=None)
    parser.add_argument("--bf16", action="store_true")
    run_each_layout(parser, run)


if __name__ == "__main__":
    main()
