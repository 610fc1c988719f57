"""Score a checkpoint on preference pairs: `python -m orpo_megatron.evaluate --load CKPT --data-path DATA
--output scores.jsonl` (any parallel layout; launched like the trainer).

Writes one JSON object per pair (`index`, `chosen_logps`, `rejected_logps`, `log_odds`, `nll_loss`,
`chosen_wins`) and the aggregate metrics under TRL's names, printed and written to `<output>.summary.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from orpo_megatron import arguments, model, parallel
from orpo_megatron.checkpoint import training as checkpointing
from orpo_megatron.data.arguments import DataConfig
from orpo_megatron.data.batching import EvalPairs, batch_layout
from orpo_megatron.data.pipeline import make_pair_tokenizer, tokenize_into_cache, tokenized_split
from orpo_megatron.errors import UserError
from orpo_megatron.model_config import FusedKernels
from orpo_megatron.objective import ORPOConfig
from orpo_megatron.rank_model import build_for_rank
from orpo_megatron.schedule import run_micro_batches


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = arguments.new_parser("python -m orpo_megatron.evaluate", __doc__.split("\n")[0])
    group = parser.add_argument_group("evaluation")
    group.add_argument("--output", required=True, help="Per-pair scores (JSONL); the summary goes next to it.")
    group.add_argument("--micro-batch-size", type=int, default=4, help="Pairs per forward pass. Default: 4.")
    args = arguments.parse_and_validate(parser, argv)
    if args.packed_length is not None:
        parser.error("--packed-length packs training steps; evaluation packs each micro-batch into its own row")
    arguments.check_output_folder(parser, "output", os.path.dirname(os.path.abspath(args.output)), args.output)
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    data_config = DataConfig.from_args(args)
    data_config.check_present()  # before minutes of model building
    checkpoint = checkpointing.resolve(args.load, args.hf_config)
    hf = checkpoint.hf
    # The first rank tokenizes (forking workers) before CUDA and NCCL start; the others wait in the rendezvous.
    if parallel.launch_env().rank == 0:
        tokenize_into_cache(data_config, checkpoint.hf_files, [data_config.split])
    layout = parallel.initialize(parallel.ParallelLayout.from_args(args, parallel.launch_env().world_size, hf.is_moe),
                                 hf, args.seed, args.distributed_timeout_minutes)
    use_te = model.transformer_engine_available()
    chunks = build_for_rank(hf, layout, precision=arguments.precision_config(args), use_transformer_engine=use_te,
                            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, weights=checkpoint.info,
                            moe_token_dispatcher_type=args.moe_token_dispatcher_type,
                            kernels=FusedKernels.for_backend(use_te)).chunks
    for chunk in chunks:
        chunk.eval()

    pair_tokenizer = make_pair_tokenizer(data_config, checkpoint.hf_files)
    pairs, _ = tokenized_split(data_config, pair_tokenizer, data_config.split)
    batches = batch_layout(args.packing, None, layout, bool(args.fp8_format))
    evaluation = EvalPairs(pairs, args.micro_batch_size, parallel_state.get_data_parallel_rank(),
                           layout.data_parallel_size, pair_tokenizer.tokenizer.pad_id, batches)
    micro_batches = list(evaluation)
    orpo_config = ORPOConfig.from_args(args, hf.vocab_size)
    with torch.no_grad():
        result = run_micro_batches(chunks, micro_batches, orpo_config, forward_only=True, collect_pairs=True)

    rows = []
    if result.sums is not None:
        for batch, values in zip(micro_batches, result.pairs):
            columns = zip(batch.row_index.tolist(), values.chosen_logps.tolist(), values.rejected_logps.tolist(),
                          values.pair_loss.tolist(), values.chosen_nll.tolist(), values.chosen_wins.tolist())
            log_odds = values.log_odds.tolist() if values.log_odds is not None else None
            for i, (index, chosen, rejected, pair_loss, nll, wins) in enumerate(columns):
                row = {"index": index, "chosen_logps": chosen, "rejected_logps": rejected, "pair_loss": pair_loss,
                       "nll_loss": nll, "chosen_wins": wins}
                if log_odds is not None:
                    row["log_odds"] = log_odds[i]
                rows.append(row)
    metrics = result.metrics(orpo_config)
    summary = {}
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and parallel_state.get_tensor_model_parallel_rank() == 0:
        gathered = [None] * layout.data_parallel_size
        dist.all_gather_object(gathered, rows, group=parallel_state.get_data_parallel_group())
        if parallel.is_logging_rank():
            summary = dict(metrics, pairs=sum(len(g) for g in gathered),
                           pairs_left_out=evaluation.dropped_pairs, checkpoint=checkpoint.folder,
                           layout=layout.describe())
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
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
