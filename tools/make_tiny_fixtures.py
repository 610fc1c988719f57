"""Write a tiny random Mixtral (or dense Mistral) Hugging Face folder with the tiny sentencepiece tokenizer.

    python tools/make_tiny_fixtures.py --output runs/tiny/hf [--dense] [--seed 1234] [--dtype fp32|bf16]

The folder has the layout of a real checkpoint (config.json, model.safetensors, tokenizer.model,
tokenizer_config.json with a Zephyr chat template, generation_config.json), so every tool runs on it offline.
"""
import argparse
import os
import sys

import torch

from orpo_megatron import tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="Folder to write (created; must not hold a checkpoint).")
    parser.add_argument("--dense", action="store_true", help="A dense MistralForCausalLM instead of Mixtral.")
    parser.add_argument("--seed", type=int, default=1234, help="Seed of the random weights. Default: 1234.")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="Weight dtype. Default: fp32.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing checkpoint in --output.")
    args = parser.parse_args()
    if os.path.exists(os.path.join(args.output, "config.json")) and not args.overwrite:
        sys.exit(f"error: {args.output} already holds a checkpoint; pass --overwrite to replace it")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tiny_model.write_tiny_model(args.output, seed=args.seed, dense=args.dense, dtype=dtype)
    print(f"wrote a tiny {'Mistral' if args.dense else 'Mixtral'} checkpoint and tokenizer to {args.output}")


if __name__ == "__main__":
    main()
