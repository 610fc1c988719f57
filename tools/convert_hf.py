"""Convert Mixtral-family checkpoints between Hugging Face and Megatron-LM's checkpoint format.

    python tools/convert_hf.py hf-to-megatron --hf-dir HF --output CKPT [--dtype bf16|fp32] [--overwrite] [--verify]
    python tools/convert_hf.py megatron-to-hf --load CKPT --output HF [--hf-config HF] [--dtype ...] [--max-shard-size 5GB]
    python tools/convert_hf.py upgrade --load OLD --output CKPT

One process, one layer in memory at a time. CKPT is a Megatron-LM checkpoint root (`release/` and its tracker
file) that this project's trainer and Megatron-LM (`--load CKPT`, torch_dist, any TP/PP/EP/VP) both load.
`--load` takes a checkpoint root (its tracker's folder is used: a training save folder's newest complete
iteration) or a checkpoint folder, ours or Megatron-LM's (then with --hf-config). `upgrade` rewrites a
checkpoint of this project's first, per-layer format. Output is written under a temporary name next to --output
and renamed when complete.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

# Run from a checkout without installing: make the package next to tools/ importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPE_CHOICES = ("fp32", "bf16", "fp16")  # conversion.DTYPES, without importing torch for --help


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_hf.py", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{hf-to-megatron,megatron-to-hf,upgrade}")
    to_megatron = commands.add_parser(
        "hf-to-megatron", help="HF folder (safetensors, classic or transformers-v5 fused experts) -> Megatron.",
        description="Convert an HF folder into a Megatron-LM checkpoint root (release/ and its tracker file) that "
                    "this trainer and Megatron-LM load at any layout.",
    )
    to_megatron.add_argument("--hf-dir", required=True, help="HF model folder (config.json + *.safetensors).")
    to_megatron.add_argument("--output", required=True, help="Checkpoint root to create.")
    to_megatron.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                             help="dtype of the stored weights. Default: the dtype of the HF tensors (bf16 for "
                                  "Mixtral releases).")
    to_megatron.add_argument("--overwrite", action="store_true", help="Replace an existing --output.")
    to_megatron.add_argument("--verify", action="store_true",
                             help="Afterwards, run transformers and our model (TP1, from the written checkpoint) "
                                  "on the same tokens and print the max logit difference. Needs transformers and "
                                  "the whole model in host memory.")

    to_hf = commands.add_parser(
        "megatron-to-hf", help="Megatron checkpoint (converted, trained, or Megatron-LM's; any layout) -> HF folder.",
        description="Export a checkpoint's weights to an HF folder: safetensors shards with "
                    "model.safetensors.index.json, config.json, tokenizer files and generation_config.json. "
                    "Experts in the classic block_sparse_moe.experts.E.w1/w2/w3 layout.",
    )
    to_hf.add_argument("--load", required=True,
                       help="Checkpoint root (converted output or training save folder) or checkpoint folder.")
    to_hf.add_argument("--hf-config", default=None,
                       help="For a checkpoint Megatron-LM wrote: the HF folder (or config.json) of its model, "
                            "checked against the checkpoint's stored arguments; its tokenizer files are copied.")
    to_hf.add_argument("--output", required=True, help="HF folder to create.")
    to_hf.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                       help="dtype of the written weights. Default: the stored dtype.")
    to_hf.add_argument("--max-shard-size", default="5GB",
                       help="Largest safetensors shard (5GB = 5e9 bytes; MB, GiB, ... also accepted); one shard "
                            "is held in memory while written. Default: 5GB.")
    to_hf.add_argument("--overwrite", action="store_true", help="Replace an existing --output.")
    to_hf.add_argument("--verify", action="store_true",
                       help="Afterwards, compare transformers on the written folder with our model on --load "
                            "(max logit difference). Needs transformers.")

    upgrade = commands.add_parser(
        "upgrade", help="A checkpoint of this project's first (per-layer) format -> today's format.",
        description="Rewrite a checkpoint written by orpo-megatron before its checkpoints followed Megatron-LM "
                    "(a converted folder, or a training save folder: its newest iteration) as a release "
                    "checkpoint root. Weights, config and tokenizer carry over; the old optimizer state does not.",
    )
    upgrade.add_argument("--load", required=True, help="Checkpoint of the first format.")
    upgrade.add_argument("--output", required=True, help="Checkpoint root to create.")
    upgrade.add_argument("--overwrite", action="store_true", help="Replace an existing --output.")
    return parser


def verify(hf_dir: str, load: str, hf_config: str | None = None, batch: int = 2, seq_length: int = 32,
           seed: int = 0) -> float:
    """Max |logit difference| over the true vocabulary between transformers and our model (TP1, fp32)."""
    import torch
    import transformers  # a test-time reference, imported only here

    from orpo_megatron.checkpoint import format as checkpoint_format
    from orpo_megatron.parallel import ParallelLayout
    from orpo_megatron.rank_model import build_for_rank

    info = checkpoint_format.describe(load, hf_config)
    hf = info.hf
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reference = getattr(transformers, hf.architecture).from_pretrained(
        hf_dir, torch_dtype=torch.float32, attn_implementation="eager").to(device).eval()
    ours = build_for_rank(hf, ParallelLayout(), weights=info).chunks[0].eval()
    tokens = torch.randint(0, hf.vocab_size, (batch, seq_length), generator=torch.Generator().manual_seed(seed))
    tokens = tokens.to(device)
    positions = torch.arange(seq_length, device=device).expand(batch, seq_length)
    with torch.no_grad():
        ours_logits = ours(tokens, positions, attention_mask=None)[..., : hf.vocab_size].float()
        reference_logits = reference(tokens).logits.float()
    return (ours_logits - reference_logits).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*`load_state_dict` is deprecated.*")
    # Imported after parsing so that --help is instant.
    from orpo_megatron.checkpoint import conversion
    from orpo_megatron.errors import UserError

    try:
        if args.command == "hf-to-megatron":
            output = conversion.hf_to_megatron(args.hf_dir, args.output,
                                               conversion.DTYPES[args.dtype] if args.dtype else None, args.overwrite)
            print(f"wrote {output}")
            if args.verify:
                print(f"verify: max |logit difference| over the true vocabulary = {verify(args.hf_dir, output):.3e}")
        elif args.command == "megatron-to-hf":
            output = conversion.megatron_to_hf(
                args.load, args.output, conversion.DTYPES[args.dtype] if args.dtype else None,
                conversion.parse_size(args.max_shard_size), args.overwrite, hf_config=args.hf_config,
            )
            print(f"wrote {output}")
            if args.verify:
                difference = verify(output, args.load, args.hf_config)
                print(f"verify: max |logit difference| over the true vocabulary = {difference:.3e}")
        else:
            print(f"wrote {conversion.upgrade(args.load, args.output, args.overwrite)}")
    except UserError as err:
        print(f"convert_hf.py {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
