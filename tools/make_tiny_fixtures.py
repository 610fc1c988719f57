"""Write a tiny random Hugging Face folder of one model family with its tiny tokenizer.

    python tools/make_tiny_fixtures.py --output runs/tiny/hf [--family mixtral|mistral|qwen3_moe|qwen2_moe]
        [--seed 1234] [--dtype fp32|bf16]

The folder has the layout of a real checkpoint (config.json, safetensors, tokenizer files, generation_config.json),
so every tool runs on it offline: Mixtral and Mistral with a sentencepiece tokenizer and a Zephyr chat template,
Qwen3-MoE and Qwen2-MoE written by transformers' own model classes with a Qwen-style byte-level tokenizer.
"""
import argparse
import os
import sys

import torch

from orpo_megatron import tiny_model

FAMILY_NAMES = {"mixtral": "Mixtral", "mistral": "Mistral", "qwen3_moe": "Qwen3-MoE", "qwen2_moe": "Qwen2-MoE"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="Folder to write (created; must not hold a checkpoint).")
    parser.add_argument("--family", choices=list(FAMILY_NAMES), default="mixtral",
                        help="Model family: MixtralForCausalLM, its dense MistralForCausalLM, Qwen3MoeForCausalLM or "
                             "Qwen2MoeForCausalLM. Default: mixtral.")
    parser.add_argument("--seed", type=int, default=1234, help="Seed of the random weights. Default: 1234.")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="Weight dtype. Default: fp32.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing checkpoint in --output.")
    args = parser.parse_args()
    if os.path.exists(os.path.join(args.output, "config.json")) and not args.overwrite:
        sys.exit(f"error: {args.output} already holds a checkpoint; pass --overwrite to replace it")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.family.startswith("qwen"):
        tiny_model.write_tiny_qwen_moe(args.output, args.family, seed=args.seed, dtype=dtype)
    else:
        tiny_model.write_tiny_model(args.output, seed=args.seed, dense=args.family == "mistral", dtype=dtype)
    print(f"wrote a tiny {FAMILY_NAMES[args.family]} checkpoint and tokenizer to {args.output}")


if __name__ == "__main__":
    main()
