"""Tokenized pairs -> this DP rank's micro-batches: shuffled, sharded over data-parallel ranks, packed, resumable.

Owns the order in which pairs are seen and which pairs form each micro-batch; the tensors of a micro-batch and its
two layouts (packed, padded) are `micro_batch.py`'s, the bin-packing of fixed-length rows `packing.py`'s. It uses no
collectives: every DP rank builds the same order from the seed and takes its own share, and the counts that
normalize the loss over the whole global batch come from a table of pair lengths, the same on every rank.

Training order: epoch e visits the pairs in a permutation drawn from (seed, e). A global batch takes the next
`global_batch_size` pairs of it. An epoch ends when fewer than `global_batch_size` pairs are left: those are not
seen in that epoch (a different few each epoch). The state is (epoch, pairs consumed in the epoch), so a run
resumed from a checkpoint sees exactly the pairs it would have seen, even with another DP size; it also holds a
fingerprint of the pairs' token ids, so a resume on other data (or other tokenization) of the same size is refused
unless the caller accepts it.
How a global batch becomes micro-batches (`BatchLayout`):
- padded or packed per micro-batch: DP rank r takes the r-th contiguous 1/dp_size of the global batch, cut into
  micro-batches of `micro_batch_size` pairs; packed, each micro-batch is one row of its own length.
- fixed-length rows (pipelining, or `--packed-length`): the whole global batch is packed into rows of
  `packed_length` tokens (`packing.pack_rows`), the number of rows a multiple of the DP size (and of
  `rows_per_rank_multiple` per rank); DP rank r takes the r-th contiguous share of the rows, one micro-batch each.

Evaluation: the held-out pairs in source order, cut to a multiple of dp_size (the remainder, at most dp_size - 1
pairs, is reported as `dropped_pairs`, never silently), each rank a contiguous equal share in micro-batches of
`micro_batch_size`, the last one smaller (with the interleaved schedule, a multiple of PP micro-batches: of
near-equal sizes when packed; of one size with `--no-packing`, whose micro-batches must share one shape, the
pairs left over reported in `dropped_pairs` too). Every rank has the same number of
micro-batches, so collectives inside the forward (expert parallelism spans DP ranks) stay matched.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import random
from typing import TYPE_CHECKING

import datasets
import numpy as np
import pyarrow.compute as pc

from orpo_megatron.data.micro_batch import (
    MicroBatch,
    packed_micro_batch,
    padded_micro_batch,
    pair_target_counts,
    round_up,
)
from orpo_megatron.data.packing import pack_rows
from orpo_megatron.errors import ConfigError, DataError

if TYPE_CHECKING:  # the data layer reads the layout's sizes; it needs nothing else of the trainer's modules
    from orpo_megatron.parallel import ParallelLayout

PAIR_COLUMNS = ["row_index", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How pairs become micro-batches.

    packing: one padding-free row per micro-batch (default) instead of 2B padded rows (`--no-packing`).
    fixed_length_rows: pack each global batch into rows of one length (needed with pipelining).
    packed_length: that length; None: the longest pair of the training split, rounded up to `length_multiple`.
    length_multiple: every row's length is a multiple of it (sequence parallelism, FP8).
    rows_per_rank_multiple: with fixed-length rows, the rows of a rank are a multiple of it (PP with VP).
    """

    packing: bool = True
    fixed_length_rows: bool = False
    packed_length: int | None = None
    length_multiple: int = 1
    rows_per_rank_multiple: int = 1

    def __post_init__(self):
        if not self.packing and (self.fixed_length_rows or self.packed_length is not None):
            raise ConfigError("--packed-length and pipelining pack rows; they cannot be combined with --no-packing")
        if self.packed_length is not None and (self.packed_length < 2 or self.packed_length % self.length_multiple):
            raise ConfigError(f"--packed-length {self.packed_length} must be a positive multiple of "
                             f"{self.length_multiple} (sequence parallelism and FP8 need row lengths divisible by it)")

    def fixed_row_length(self, longest_pair_tokens: int) -> int:
        """Tokens per fixed-length row: `packed_length`, or the longest pair (prompt + chosen + prompt + rejected)
        rounded up to `length_multiple`."""
        return self.packed_length or round_up(longest_pair_tokens, self.length_multiple)

    def build(self, pairs: dict[str, list], pad_id: int, length: int | None = None) -> MicroBatch:
        if self.packing:
            return packed_micro_batch(pairs, pad_id, self.length_multiple, length)
        return padded_micro_batch(pairs, pad_id, self.length_multiple)


def length_multiple(tensor_model_parallel_size: int, sequence_parallel: bool, fp8: bool) -> int:
    """What every micro-batch row length must be a multiple of.

    Sequence parallelism splits the positions over TP ranks. Transformer Engine's FP8 GEMMs need the rows they
    multiply (positions of a TP rank, times rows) to be a multiple of 8; 16 per TP rank also covers FP8 recipes
    that tile by 16.
    """
    per_rank = 16 if fp8 else 1
    return per_rank * (tensor_model_parallel_size if sequence_parallel else 1)


def batch_layout(packing: bool, packed_length: int | None, layout: ParallelLayout, fp8: bool) -> BatchLayout:
    """The micro-batch layout a parallel layout needs (`--no-packing`, `--packed-length`).

    With pipelining a step's micro-batches are rows of one length; the interleaved schedule also needs a
    multiple of PP micro-batches per rank.
    """
    pp = layout.pipeline_model_parallel_size
    return BatchLayout(
        packing=packing, fixed_length_rows=packing and (pp > 1 or packed_length is not None),
        packed_length=packed_length,
        length_multiple=length_multiple(layout.tensor_model_parallel_size, layout.sequence_parallel, fp8),
        rows_per_rank_multiple=pp if layout.virtual_pipeline_model_parallel_size else 1)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """This DP rank's micro-batches of one optimizer step, and the global batch's counts (all DP ranks)."""

    micro_batches: list[MicroBatch]
    num_pairs: int
    num_chosen_real_targets: int
    num_chosen_completion_targets: int

    def num_nll_targets(self, nll_on_prompt: bool) -> int:
        return self.num_chosen_real_targets if nll_on_prompt else self.num_chosen_completion_targets


def pair_length_table(pairs: datasets.Dataset) -> np.ndarray:
    """[num_pairs, 3] int64: prompt, chosen and rejected tokens of every pair, read from Arrow (no Python lists)."""
    table = pairs.with_format("arrow")[:]
    return np.stack([pc.list_value_length(table[column]).to_numpy(zero_copy_only=False).astype(np.int64)
                     for column in PAIR_COLUMNS[1:]], axis=1)


def pairs_fingerprint(pairs: datasets.Dataset, lengths: np.ndarray) -> str:
    """sha256 of every pair's prompt, chosen and rejected token ids in order (`lengths`: `pair_length_table`)."""
    digest = hashlib.sha256(lengths.tobytes())
    for batch in pairs.with_format("arrow").iter(batch_size=8192):
        for column in PAIR_COLUMNS[1:]:
            ids = pc.list_flatten(batch[column]).to_numpy(zero_copy_only=False).astype(np.int64)
            digest.update(ids.tobytes())
    return digest.hexdigest()[:32]


def epoch_permutation(num_pairs: int, seed: int, epoch: int) -> list[int]:
    """The visiting order of epoch `epoch`; Python's string-seeded Mersenne Twister is stable across versions."""
    order = list(range(num_pairs))
    random.Random(f"orpo-megatron-pairs-{seed}-{epoch}").shuffle(order)
    return order


class TrainPairIterator:
    """Infinite iterator over optimizer steps (`TrainStep`)."""

    def __init__(self, pairs: datasets.Dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, pad_id: int, layout: BatchLayout = BatchLayout()):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if micro_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
            raise ConfigError(f"--global-batch-size {global_batch_size} must be a multiple of --micro-batch-size "
                             f"{micro_batch_size} x data-parallel size {dp_size}")
        if pairs.num_rows < global_batch_size:
            raise ConfigError(f"the training split has {pairs.num_rows} pairs, fewer than one global batch "
                             f"({global_batch_size}); lower --global-batch-size or add data")
        self.pairs = pairs.select_columns(PAIR_COLUMNS)
        self.lengths = pair_length_table(self.pairs)
        self.num_pairs = pairs.num_rows
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.pad_id = pad_id
        self.layout = layout
        self.packed_length = self._resolve_packed_length() if layout.fixed_length_rows else None
        self.epoch = 0
        self.pairs_in_epoch = 0  # global position inside this epoch's permutation
        self.consumed_pairs = 0  # over all ranks since the start of training
        self._order: list[int] | None = None

    def _resolve_packed_length(self) -> int:
        """--packed-length, or the longest pair rounded up; every pair must fit and every rank get its rows."""
        tokens = 2 * self.lengths[:, 0] + self.lengths[:, 1] + self.lengths[:, 2]
        longest = int(np.argmax(tokens))
        length = self.layout.fixed_row_length(int(tokens[longest]))
        if tokens[longest] > length:
            row = self.pairs[longest]["row_index"]
            raise ConfigError(f"--packed-length {length} is shorter than the training pair of source row {row} "
                             f"({int(tokens[longest])} tokens: prompt + chosen + prompt + rejected); raise it")
        rows_multiple = self.dp_size * self.layout.rows_per_rank_multiple
        if self.global_batch_size < rows_multiple:
            raise ConfigError(f"--global-batch-size {self.global_batch_size} is smaller than the {rows_multiple} "
                             f"packed rows a step needs at least (data-parallel size {self.dp_size} x "
                             f"{self.layout.rows_per_rank_multiple} micro-batches per rank)")
        return length

    @property
    def steps_per_epoch(self) -> int:
        return self.num_pairs // self.global_batch_size

    def __iter__(self) -> TrainPairIterator:
        return self

    def __next__(self) -> TrainStep:
        if self.pairs_in_epoch + self.global_batch_size > self.num_pairs:
            self.epoch += 1
            self.pairs_in_epoch = 0
            self._order = None
        if self._order is None:
            self._order = epoch_permutation(self.num_pairs, self.seed, self.epoch)
        global_batch = self._order[self.pairs_in_epoch:self.pairs_in_epoch + self.global_batch_size]
        self.pairs_in_epoch += self.global_batch_size
        self.consumed_pairs += self.global_batch_size
        lengths = self.lengths[global_batch]
        if self.packed_length is not None:
            tokens = (2 * lengths[:, 0] + lengths[:, 1] + lengths[:, 2]).tolist()
            rows = pack_rows(tokens, self.packed_length, self.dp_size * self.layout.rows_per_rank_multiple)
            per_rank = len(rows) // self.dp_size
            mine = rows[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
            groups = [[global_batch[i] for i in row] for row in mine]
        else:
            per_rank = self.global_batch_size // self.dp_size
            mine = global_batch[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
            groups = [mine[start:start + self.micro_batch_size] for start in range(0, per_rank, self.micro_batch_size)]
        real, completion = pair_target_counts(lengths[:, 0], lengths[:, 1])
        return TrainStep(
            micro_batches=[self.layout.build(self.pairs[group], self.pad_id, self.packed_length) for group in groups],
            num_pairs=self.global_batch_size, num_chosen_real_targets=int(real.sum()),
            num_chosen_completion_targets=int(completion.sum()))

    @functools.cached_property
    def fingerprint(self) -> str:
        return pairs_fingerprint(self.pairs, self.lengths)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pairs_in_epoch": self.pairs_in_epoch, "consumed_pairs": self.consumed_pairs,
                "seed": self.seed, "num_pairs": self.num_pairs, "pairs_fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict, allow_data_change: bool = False) -> str | None:
        """Continue at the saved position. Returns a warning when the pairs differ from the saved run's and
        `allow_data_change` accepts that; raises otherwise."""
        for key in ("seed", "num_pairs"):
            if state[key] != getattr(self, key):
                raise DataError(f"cannot resume the data order: the checkpoint's {key} is {state[key]}, this run's "
                                f"is {getattr(self, key)} (same --seed and the same training pairs are needed)")
        warning = None
        saved = state.get("pairs_fingerprint")  # absent in checkpoints written before it was stored
        if saved is not None and saved != self.fingerprint:
            change = (f"the {self.num_pairs} training pairs differ from those the checkpoint was trained on "
                      f"(token-id fingerprint {saved} then, {self.fingerprint} now): the data, the tokenizer or a "
                      "tokenization flag changed")
            if not allow_data_change:
                raise DataError(f"cannot resume: {change}. Resume with the same data and flags, or pass "
                                "--allow-data-change to continue on these pairs from the saved position")
            warning = f"WARNING: {change}; continuing from the saved position on the new pairs (--allow-data-change)"
        self.epoch, self.pairs_in_epoch = state["epoch"], state["pairs_in_epoch"]
        self.consumed_pairs = state["consumed_pairs"]
        self._order = None
        return warning


class EvalPairs:
    """The held-out pairs of this DP rank as micro-batches (one row each when packed); iterate once per
    evaluation."""

    def __init__(self, pairs: datasets.Dataset, micro_batch_size: int, dp_rank: int, dp_size: int, pad_id: int,
                 layout: BatchLayout = BatchLayout()):
        if pairs.num_rows < dp_size:
            raise ConfigError(f"the evaluation split has {pairs.num_rows} pairs, fewer than the {dp_size} "
                             "data-parallel ranks; use a larger --eval-fraction/--eval-split")
        per_rank = pairs.num_rows // dp_size
        self.dropped_pairs = pairs.num_rows - per_rank * dp_size
        self.num_pairs = per_rank  # on this rank
        self.positions = list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
        self.pairs = pairs.select_columns(PAIR_COLUMNS)
        self.pad_id = pad_id
        # Fixed-length rows are a training-step packing; evaluation keeps one row per micro-batch.
        self.layout = dataclasses.replace(layout, fixed_length_rows=False, packed_length=None)
        count = math.ceil(per_rank / micro_batch_size)
        multiple = layout.rows_per_rank_multiple
        if multiple > 1 and not layout.packing:
            # The interleaved schedule runs a multiple of PP micro-batches of one shape per call, and padded
            # micro-batches of fewer pairs have fewer rows: equal micro-batches of up to micro_batch_size pairs,
            # as many pairs as that allows (then the largest micro-batches), the remaining pairs reported.
            evaluated, size = max((per_rank // size // multiple * multiple * size, size)
                                  for size in range(1, micro_batch_size + 1))
            if evaluated == 0:
                raise ConfigError(f"{per_rank} evaluation pairs per data-parallel rank cannot fill {multiple} "
                                 "micro-batches (the interleaved pipeline schedule with --no-packing needs a "
                                 "multiple of that many of one shape); evaluate more pairs")
            count = evaluated // size
            sizes = [size] * count
            self.num_pairs = evaluated
            self.dropped_pairs += (per_rank - self.num_pairs) * dp_size
        elif count % multiple:
            # The interleaved schedule needs a multiple of PP micro-batches: the same pairs, split more evenly.
            count = math.ceil(count / multiple) * multiple
            if count > per_rank:
                raise ConfigError(f"{per_rank} evaluation pairs per data-parallel rank cannot form a multiple of "
                                 f"{multiple} micro-batches (the interleaved pipeline schedule needs one); "
                                 "evaluate more pairs")
            sizes = [per_rank // count + (i < per_rank % count) for i in range(count)]
        else:
            sizes = [min(micro_batch_size, per_rank - start) for start in range(0, per_rank, micro_batch_size)]
        self.starts = [sum(sizes[:i]) for i in range(count + 1)]

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __iter__(self):
        for start, end in zip(self.starts, self.starts[1:]):
            yield self.layout.build(self.pairs[self.positions[start:end]], self.pad_id)
