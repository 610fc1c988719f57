"""The recipe's training steps as micro-batch shapes: capybara-like pair lengths, batched as the trainer batches.

Owns the workload the step-time model (`step_time.py`) is evaluated on. The pairs' lengths are ASSUMED, not
measured (no tokenized capybara at hand): the distribution of ../shared/reference/packing-facts.md, lognormal
prompt (median 500 tokens, sigma 0.8), chosen (330, 0.6) and rejected (280, 0.7, correlation 0.3 with chosen, which
reproduces its longer-row percentiles) completions, the prompt cut to 1792 and each completion to 2048 minus the
prompt (the recipe's max_prompt_length / max_length). Drawn with seed 0 this gives means of about 644 / 380 / 342
tokens, 2,009 real tokens per pair (the reference's own draw: 663 / 384 / 346, 2,055).

A step takes the next `global_batch_size` pairs of the trainer's epoch order (`data.batching.epoch_permutation`),
each DP rank a contiguous 1/DP of them, as `micro_batch_size`-pair micro-batches; then
- padded (`--no-packing`): each micro-batch holds 2 x MBS rows, and every micro-batch of a rank is padded to the
  rank's longest row in the step, rounded up to the pad multiple (TP under sequence parallelism, 16 with FP8);
- packed without pipelining: each micro-batch is one row of its pairs' sequences, rounded up to the pad multiple;
- packed with pipelining: the step's pairs go whole, first-fit-decreasing, into rows of `packed_length` tokens,
  with rows added until every DP rank has as many; each row is a micro-batch.
Packing's exact row assignment is the trainer's (issue 10); this is the arithmetic of packing-facts.md.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from orpo_megatron.data.batching import epoch_permutation

# alignment-handbook zephyr-orpo-141b: 6932 training pairs (all_results.json), 3 epochs, 32 pairs per step,
# 4771.96 s on 32 H100 (1.33 h): 6932 * 3 / 4771.96 / 32 = 0.136 pairs/s/GPU.
RECIPE_PAIRS, RECIPE_EPOCHS, RECIPE_GLOBAL_BATCH = 6932, 3, 32
HANDBOOK_SECONDS, HANDBOOK_GPUS = 4771.96, 32


@dataclasses.dataclass(frozen=True)
class PairLengths:
    prompt: np.ndarray
    chosen: np.ndarray  # completion lengths
    rejected: np.ndarray

    def __len__(self) -> int:
        return len(self.prompt)


def capybara_like_pairs(num_pairs: int = RECIPE_PAIRS, seed: int = 0, max_length: int = 2048,
                        max_prompt_length: int = 1792) -> PairLengths:
    """Token lengths of `num_pairs` pairs drawn from the assumed distribution (module docstring)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((num_pairs, 3))
    correlated = 0.3 * z[:, 1] + math.sqrt(1 - 0.3**2) * z[:, 2]

    def lognormal(median: float, sigma: float, normal: np.ndarray) -> np.ndarray:
        return np.maximum(1, np.round(np.exp(math.log(median) + sigma * normal))).astype(np.int64)

    prompt = np.minimum(lognormal(500, 0.8, z[:, 0]), max_prompt_length)
    room = max_length - prompt
    return PairLengths(prompt, np.minimum(lognormal(330, 0.6, z[:, 1]), room),
                       np.minimum(lognormal(280, 0.7, correlated), room))


@dataclasses.dataclass(frozen=True)
class StepShapes:
    """Per step, DP rank and micro-batch ([steps, dp, micro-batches]; `valid` marks micro-batches that exist):
    positions computed (rows x length), real tokens, and the attention products' positions over whole rows and
    over each sequence alone (see `step_work.MicroBatchShape.attention_positions`)."""

    positions: np.ndarray
    real_tokens: np.ndarray
    attention_rows: np.ndarray
    attention_sequences: np.ndarray
    valid: np.ndarray

    @property
    def real_token_fraction(self) -> float:
        return float(self.real_tokens.sum() / self.positions.sum())


def _round_up(values, multiple: int):
    return -(-values // multiple) * multiple


def recipe_steps(pairs: PairLengths, global_batch_size: int, dp: int, micro_batch_size: int = 1,
                 packed: bool = True, pipelined: bool = False, pad_multiple: int = 1,
                 packed_length: int | None = None, seed: int = 42, epochs: int = 1) -> StepShapes:
    """The micro-batch shapes of `epochs` epochs of training (steps drop an epoch's last partial batch, as the
    trainer does); `seed` orders the pairs as the trainer's `--seed`."""
    if global_batch_size % (micro_batch_size * dp):
        raise ValueError(f"global batch {global_batch_size} is not a multiple of micro-batch {micro_batch_size} "
                         f"x DP {dp}")
    steps_per_epoch = len(pairs) // global_batch_size
    per_rank = global_batch_size // dp
    chosen_rows, rejected_rows = pairs.prompt + pairs.chosen, pairs.prompt + pairs.rejected
    steps = []
    for epoch in range(epochs):
        order = np.array(epoch_permutation(len(pairs), seed, epoch))
        steps += [order[s * global_batch_size:(s + 1) * global_batch_size].reshape(dp, per_rank)
                  for s in range(steps_per_epoch)]
    batch = np.stack(steps)  # [steps, dp, pairs per rank]
    if packed and pipelined:
        return _packed_rows(batch, chosen_rows, rejected_rows, packed_length or 2 * int(chosen_rows.max()), dp)
    mb = batch.reshape(*batch.shape[:2], per_rank // micro_batch_size, micro_batch_size)
    rows = np.concatenate([chosen_rows[mb], rejected_rows[mb]], axis=-1)  # [steps, dp, mbs, 2 * MBS]
    real = rows.sum(-1)
    squares = (rows.astype(np.float64) ** 2).sum(-1)
    if packed:
        length = _round_up(real, pad_multiple)
        return StepShapes(length, real, length.astype(np.float64) ** 2, squares, np.ones_like(real, dtype=bool))
    longest = _round_up(rows.max(-1), pad_multiple).max(-1, keepdims=True)  # the rank's micro-batches share it
    length = np.broadcast_to(longest, real.shape)
    count = rows.shape[-1]
    return StepShapes(count * length, real, count * length.astype(np.float64) ** 2, squares,
                      np.ones_like(real, dtype=bool))


def _packed_rows(batch: np.ndarray, chosen_rows, rejected_rows, length: int, dp: int) -> StepShapes:
    """First-fit-decreasing of each step's pairs into rows of `length`; rows padded to a multiple of DP."""
    per_step = []
    for step in batch.reshape(batch.shape[0], -1):
        sizes = sorted(((int(chosen_rows[p] + rejected_rows[p]), p) for p in step), reverse=True)
        bins: list[list] = []  # [free, real, squares]
        for size, p in sizes:
            target = next((b for b in bins if b[0] >= size), None)
            if target is None:
                target = [length, 0, 0.0]
                bins.append(target)
            target[0] -= size
            target[1] += size
            target[2] += float(chosen_rows[p]) ** 2 + float(rejected_rows[p]) ** 2
        bins += [[length, 0, 0.0]] * (-len(bins) % dp)
        per_step.append(bins)
    rows_per_rank = max(len(bins) // dp for bins in per_step)
    shape = (len(per_step), dp, rows_per_rank)
    real, squares, valid = np.zeros(shape, np.int64), np.zeros(shape), np.zeros(shape, bool)
    for s, bins in enumerate(per_step):
        for i, (_, tokens, sq) in enumerate(bins):  # dealt round-robin over the DP ranks
            real[s, i % dp, i // dp], squares[s, i % dp, i // dp], valid[s, i % dp, i // dp] = tokens, sq, True
    positions = np.where(valid, length, 0)
    return StepShapes(positions, real, positions.astype(np.float64) ** 2, squares, valid)
