"""Micro-batches: the tensor contract, deterministic per-epoch order, DP sharding, exact resume, evaluation split."""
import json
import math
import random

import datasets
import pytest
import torch

from orpo_megatron.data.batching import EvalPairs, TrainPairIterator, collate_pairs

PAD = 2


def _pairs(count: int, seed: int = 0) -> datasets.Dataset:
    rng = random.Random(seed)
    rows = {"row_index": [], "prompt_input_ids": [], "chosen_input_ids": [], "rejected_input_ids": []}
    for index in range(count):
        rows["row_index"].append(100 + index)  # source row numbers differ from positions on purpose
        rows["prompt_input_ids"].append([1] + [rng.randint(3, 599) for _ in range(rng.randint(1, 12))])
        rows["chosen_input_ids"].append([rng.randint(3, 599) for _ in range(rng.randint(1, 9))] + [2])
        rows["rejected_input_ids"].append([rng.randint(3, 599) for _ in range(rng.randint(1, 9))] + [2])
    return datasets.Dataset.from_dict(rows)


def _iterators(pairs, dp_size, seed=1234, global_batch_size=8, micro_batch_size=2):
    return [TrainPairIterator(pairs, global_batch_size, micro_batch_size, rank, dp_size, seed, PAD)
            for rank in range(dp_size)]


def _take(iterators, steps):
    """Per step, per rank: the micro-batches."""
    return [[next(iterator) for iterator in iterators] for _ in range(steps)]


def _rows_seen(step):
    return [mb["row_index"].tolist() for rank in step for mb in rank]


@pytest.mark.parametrize("dp_size", [1, 2])
def test_resumed_run_sees_exactly_the_pairs_of_a_straight_run(dp_size):
    pairs = _pairs(37)  # 4 global batches of 8 per epoch, 5 pairs left over each epoch
    steps_per_epoch = 37 // 8
    straight = _take(_iterators(pairs, dp_size), round(2.5 * steps_per_epoch))
    first = _iterators(pairs, dp_size)
    before = _take(first, round(1.2 * steps_per_epoch))
    states = [json.loads(json.dumps(iterator.state_dict())) for iterator in first]  # as a checkpoint stores it
    assert all(state == states[0] for state in states)
    assert states[0]["epoch"] == 1 and states[0]["consumed_pairs"] == 5 * 8
    resumed = _iterators(pairs, dp_size)
    for iterator, state in zip(resumed, states):
        iterator.load_state_dict(state)
    after = _take(resumed, len(straight) - len(before))
    assert len(straight) == 10
    for expected, got in zip(straight, before + after):
        assert _rows_seen(expected) == _rows_seen(got)
        for expected_rank, got_rank in zip(expected, got):
            for expected_mb, got_mb in zip(expected_rank, got_rank):
                for key in expected_mb:
                    assert torch.equal(expected_mb[key], got_mb[key]), key


def test_dp_ranks_split_each_global_batch_without_overlap_and_match_dp1():
    pairs = _pairs(37)
    single, double = _take(_iterators(pairs, 1), 9), _take(_iterators(pairs, 2), 9)
    for one, two in zip(single, double):
        rank0, rank1 = ([r for mb in rank for r in mb["row_index"].tolist()] for rank in two)
        assert len(rank0) == len(rank1) == 4 and not set(rank0) & set(rank1)
        assert rank0 + rank1 == [r for mb in one[0] for r in mb["row_index"].tolist()]
    # A run may resume at another DP size: the global order does not depend on it.
    first = _iterators(pairs, 2)
    _take(first, 3)
    resumed = _iterators(pairs, 1)
    resumed[0].load_state_dict(first[0].state_dict())
    assert _rows_seen(_take(resumed, 1)[0]) == _rows_seen(single[3])


def test_each_epoch_visits_distinct_pairs_in_a_new_seeded_order():
    pairs = _pairs(37)
    steps = _take(_iterators(pairs, 1), 8)
    epochs = [[r for step in steps[e * 4:(e + 1) * 4] for rows in _rows_seen(step) for r in rows] for e in (0, 1)]
    for order in epochs:
        assert len(order) == len(set(order)) == 32 and set(order) <= set(range(100, 137))
    assert epochs[0] != epochs[1]
    other_seed = _take(_iterators(pairs, 1, seed=99), 4)
    assert [r for step in other_seed for rows in _rows_seen(step) for r in rows] != epochs[0]


def test_micro_batch_follows_the_contract():
    pairs = _pairs(12)
    columns = pairs[[5, 0, 7]]
    batch = collate_pairs(columns, pad_id=PAD, pad_to_multiple_of=8)
    prompts, chosen, rejected = columns["prompt_input_ids"], columns["chosen_input_ids"], columns["rejected_input_ids"]
    expected_rows = [p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)]
    length = math.ceil(max(map(len, expected_rows)) / 8) * 8
    assert batch["input_ids"].shape == (6, length) and batch["input_ids"].dtype == torch.long
    assert batch["row_index"].tolist() == columns["row_index"]
    for row, expected in enumerate(expected_rows):
        prompt_length = len(prompts[row % 3])
        assert batch["input_ids"][row].tolist() == expected + [PAD] * (length - len(expected))
        assert batch["attention_mask"][row].tolist() == [1] * len(expected) + [0] * (length - len(expected))
        assert batch["completion_mask"][row].tolist() == ([False] * prompt_length
                                                         + [True] * (len(expected) - prompt_length)
                                                         + [False] * (length - len(expected)))
        assert batch["position_ids"][row].tolist() == list(range(length))
    assert batch["attention_mask"].dtype == torch.long and batch["completion_mask"].dtype == torch.bool
    assert batch["position_ids"].dtype == torch.long


@pytest.mark.parametrize("dp_size, micro_batch_size, sizes", [(1, 4, [4, 4, 4, 1]), (2, 4, [4, 2]), (3, 2, [2, 2])])
def test_eval_pairs_are_split_evenly_over_dp_without_silent_loss(dp_size, micro_batch_size, sizes):
    pairs = _pairs(13)
    shards = [EvalPairs(pairs, micro_batch_size, rank, dp_size, PAD) for rank in range(dp_size)]
    seen = []
    for shard in shards:
        micro_batches = list(shard)
        assert [mb["row_index"].numel() for mb in micro_batches] == sizes and len(shard) == len(sizes)
        seen += [r for mb in micro_batches for r in mb["row_index"].tolist()]
        assert shard.dropped_pairs == 13 % dp_size
    assert seen == list(range(100, 100 + 13 - 13 % dp_size))  # source order, each pair once
    assert [r for mb in shards[0] for r in mb["row_index"].tolist()] == seen[:len(seen) // dp_size]  # re-iterable


def test_batching_errors_name_the_flags():
    pairs = _pairs(10)
    with pytest.raises(ValueError, match="--global-batch-size 6 must be a multiple of --micro-batch-size 2 x"):
        TrainPairIterator(pairs, 6, 2, 0, 2, 0, PAD)
    with pytest.raises(ValueError, match="10 pairs, fewer than one global batch"):
        TrainPairIterator(pairs, 16, 2, 0, 1, 0, PAD)
    iterator = TrainPairIterator(pairs, 4, 2, 0, 1, 0, PAD)
    with pytest.raises(ValueError, match="checkpoint's seed is 7"):
        iterator.load_state_dict(dict(iterator.state_dict(), seed=7))
    with pytest.raises(ValueError, match="fewer than the 4 data-parallel ranks"):
        EvalPairs(_pairs(3), 1, 0, 4, PAD)
