"""The command lines of the workers that run several named layouts in turn in one launch (a launch costs seconds of
imports per process)."""
import argparse
import json
import os
import sys

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe import moe_utils

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


def run_each_layout(parser: argparse.ArgumentParser, run_layout) -> None:
    """Adds `--layouts` (JSON {name: [flags of that layout]}) to `parser`, which has `--out`; runs
    `run_layout(args)` for each layout in turn in this launch, with the command line's flags, then the layout's, and `--out <out>/<name>`. Megatron's parallel state and the MoE
    loss tracker (which holds its groups) are dropped after each layout."""
    parser.add_argument("--layouts", type=json.loads, required=True,
                        help='JSON {"name": [flags of that layout], ...}, run in turn; output in --out/<name>/')
    common = parser.parse_args()
    for name, flags in common.layouts.items():
        out = os.path.join(common.out, name)
        os.makedirs(out, exist_ok=True)
        run_layout(parser.parse_args(sys.argv[1:] + flags + ["--out", out]))
        parallel_state.destroy_model_parallel()
        moe_utils.get_moe_layer_wise_logging_tracker().clear()
    parallel.destroy()
