"""Packing: real-token fraction and real tokens/s, packed vs `--no-packing`, on a capybara-like length mix.

Length mix (ASSUMED, not measured): the capybara-like pairs of `orpo_megatron/planning/workload.py`, the same ones the
step-time prediction (`tools/estimate_memory.py`) runs on; prompt cut to 1792 tokens and each completion to 2048 -
prompt (`--max-length 2048 --max-prompt-length 1792`); seed 0. The script prints the means it drew.

Part 1, arithmetic at full scale (no model): one epoch of the recipe's 6,932 such pairs through the data layer
and the pipeline's shape rules (`TrainPairIterator`, `schedule_groups`), every DP rank, micro-batch 1 pair, 32 pairs
per step, sequence parallelism on: real tokens / positions computed, for the micro-batch structures of
`examples/orpo_mixtral_8x22b.sh`: its default (4 nodes, TP8 PP4 DP1), its 8-node alternative (TP8 EP8 DP8), the
layout it had when packing was built (TP4 EP4 DP4), and pipelined variants.

Part 2, measured on CPU: the trainer (`python -m orpo_megatron.train`) at EP2 (2 processes, DP2) on a tiny
Mixtral-shaped model (vocabulary 32000, hidden 256, FFN 896, 4 layers, 8 experts top-2, 8/2 heads), the same mix
with every length divided by 8 (`--max-length 256`), 16 pairs per step in micro-batches of 2, packed and with
`--no-packing`, then packed at PP2 (DP1). Real tokens/s is the trainer's `tokens_per_second` (real tokens only),
the median over the steps after the first; the real-token fraction is the trainer's `real_token_fraction`.

    python benchmarks/packing.py                  # both parts (a few minutes on 2 CPU cores)
    python benchmarks/packing.py --skip-measure   # part 1 only
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from orpo_megatron.planning import workload  # noqa: E402
from orpo_megatron.data.batching import BatchLayout, TrainPairIterator, batch_layout  # noqa: E402
from orpo_megatron.parallel import ParallelLayout  # noqa: E402
from orpo_megatron.schedule import schedule_groups  # noqa: E402


def capybara_like_lengths(num_pairs: int, scale: int = 1) -> np.ndarray:
    """[num_pairs, 3] prompt, chosen, rejected tokens of `workload.capybara_like_pairs`, lengths divided by
    `scale` (limits 2048 and 1792 too)."""
    pairs = workload.capybara_like_pairs(num_pairs, max_length=2048 // scale, max_prompt_length=1792 // scale,
                                         scale=scale)
    return np.stack([pairs.prompt, pairs.chosen, pairs.rejected], axis=1)


def token_columns(lengths: np.ndarray, vocab: int = 600, seed: int = 1) -> dict[str, list]:
    """Pairs of random token ids with these lengths (BOS first, EOS last), as the data layer stores them."""
    rng = np.random.default_rng(seed)

    def ids(count: int, first: list[int], last: list[int]) -> list[int]:
        return first + rng.integers(3, vocab, max(0, count - len(first) - len(last))).tolist() + last

    return {"row_index": list(range(len(lengths))),
            "prompt_input_ids": [ids(int(p), [1], []) for p, _, _ in lengths],
            "chosen_input_ids": [ids(int(c), [], [2]) for _, c, _ in lengths],
            "rejected_input_ids": [ids(int(r), [], [2]) for _, _, r in lengths]}


def epoch_fraction(pairs, layout: BatchLayout, dp: int, pp: int, micro_batch_size: int = 1,
                   global_batch_size: int = 32) -> tuple[float, float]:
    """(real-token fraction, micro-batches per rank per step) over one epoch, all DP ranks."""
    iterators = [TrainPairIterator(pairs, global_batch_size, micro_batch_size, rank, dp, 0, 2, layout)
                 for rank in range(dp)]
    real = positions = micro_batches = 0
    for _ in range(iterators[0].steps_per_epoch):
        for iterator in iterators:
            step = next(iterator).micro_batches
            computed = [b for group in schedule_groups(step, pipelined=pp > 1) for b in group]
            real += sum(b.num_real_tokens for b in computed)
            positions += sum(b.num_positions for b in computed)
            micro_batches += len(computed)
    return real / positions, micro_batches / (dp * iterators[0].steps_per_epoch)


def arithmetic() -> None:
    import datasets

    lengths = capybara_like_lengths(workload.RECIPE_PAIRS)
    pair_tokens = 2 * lengths[:, 0] + lengths[:, 1] + lengths[:, 2]
    longer = lengths[:, 0] + lengths[:, 1:].max(axis=1)
    print(f"length mix: {len(lengths)} pairs, mean prompt {lengths[:, 0].mean():.0f}, chosen {lengths[:, 1].mean():.0f}, "
          f"rejected {lengths[:, 2].mean():.0f} tokens; real tokens per pair {pair_tokens.mean():.0f}; longer "
          f"sequence p50/p90/p99 {'/'.join(f'{v:.0f}' for v in np.percentile(longer, [50, 90, 99]))}")
    pairs = datasets.Dataset.from_dict(token_columns(lengths))
    print("\nPart 1: 8x22B micro-batch structures (micro-batch 1, 32 pairs per step, SP on), one epoch")
    print(f"  {'layout':58s} {'real-token fraction':>20s} {'micro-batches/rank':>19s}")
    cases = [  # name, packing, --packed-length, TP, DP, PP, FP8
        ("TP4 DP4 PP1 --no-packing (rows padded to the rank's step)", False, None, 4, 4, 1, False),
        ("TP4 DP4 PP1 packed: one row per micro-batch (default)", True, None, 4, 4, 1, False),
        ("TP4 DP4 PP1 packed, FP8", True, None, 4, 4, 1, True),
        ("TP4 DP2 PP2 --no-packing", False, None, 4, 2, 2, False),
        ("TP4 DP2 PP2 packed: rows of the longest pair (default)", True, None, 4, 2, 2, False),
        ("TP4 DP2 PP2 packed: --packed-length 4096", True, 4096, 4, 2, 2, False),
        ("TP8 DP8 PP1 packed (8 nodes, the script's alternative)", True, None, 8, 8, 1, False),
        ("TP8 DP1 PP4 --no-packing", False, None, 8, 1, 4, False),
        ("TP8 DP1 PP4 packed (4 nodes, the script's default)", True, None, 8, 1, 4, False),
    ]
    for name, packing, packed_length, tp, dp, pp, fp8 in cases:
        layout = batch_layout(packing, packed_length, ParallelLayout(world_size=tp * pp * dp, tensor_model_parallel_size=tp,
                                                             pipeline_model_parallel_size=pp, sequence_parallel=tp > 1), fp8)
        fraction, per_rank = epoch_fraction(pairs, layout, dp, pp)
        print(f"  {name:58s} {fraction:20.1%} {per_rank:19.2f}")


def measure(steps: int) -> None:
    from benchmarks.model import BENCH_MIXTRAL_OVERRIDES
    from orpo_megatron import tiny_model

    with tempfile.TemporaryDirectory(prefix="packing_bench_") as tmp:
        hf_dir = tiny_model.write_tiny_model(os.path.join(tmp, "hf"), seed=7,
                                             config_overrides=BENCH_MIXTRAL_OVERRIDES)
        checkpoint = os.path.join(tmp, "ckpt")
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_hf.py"), "hf-to-megatron", "--hf-dir",
                        hf_dir, "--output", checkpoint], check=True, capture_output=True, cwd=REPO)
        lengths = capybara_like_lengths(512, scale=8)
        columns = token_columns(lengths)
        data = os.path.join(tmp, "pairs.jsonl")
        with open(data, "w", encoding="utf-8") as f:
            for i in range(len(lengths)):
                f.write(json.dumps({key: columns[key][i] for key in columns if key != "row_index"}) + "\n")
        print(f"\nPart 2: measured on CPU, tiny Mixtral-shaped model, lengths / 8 (mean real tokens per pair "
              f"{(2 * lengths[:, 0] + lengths[:, 1] + lengths[:, 2]).mean():.0f}), 16 pairs per step, "
              f"{steps} steps, median over steps 2..{steps}")
        print(f"  {'run':34s} {'real tokens/s':>14s} {'real-token fraction':>20s}")
        results = {}
        for name, flags in (("EP2 DP2 --no-packing", ["--expert-model-parallel-size", "2", "--no-packing"]),
                            ("EP2 DP2 packed", ["--expert-model-parallel-size", "2"]),
                            ("PP2 DP1 packed", ["--pipeline-model-parallel-size", "2"])):
            rows = train(checkpoint, data, os.path.join(tmp, name.replace(" ", "_")), flags, steps)[1:]
            results[name] = statistics.median(r["train/tokens_per_second"] for r in rows)
            fraction = statistics.median(r["train/real_token_fraction"] for r in rows)
            print(f"  {name:34s} {results[name]:14.0f} {fraction:20.1%}", flush=True)
        ratio = results["EP2 DP2 packed"] / results["EP2 DP2 --no-packing"]
        print(f"  packed / --no-packing real tokens/s at EP2: {ratio:.2f}x")


def train(checkpoint: str, data: str, save: str, flags: list[str], steps: int) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29613", "-m",
               "orpo_megatron.train", "--load", checkpoint, "--data-path", data, "--max-length", "256",
               "--max-prompt-length", "224", "--micro-batch-size", "2", "--global-batch-size", "16",
               "--train-iters", str(steps), "--lr", "1e-6", "--log-interval", "1", "--eval-fraction", "0",
               "--log-dir", save, "--data-cache-dir", os.path.join(save, "cache"), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(command, check=True, capture_output=True, cwd=REPO, env=env)
    with open(os.path.join(save, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if '"train/loss"' in line]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-measure", action="store_true", help="only the full-scale arithmetic (part 1)")
    parser.add_argument("--steps", type=int, default=6, help="training steps per measured run (default: 6)")
    args = parser.parse_args(argv)
    arithmetic()
    if not args.skip_measure:
        measure(args.steps)


if __name__ == "__main__":
    main()
