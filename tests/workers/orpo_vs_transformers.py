"""Worker: ORPO loss and TRL metrics of our model on a fixed batch vs transformers' model + TRL's formulas.

Our side: the converted checkpoint loaded at the given layout, the bundled data through our data layer, one
forward-only pass of `pipeline.run_micro_batches` with the pairs padded and with them packed into one row (with
pipelining, a row of a fixed length longer than the pairs, as the trainer packs rows there: a padding tail after
the last sequence). The values live on the last pipeline stage, whose first rank writes the report.
Reference side: transformers' model of the family on the HF weights and the same token ids padded as TRL's collator
pads them, then TRL ORPOTrainer's formulas written out in plain PyTorch (`trl_reference`), and TRL CPOTrainer's
for each CPO-family config (`cpo_reference`, under "cpo").
"""
import argparse
import json

import torch
from trl_reference import CPO_CASES, cpo_reference, trl_padded_batch, trl_reference

from orpo_megatron import arguments, parallel
from orpo_megatron.checkpoint import format as checkpoint_format
from orpo_megatron.data.arguments import DataConfig, add_data_args
from orpo_megatron.data.micro_batch import packed_micro_batch, padded_micro_batch, round_up
from orpo_megatron.data.pipeline import make_pair_tokenizer, tokenized_split
from orpo_megatron.objective import ORPOConfig
from orpo_megatron.schedule import run_micro_batches
from orpo_megatron.data.batching import batch_layout
from orpo_megatron.rank_model import build_for_rank

BETA, NUM_PAIRS = 0.1, 4
# Per-pair values of both sides; a pair's rewards are beta times its log-probs on both.
PAIR_VALUES = ("chosen_logps", "rejected_logps", "log_odds", "pair_loss", "chosen_nll")
FIXED_ROW_TAIL = 37  # padding positions after the pairs in a fixed-length packed row


def main() -> None:
    parser = argparse.ArgumentParser()
    arguments.add_parallel_args(parser)
    add_data_args(parser)
    parser.add_argument("--load", required=True)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    info = checkpoint_format.describe(args.load)
    hf = info.hf
    layout = parallel.initialize(parallel.ParallelLayout.from_args(args, parallel.launch_env().world_size, hf.is_moe),
                                 hf)
    chunks = build_for_rank(hf, layout, weights=info).chunks

    data_config = DataConfig.from_args(args)
    pair_tokenizer = make_pair_tokenizer(data_config, args.hf_dir)
    pairs, _ = tokenized_split(data_config, pair_tokenizer, data_config.split)
    batches = batch_layout(True, None, layout, fp8=False)
    columns, pad_id = pairs[:NUM_PAIRS], pair_tokenizer.tokenizer.pad_id
    multiple = batches.length_multiple
    padded = padded_micro_batch(columns, pad_id, multiple)
    packed_length = (round_up(padded.num_real_tokens + FIXED_ROW_TAIL, multiple) if batches.fixed_length_rows
                     else None)
    configs = {"orpo": ORPOConfig(vocab_size=hf.vocab_size, beta=BETA),
               **{name: ORPOConfig(vocab_size=hf.vocab_size, **case) for name, case in CPO_CASES.items()}}
    packed = packed_micro_batch(columns, pad_id, multiple, packed_length)
    ours = {}
    for name, batch in (("ours", padded), ("ours_packed", packed)):
        for loss_name, orpo_config in configs.items():
            with torch.no_grad():
                result = run_micro_batches(chunks, [batch], orpo_config, forward_only=True, collect_pairs=True)
            if result.sums is not None:  # the last pipeline stage
                ours.setdefault(loss_name, {})[name] = result.metrics(orpo_config)
                ours[loss_name][f"{name}_pairs"] = pair_lists(vars(result.pairs[0]))

    if parallel.is_logging_rank():
        from transformers import AutoModelForCausalLM

        reference_model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
        batch = trl_padded_batch(columns, pad_id)
        with torch.no_grad():
            logits = reference_model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            causal_logits = reference_model(batch["input_ids"]).logits.float()
        lengths = batch["attention_mask"].sum(-1).tolist()
        real_positions = {}  # every position with a next token of its own sequence, per half
        for half, rows in (("chosen", range(NUM_PAIRS)), ("rejected", range(NUM_PAIRS, 2 * NUM_PAIRS))):
            block = torch.cat([logits[row, :lengths[row] - 1, :hf.vocab_size] for row in rows]).double()
            real_positions[f"logits/{half}"] = block.mean().item()

        def compared(loss_name, reference):
            # Our attention is causal only; TRL's call also masks padding keys. Real positions are the same
            # either way (right padding), padding positions are not, and `logits/*` averages them too.
            masked, causal_only = reference(logits), reference(causal_logits)
            return {**ours[loss_name], "reference": masked["metrics"], "reference_pairs": pair_lists(masked),
                    "reference_causal_only": causal_only["metrics"]}

        report = {**compared("orpo", lambda x: trl_reference(x, batch, BETA)),
                  "cpo": {name: compared(name, lambda x: cpo_reference(x, batch, vocab_size=hf.vocab_size, **case))
                          for name, case in CPO_CASES.items()},
                  "reference_real_positions": real_positions,
                  "layout": layout.describe(),
                  "packed_row": {"positions": packed.num_positions, "real_tokens": packed.num_real_tokens}}
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    parallel.destroy()


def pair_lists(values: dict) -> dict[str, list[float]]:
    """The per-pair values (`objective.PairValues` fields, or a TRL reference's) both sides have, as lists."""
    return {name: values[name].tolist() for name in PAIR_VALUES if values.get(name) is not None}


if __name__ == "__main__":
    main()
