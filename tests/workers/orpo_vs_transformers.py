"""Worker: ORPO loss and TRL metrics of our model on a fixed batch vs transformers' Mixtral + TRL's formulas.

Our side: the converted checkpoint loaded at the given layout, the bundled data through our data layer, one
forward-only pass of `pipeline.run_micro_batches`. Reference side: transformers' MixtralForCausalLM on the HF
weights and the same token ids, then TRL ORPOTrainer's formulas written out in plain PyTorch (`trl_reference`).
"""
import argparse
import json

import torch
from trl_reference import trl_reference

from orpo_megatron import arguments, checkpoint_format, model, parallel
from orpo_megatron.data.arguments import DataConfig, add_data_args
from orpo_megatron.data.batching import collate_pairs
from orpo_megatron.data.pipeline import make_pair_tokenizer, tokenized_split
from orpo_megatron.model_config import build_transformer_config
from orpo_megatron.objective import ORPOConfig
from orpo_megatron.pipeline import run_micro_batches

BETA, NUM_PAIRS = 0.1, 4


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
    layout_kwargs = arguments.layout_kwargs(args, hf.is_moe)
    layout = parallel.initialize(layout_kwargs, hf)
    config = build_transformer_config(hf, **layout_kwargs)
    vocab = model.vocab_info(hf, 128, layout.tensor_model_parallel_size)
    chunks = model.build_model(config, hf, vocab)
    checkpoint_format.load_model_weights(info, chunks)

    data_config = DataConfig.from_args(args)
    pair_tokenizer = make_pair_tokenizer(data_config, args.hf_dir)
    pairs, _ = tokenized_split(data_config, pair_tokenizer, data_config.split)
    pad_multiple = layout.tensor_model_parallel_size if config.sequence_parallel else 1
    batch = collate_pairs(pairs[:NUM_PAIRS], pair_tokenizer.tokenizer.pad_id, pad_multiple)
    with torch.no_grad():
        result = run_micro_batches(chunks, [batch], ORPOConfig(vocab_size=hf.vocab_size, beta=BETA),
                                   forward_only=True)

    if parallel.is_logging_rank():
        from transformers import AutoModelForCausalLM

        reference_model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
        longest = int(batch["attention_mask"].sum(-1).max())  # TRL pads to the longest row, no further
        trimmed = {key: value[:, :longest] for key, value in batch.items() if value.dim() == 2}
        with torch.no_grad():
            logits = reference_model(trimmed["input_ids"], attention_mask=trimmed["attention_mask"]).logits.float()
            causal_logits = reference_model(trimmed["input_ids"]).logits.float()
        report = {"ours": result.sums.finalize(BETA), "reference": trl_reference(logits, trimmed, BETA)["metrics"],
                  # Our attention is causal only; TRL's call also masks padding keys. Real positions are the same
                  # either way (right padding), padding positions are not, and `logits/*` averages them too.
                  "reference_causal_only": trl_reference(causal_logits, trimmed, BETA)["metrics"],
                  "layout": layout.describe()}
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    parallel.destroy()


if __name__ == "__main__":
    main()
