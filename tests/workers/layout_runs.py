"""The command line of the workers that measure each named layout in turn and write one JSON list per rank."""
import argparse
import json
import os

import torch.distributed as dist

from orpo_megatron import optimizer as optimizers, parallel


def optimizer_flags(flags: list[str], lr: float = 1e-4) -> argparse.Namespace:
    """The trainer's optimizer flags parsed from `flags`, with its learning-rate schedule's flags set."""
    parser = argparse.ArgumentParser()
    optimizers.add_optimizer_args(parser)
    args = parser.parse_args(flags)
    args.lr, args.min_lr = lr, 0.0
    return args


def measure_layouts(layouts: dict, measure) -> None:
    """`--hf-dir`, `--out`, `--layouts` (default: all of `layouts`); `measure(hf_dir, name)` gives each layout's
    record, written as a list to `rank<r>.json` in `--out`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layouts", nargs="+", default=list(layouts))
    args = parser.parse_args()
    results = [measure(args.hf_dir, name) for name in args.layouts]
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w", encoding="utf-8") as f:
        json.dump(results, f)
    parallel.destroy()
