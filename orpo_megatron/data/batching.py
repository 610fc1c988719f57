"""Tokenized pairs -> micro-batches for ORPO: shuffled, sharded over data-parallel ranks, padded, resumable.

Owns the order in which pairs are seen and the micro-batch tensors. It does not tokenize (`preprocess.py`) and uses
no collectives: every DP rank builds the same order from the seed and takes its own slice.

Micro-batch of B pairs (the contract with the objective), CPU tensors:
- `input_ids` Long [2B, S]: rows 0..B-1 chosen, B..2B-1 rejected of the same pairs in the same order; each row is
  prompt + completion, right-padded with the pad id; S = the longest row rounded up to `pad_to_multiple_of`;
- `attention_mask` Long [2B, S]: 1 on tokens, 0 on padding;
- `completion_mask` Bool [2B, S]: True on completion tokens (EOS included), False on prompt and padding;
- `position_ids` Long [2B, S]: 0..S-1 on every row;
- `row_index` Long [B]: the pairs' row numbers in the source split (for logs and debugging, not for the model).

Training order: epoch e visits the pairs in a permutation drawn from (seed, e). A global batch takes the next
`global_batch_size` pairs of it; DP rank r takes the r-th contiguous 1/dp_size of the global batch, cut into
micro-batches of `micro_batch_size`. An epoch ends when fewer than `global_batch_size` pairs are left: those are not
seen in that epoch (a different few each epoch). The state is (epoch, pairs consumed in the epoch), so a run
resumed from a checkpoint sees exactly the pairs it would have seen, even with another DP size.

Evaluation: the held-out pairs in source order, cut to a multiple of dp_size (the remainder, at most dp_size - 1
pairs, is reported as `dropped_pairs`, never silently), each rank a contiguous equal share in micro-batches of
`micro_batch_size`, the last one smaller. Every rank has the same number of micro-batches of the same sizes, so
collectives inside the forward (expert parallelism spans DP ranks) stay matched.
"""
from __future__ import annotations

import math
import random

import datasets
import torch

PAIR_COLUMNS = ["row_index", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]


def collate_pairs(pairs: dict[str, list], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """A micro-batch (see the module docstring) from columns `prompt_input_ids`, `chosen_input_ids`,
    `rejected_input_ids` (completions) and `row_index`, one entry per pair."""
    prompts = pairs["prompt_input_ids"]
    completions = pairs["chosen_input_ids"] + pairs["rejected_input_ids"]
    prompts = prompts + prompts
    longest = max(len(p) + len(c) for p, c in zip(prompts, completions))
    length = math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of
    rows = len(completions)
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, length), dtype=torch.long)
    completion_mask = torch.zeros((rows, length), dtype=torch.bool)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        total = len(prompt) + len(completion)
        input_ids[row, :total] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[row, :total] = 1
        completion_mask[row, len(prompt):total] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "position_ids": torch.arange(length, dtype=torch.long).repeat(rows, 1),
        "row_index": torch.tensor(pairs["row_index"], dtype=torch.long),
    }


def epoch_permutation(num_pairs: int, seed: int, epoch: int) -> list[int]:
    """The visiting order of epoch `epoch`; Python's string-seeded Mersenne Twister is stable across versions."""
    order = list(range(num_pairs))
    random.Random(f"orpo-megatron-pairs-{seed}-{epoch}").shuffle(order)
    return order


class TrainPairIterator:
    """Infinite iterator over optimizer steps; each step is this DP rank's list of micro-batches."""

    def __init__(self, pairs: datasets.Dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, pad_id: int, pad_to_multiple_of: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if micro_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"--global-batch-size {global_batch_size} must be a multiple of --micro-batch-size "
                             f"{micro_batch_size} x data-parallel size {dp_size}")
        if pairs.num_rows < global_batch_size:
            raise ValueError(f"the training split has {pairs.num_rows} pairs, fewer than one global batch "
                             f"({global_batch_size}); lower --global-batch-size or add data")
        self.pairs = pairs.select_columns(PAIR_COLUMNS)
        self.num_pairs = pairs.num_rows
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.epoch = 0
        self.pairs_in_epoch = 0  # global position inside this epoch's permutation
        self.consumed_pairs = 0  # over all ranks since the start of training
        self._order: list[int] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_pairs // self.global_batch_size

    def __iter__(self) -> TrainPairIterator:
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        if self.pairs_in_epoch + self.global_batch_size > self.num_pairs:
            self.epoch += 1
            self.pairs_in_epoch = 0
            self._order = None
        if self._order is None:
            self._order = epoch_permutation(self.num_pairs, self.seed, self.epoch)
        global_batch = self._order[self.pairs_in_epoch:self.pairs_in_epoch + self.global_batch_size]
        per_rank = self.global_batch_size // self.dp_size
        mine = global_batch[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        self.pairs_in_epoch += self.global_batch_size
        self.consumed_pairs += self.global_batch_size
        return [collate_pairs(self.pairs[mine[start:start + self.micro_batch_size]], self.pad_id,
                              self.pad_to_multiple_of)
                for start in range(0, per_rank, self.micro_batch_size)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pairs_in_epoch": self.pairs_in_epoch, "consumed_pairs": self.consumed_pairs,
                "seed": self.seed, "num_pairs": self.num_pairs}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_pairs"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the data order: the checkpoint's {key} is {state[key]}, this run's "
                                 f"is {getattr(self, key)} (same --seed and the same training pairs are needed)")
        self.epoch, self.pairs_in_epoch = state["epoch"], state["pairs_in_epoch"]
        self.consumed_pairs = state["consumed_pairs"]
        self._order = None


class EvalPairs:
    """The held-out pairs of this DP rank as micro-batches; iterate once per evaluation."""

    def __init__(self, pairs: datasets.Dataset, micro_batch_size: int, dp_rank: int, dp_size: int, pad_id: int,
                 pad_to_multiple_of: int = 1):
        if pairs.num_rows < dp_size:
            raise ValueError(f"the evaluation split has {pairs.num_rows} pairs, fewer than the {dp_size} "
                             "data-parallel ranks; use a larger --eval-fraction/--eval-split")
        per_rank = pairs.num_rows // dp_size
        self.dropped_pairs = pairs.num_rows - per_rank * dp_size
        self.num_pairs = per_rank  # on this rank
        self.positions = list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
        self.pairs = pairs.select_columns(PAIR_COLUMNS)
        self.micro_batch_size = micro_batch_size
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __len__(self) -> int:
        return math.ceil(self.num_pairs / self.micro_batch_size)

    def __iter__(self):
        for start in range(0, self.num_pairs, self.micro_batch_size):
            yield collate_pairs(self.pairs[self.positions[start:start + self.micro_batch_size]], self.pad_id,
                                self.pad_to_multiple_of)
