"""Score a checkpoint on preference pairs: `python -m orpo_megatron.evaluate --load CKPT --data-path DATA
--output scores.jsonl` (any parallel layout; launched like the trainer).

Writes one JSON object per pair (`index`, `chosen_logps`, `rejected_logps`, `log_odds`, `nll_loss`,
`chosen_wins`) and the aggregate metrics under TRL's names, printed and written to `<output>.summary.json`.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from orpo_megatron import arguments, checkpoint_format, checkpointing, model, parallel
from orpo_megatron.data.arguments import DataConfig
from orpo_megatron.data.batching import EvalPairs
from orpo_megatron.data.pipeline import make_pair_tokenizer, tokenized_split
from orpo_megatron.model_config import ModelConfigError, build_transformer_config
from orpo_megatron.objective import ORPOConfig
from orpo_megatron.pipeline import run_micro_batches


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = arguments.new_parser("python -m orpo_megatron.evaluate", __doc__.split("\n")[0])
    group = parser.add_argument_group("evaluation")
    group.add_argument("--output", required=True, help="Per-pair scores (JSONL); the summary goes next to it.")
    group.add_argument("--micro-batch-size", type=int, default=4, help="Pairs per forward pass. Default: 4.")
    return arguments.parse_and_validate(parser, argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    checkpoint = checkpointing.resolve(args.load, args.hf_config)
    hf = checkpoint.hf
    layout = parallel.initialize(arguments.layout_kwargs(args, hf.is_moe), hf, args.seed)
    config = build_transformer_config(hf, **arguments.layout_kwargs(args, hf.is_moe),
                                      moe_token_dispatcher_type=args.moe_token_dispatcher_type)
    vocab = model.vocab_info(hf, args.make_vocab_size_divisible_by, layout.tensor_model_parallel_size)
    chunks = model.build_model(config, hf, vocab, model.transformer_engine_available())
    checkpoint_format.load_model_weights(checkpoint.info, chunks)
    for chunk in chunks:
        chunk.eval()

    data_config = DataConfig.from_args(args)
    pair_tokenizer = make_pair_tokenizer(data_config, checkpoint.hf_files)
    if dist.get_rank() == 0:  # tokenize once into the cache; the other ranks then read it
        tokenized_split(data_config, pair_tokenizer, data_config.split)
    dist.barrier()
    pairs, _ = tokenized_split(data_config, pair_tokenizer, data_config.split)
    pad_multiple = layout.tensor_model_parallel_size if config.sequence_parallel else 1
    evaluation = EvalPairs(pairs, args.micro_batch_size, parallel_state.get_data_parallel_rank(),
                           layout.data_parallel_size, pair_tokenizer.tokenizer.pad_id, pad_multiple)
    micro_batches = list(evaluation)
    orpo_config = ORPOConfig(vocab_size=hf.vocab_size, beta=args.orpo_beta, nll_on_prompt=args.nll_on_prompt)
    with torch.no_grad():
        result = run_micro_batches(chunks, micro_batches, orpo_config, forward_only=True, collect_pairs=True)

    rows = []
    if result.sums is not None:
        for batch, values in zip(micro_batches, result.pairs):
            for i, index in enumerate(batch["row_index"].tolist()):
                rows.append({
                    "index": index,
                    "chosen_logps": values.chosen_logps[i].item(),
                    "rejected_logps": values.rejected_logps[i].item(),
                    "log_odds": values.log_odds[i].item(),
                    "nll_loss": values.chosen_nll[i].item(),
                    "chosen_wins": bool(values.chosen_wins[i].item()),
                })
    summary = {}
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and parallel_state.get_tensor_model_parallel_rank() == 0:
        gathered = [None] * layout.data_parallel_size
        dist.all_gather_object(gathered, rows, group=parallel_state.get_data_parallel_group())
        if parallel.is_logging_rank():
            summary = dict(result.sums.finalize(orpo_config.beta), pairs=sum(len(g) for g in gathered),
                           pairs_left_out=evaluation.dropped_pairs, checkpoint=checkpoint.folder)
            with open(args.output, "w", encoding="utf-8") as f:
                for row in sorted((r for g in gathered for r in g), key=lambda r: r["index"]):
                    f.write(json.dumps(row) + "\n")
            with open(args.output + ".summary.json", "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
            print(json.dumps(summary, indent=2))
    parallel.destroy()
    return summary


def cli(argv: list[str] | None = None) -> None:
    try:
        main(argv)
    except (parallel.LayoutError, ModelConfigError, checkpointing.CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
