"""The recipe's training steps as micro-batch shapes: capybara-like pair lengths, batched as the trainer batches;
or pretraining-style steps of fixed-length sequences (`pretraining_steps`), the form published runs take.

Owns the workload the step-time model (`step_time.py`) is evaluated on. The pairs' lengths are ASSUMED, not
measured (no tokenized capybara at hand): the distribution of ../shared/reference/packing-facts.md, lognormal
prompt (median 500 tokens, sigma 0.8), chosen (330, 0.6) and rejected (280, 0.7, correlation 0.3 with chosen, which
reproduces its longer-row percentiles) completions, the prompt cut to 1792 and each completion to 2048 minus the
prompt (the recipe's max_prompt_length / max_length). Drawn with seed 0 this gives means of about 644 / 380 / 342
tokens, 2,009 real tokens per pair (the reference's own draw: 663 / 384 / 346, 2,055).

A step takes the next `global_batch_size` pairs of the trainer's epoch order and cuts them into micro-batches as
the trainer's `data.batching.BatchLayout` says (the same rules, on lengths instead of tokens):
- padded (`--no-packing`): each DP rank a contiguous 1/DP of the pairs, 2 x MBS rows per micro-batch, every
  micro-batch of a rank padded to the rank's longest row in the step (the schedule runs them as one shape),
  rounded up to the length multiple (TP under sequence parallelism, x16 with FP8);
- packed: the same micro-batches, each one row of its pairs' sequences rounded up to the length multiple;
- fixed-length rows (pipelining, or `--packed-length`): the step's pairs packed whole into rows of the packed
  length (`data.packing.pack_rows`; default: the longest pair, rounded up), each DP rank a contiguous share of
  the rows, one micro-batch each.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from orpo_megatron.data.batching import BatchLayout, epoch_permutation
from orpo_megatron.data.micro_batch import round_up
from orpo_megatron.data.packing import pack_rows
from orpo_megatron.errors import ConfigError

# alignment-handbook zephyr-orpo-141b: 6932 training pairs (all_results.json), 3 epochs, 32 pairs per step,
# 4771.96 s on 32 H100 (1.33 h): 6932 * 3 / 4771.96 / 32 = 0.136 pairs/s/GPU.
RECIPE_PAIRS, RECIPE_EPOCHS, RECIPE_GLOBAL_BATCH = 6932, 3, 32
HANDBOOK_SECONDS, HANDBOOK_GPUS = 4771.96, 32


@dataclasses.dataclass(frozen=True, eq=False)  # compared (and hashed) by identity: arrays inside
class PairLengths:
    prompt: np.ndarray
    chosen: np.ndarray  # completion lengths
    rejected: np.ndarray

    def __len__(self) -> int:
        return len(self.prompt)


def capybara_like_pairs(num_pairs: int = RECIPE_PAIRS, seed: int = 0, max_length: int = 2048,
                        max_prompt_length: int = 1792, scale: int = 1) -> PairLengths:
    """Token lengths of `num_pairs` pairs drawn from the assumed distribution (module docstring); with `scale`,
    every drawn length divided by it (for small CPU models; the length limits are not scaled)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((num_pairs, 3))
    correlated = 0.3 * z[:, 1] + math.sqrt(1 - 0.3**2) * z[:, 2]

    def lognormal(median: float, sigma: float, normal: np.ndarray) -> np.ndarray:
        return np.maximum(1, np.round(np.exp(math.log(median / scale) + sigma * normal))).astype(np.int64)

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


def packed_length(pairs: PairLengths, batch: BatchLayout) -> int:
    """Tokens per fixed-length row, as the trainer chooses it for these pairs."""
    return batch.fixed_row_length(int((2 * pairs.prompt + pairs.chosen + pairs.rejected).max()))


def recipe_steps(pairs: PairLengths, global_batch_size: int, dp: int, micro_batch_size: int = 1,
                 batch: BatchLayout = BatchLayout(), seed: int = 42, epochs: int = 1) -> StepShapes:
    """The micro-batch shapes of `epochs` epochs of training (steps drop an epoch's last partial batch, as the
    trainer does); `seed` orders the pairs as the trainer's `--seed`."""
    if global_batch_size % (micro_batch_size * dp):
        raise ConfigError(f"global batch {global_batch_size} is not a multiple of micro-batch {micro_batch_size} "
                         f"x DP {dp}")
    steps_per_epoch = len(pairs) // global_batch_size
    per_rank = global_batch_size // dp
    chosen_rows, rejected_rows = pairs.prompt + pairs.chosen, pairs.prompt + pairs.rejected
    steps = []
    for epoch in range(epochs):
        order = np.array(epoch_permutation(len(pairs), seed, epoch))
        steps += [order[s * global_batch_size:(s + 1) * global_batch_size].reshape(dp, per_rank)
                  for s in range(steps_per_epoch)]
    step_pairs = np.stack(steps)  # [steps, dp, pairs per rank]
    if batch.fixed_length_rows:
        return _fixed_length_rows(step_pairs, chosen_rows, rejected_rows, packed_length(pairs, batch), dp,
                                  dp * batch.rows_per_rank_multiple)
    mb = step_pairs.reshape(*step_pairs.shape[:2], per_rank // micro_batch_size, micro_batch_size)
    rows = np.concatenate([chosen_rows[mb], rejected_rows[mb]], axis=-1)  # [steps, dp, mbs, 2 * MBS]
    real = rows.sum(-1)
    squares = (rows.astype(np.float64) ** 2).sum(-1)
    if batch.packing:
        length = round_up(real, batch.length_multiple)
        return StepShapes(length, real, length.astype(np.float64) ** 2, squares, np.ones_like(real, dtype=bool))
    longest = round_up(rows.max(-1), batch.length_multiple).max(-1, keepdims=True)  # the rank's step shares it
    length = np.broadcast_to(longest, real.shape)
    count = rows.shape[-1]
    return StepShapes(count * length, real, count * length.astype(np.float64) ** 2, squares,
                      np.ones_like(real, dtype=bool))


def _fixed_length_rows(step_pairs: np.ndarray, chosen_rows, rejected_rows, length: int, dp: int,
                       rows_multiple: int) -> StepShapes:
    """Each step's pairs packed into rows of `length` (the trainer's `pack_rows`), a contiguous share per rank."""
    per_step = []  # per step and row: (real tokens, sum of squared sequence lengths)
    for pairs in step_pairs.reshape(step_pairs.shape[0], -1):
        tokens = chosen_rows[pairs] + rejected_rows[pairs]
        squared = chosen_rows[pairs].astype(np.float64) ** 2 + rejected_rows[pairs].astype(np.float64) ** 2
        rows = pack_rows(tokens.tolist(), length, rows_multiple)
        per_step.append([(int(tokens[row].sum()), float(squared[row].sum())) for row in rows])
    rows_per_rank = max(len(rows) // dp for rows in per_step)
    shape = (len(per_step), dp, rows_per_rank)
    real, squares, valid = np.zeros(shape, np.int64), np.zeros(shape), np.zeros(shape, bool)
    for s, rows in enumerate(per_step):
        share = len(rows) // dp  # DP rank r takes rows [r * share, (r + 1) * share)
        for i, (tokens, sq) in enumerate(rows):
            at = (s, i // share, i % share)
            real[at], squares[at], valid[at] = tokens, sq, True
    positions = np.where(valid, length, 0)
    return StepShapes(positions, real, positions.astype(np.float64) ** 2, squares, valid)


def pretraining_steps(global_batch_size: int, dp: int, micro_batch_size: int, seq_length: int) -> StepShapes:
    """One step of pretraining-style training: `global_batch_size` sequences of exactly `seq_length` real tokens,
    `micro_batch_size` sequences per micro-batch, each DP rank an equal share (every step the same)."""
    if global_batch_size % (micro_batch_size * dp):
        raise ConfigError(f"global batch {global_batch_size} is not a multiple of micro-batch {micro_batch_size} "
                         f"x DP {dp}")
    shape = (1, dp, global_batch_size // (micro_batch_size * dp))
    positions = np.full(shape, micro_batch_size * seq_length, np.int64)
    squares = np.full(shape, micro_batch_size * float(seq_length) ** 2)
    return StepShapes(positions, positions.copy(), squares, squares.copy(), np.ones(shape, bool))
