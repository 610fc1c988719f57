"""Micro-batches: the tensor contract of both layouts, packing, deterministic per-epoch order, DP sharding, exact
resume, evaluation split, the move to the device."""
import dataclasses
import json
import math
import random

import datasets
import pytest
import torch

from orpo_megatron.data.batching import BatchLayout, EvalPairs, TrainPairIterator, batch_layout
from orpo_megatron.data.micro_batch import DEVICE_FIELDS, MicroBatch, packed_micro_batch, padded_micro_batch
from orpo_megatron.data.packing import pack_rows
from orpo_megatron.parallel import ParallelLayout

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


def _iterators(pairs, dp_size, seed=1234, global_batch_size=8, micro_batch_size=2, layout=BatchLayout()):
    return [TrainPairIterator(pairs, global_batch_size, micro_batch_size, rank, dp_size, seed, PAD, layout)
            for rank in range(dp_size)]


def _take(iterators, steps):
    """Per step, per rank: the micro-batches."""
    return [[next(iterator).micro_batches for iterator in iterators] for _ in range(steps)]


def _rows_seen(step):
    return [mb.row_index.tolist() for rank in step for mb in rank]


def _assert_equal_micro_batches(expected: MicroBatch, got: MicroBatch):
    for field in dataclasses.fields(MicroBatch):
        a, b = getattr(expected, field.name), getattr(got, field.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, field.name


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
                _assert_equal_micro_batches(expected_mb, got_mb)


def test_resume_on_other_pairs_of_the_same_count_is_refused_unless_allowed():
    pairs = _pairs(37)
    saved = _iterators(pairs, 1)[0]
    next(saved)
    state = json.loads(json.dumps(saved.state_dict()))
    same = _iterators(_pairs(37), 1)[0]  # the same pairs, rebuilt
    assert same.load_state_dict(state) is None and same.consumed_pairs == 8
    edited = pairs.to_dict()
    edited["chosen_input_ids"][20] = edited["chosen_input_ids"][20][:-1] + [7, 2]  # one token more in one pair
    other = _iterators(datasets.Dataset.from_dict(edited), 1)[0]
    with pytest.raises(ValueError, match="cannot resume: the 37 training pairs differ .*--allow-data-change"):
        other.load_state_dict(state)
    assert other.consumed_pairs == 0
    warning = other.load_state_dict(state, allow_data_change=True)
    assert "differ" in warning and "--allow-data-change" in warning and other.consumed_pairs == 8


def test_dp_ranks_split_each_global_batch_without_overlap_and_match_dp1():
    pairs = _pairs(37)
    single, double = _take(_iterators(pairs, 1), 9), _take(_iterators(pairs, 2), 9)
    for one, two in zip(single, double):
        rank0, rank1 = ([r for mb in rank for r in mb.row_index.tolist()] for rank in two)
        assert len(rank0) == len(rank1) == 4 and not set(rank0) & set(rank1)
        assert rank0 + rank1 == [r for mb in one[0] for r in mb.row_index.tolist()]
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


def _expected_sequences(columns):
    """(tokens, prompt length) of each sequence in loss order: chosen ones, then rejected ones."""
    prompts = columns["prompt_input_ids"]
    return ([(p + c, len(p)) for p, c in zip(prompts, columns["chosen_input_ids"])]
            + [(p + r, len(p)) for p, r in zip(prompts, columns["rejected_input_ids"])])


def test_padded_micro_batch_follows_the_contract():
    columns = _pairs(12)[[5, 0, 7]]
    batch = padded_micro_batch(columns, pad_id=PAD, length_multiple=8)
    sequences = _expected_sequences(columns)
    longest = max(len(tokens) for tokens, _ in sequences)
    length = math.ceil(longest / 8) * 8
    assert batch.input_ids.shape == (6, length) and batch.cu_seqlens is None and not batch.packed
    assert batch.row_index.tolist() == columns["row_index"] and batch.num_pairs == 3
    for row, (tokens, prompt) in enumerate(sequences):
        pad = length - len(tokens)
        assert batch.input_ids[row].tolist() == tokens + [PAD] * pad
        assert batch.position_ids[row].tolist() == list(range(length))
        assert batch.sequence_index[row].tolist() == [row] * length
        assert batch.labels[row].tolist() == tokens[1:] + [0] * (pad + 1)
        assert batch.real_targets[row].tolist() == [True] * (len(tokens) - 1) + [False] * (pad + 1)
        assert batch.completion_targets[row].tolist() == ([False] * (prompt - 1) + [True] * (len(tokens) - prompt)
                                                          + [False] * (pad + 1))
        assert batch.padding_mask[row].tolist() == [False] * len(tokens) + [True] * pad
        # TRL's logits/* positions: logits[:, :-1] of the batch cut to its longest row, every row.
        assert batch.logits_positions[row].tolist() == [True] * (longest - 1) + [False] * (length - longest + 1)
    assert batch.sequence_lengths == tuple(len(tokens) for tokens, _ in sequences)
    assert batch.num_chosen_real_targets == sum(len(tokens) - 1 for tokens, _ in sequences[:3])
    assert batch.num_chosen_completion_targets == sum(len(tokens) - prompt for tokens, prompt in sequences[:3])


def test_packed_micro_batch_follows_the_contract():
    columns = _pairs(12)[[5, 0, 7]]
    batch = packed_micro_batch(columns, pad_id=PAD, length_multiple=16)
    sequences = _expected_sequences(columns)
    real = sum(len(tokens) for tokens, _ in sequences)
    length = math.ceil(real / 16) * 16
    tail = length - real
    assert batch.packed and batch.input_ids.shape == (1, length) and tail > 0
    expected = {name: [] for name in ("input_ids", "position_ids", "labels", "sequence_index", "real_targets",
                                      "completion_targets")}
    for index, (tokens, prompt) in enumerate(sequences):
        expected["input_ids"] += tokens
        expected["position_ids"] += list(range(len(tokens)))
        expected["labels"] += tokens[1:] + [0]
        expected["sequence_index"] += [index] * len(tokens)
        expected["real_targets"] += [True] * (len(tokens) - 1) + [False]
        expected["completion_targets"] += [False] * (prompt - 1) + [True] * (len(tokens) - prompt) + [False]
    last = len(sequences[-1][0])
    tails = {"input_ids": [PAD] * tail, "position_ids": list(range(last, last + tail)), "labels": [0] * tail,
             "sequence_index": [5] * tail, "real_targets": [False] * tail, "completion_targets": [False] * tail}
    for name, values in expected.items():
        assert getattr(batch, name)[0].tolist() == values + tails[name], name
    assert batch.padding_mask[0].tolist() == [False] * real + [True] * tail
    assert torch.equal(batch.logits_positions, batch.real_targets)
    # Segment boundaries: the padding tail belongs to the last sequence, so no segment is empty and the longest
    # is shorter than the row (Megatron's THD RoPE restarts positions only then).
    bounds = [0]
    for tokens, _ in sequences:
        bounds.append(bounds[-1] + len(tokens))
    bounds[-1] = length
    assert batch.cu_seqlens.tolist() == bounds and batch.cu_seqlens.dtype == torch.int32
    assert batch.max_seqlen == max(b - a for a, b in zip(bounds, bounds[1:])) < length
    assert batch.sequence_lengths == tuple(len(tokens) for tokens, _ in sequences)


def test_both_layouts_score_the_same_targets_and_padding_keeps_them():
    columns = _pairs(12)[[3, 9]]
    padded, packed = padded_micro_batch(columns, PAD), packed_micro_batch(columns, PAD)
    for batch in (padded, packed, padded.padded_to(padded.input_ids.shape[1] + 5),
                  packed.padded_to(packed.input_ids.shape[1] + 5)):
        per_sequence = [(batch.labels[batch.real_targets & (batch.sequence_index == s)].tolist(),
                         batch.labels[batch.completion_targets & (batch.sequence_index == s)].tolist())
                        for s in range(4)]
        for (tokens, prompt), (real, completion) in zip(_expected_sequences(columns), per_sequence):
            assert real == tokens[1:] and completion == tokens[prompt:]
        assert (batch.num_chosen_real_targets, batch.num_chosen_completion_targets) == (
            padded.num_chosen_real_targets, padded.num_chosen_completion_targets)
    longer = packed.padded_to(packed.input_ids.shape[1] + 5)
    assert longer.cu_seqlens[-1] == longer.input_ids.shape[1] and longer.max_seqlen < longer.input_ids.shape[1]


@pytest.mark.parametrize("layout", [BatchLayout(packing=False), BatchLayout(),
                                    BatchLayout(fixed_length_rows=True, length_multiple=8, rows_per_rank_multiple=2)],
                         ids=["padded", "packed", "fixed_rows"])
def test_step_counts_are_those_of_every_rank_micro_batches(layout):
    """The normalizers come from the pair-length table; they must equal what the micro-batches of all DP ranks
    hold."""
    pairs = _pairs(45).select(random.Random(0).sample(range(45), 37))  # an indices mapping, as a held-out split has
    iterators = _iterators(pairs, 2, global_batch_size=8, layout=layout)
    for _ in range(3):
        steps = [next(iterator) for iterator in iterators]
        everything = [mb for step in steps for mb in step.micro_batches]
        assert all(step.num_pairs == 8 for step in steps) and sum(mb.num_pairs for mb in everything) == 8
        for nll_on_prompt in (True, False):
            assert {step.num_nll_targets(nll_on_prompt) for step in steps} == {
                sum(mb.num_nll_targets(nll_on_prompt) for mb in everything)}


def test_fixed_length_rows_hold_every_pair_once_whole_with_equal_rows_per_rank():
    pairs = _pairs(64, seed=3)
    layout = BatchLayout(fixed_length_rows=True, length_multiple=4, rows_per_rank_multiple=2)
    iterators = _iterators(pairs, 2, global_batch_size=16, layout=layout)
    lengths = [2 * len(p) + len(c) + len(r) for p, c, r in
               zip(pairs["prompt_input_ids"], pairs["chosen_input_ids"], pairs["rejected_input_ids"])]
    row_length = math.ceil(max(lengths) / 4) * 4  # the default: the longest pair
    straight = _iterators(pairs, 1, global_batch_size=16)  # the same global batches, unpacked
    for _ in range(4):
        ranks = [next(iterator).micro_batches for iterator in iterators]
        expected = sorted(r for mb in next(straight[0]).micro_batches for r in mb.row_index.tolist())
        assert sorted(r for rank in ranks for mb in rank for r in mb.row_index.tolist()) == expected
        assert len(ranks[0]) == len(ranks[1]) and len(ranks[0]) % 2 == 0
        for mb in (mb for rank in ranks for mb in rank):
            assert mb.packed and mb.input_ids.shape == (1, row_length) and mb.num_pairs >= 1
            assert len(mb.sequence_lengths) == 2 * mb.row_index.numel()  # chosen and rejected in the same row
            assert mb.num_real_tokens == sum(lengths[r - 100] for r in mb.row_index.tolist()) <= row_length


def test_pack_rows_fills_the_fewest_rows_the_multiple_allows():
    lengths = [9, 7, 6, 5, 5, 4, 3, 1]  # 40 tokens
    rows = pack_rows(lengths, 10, rows_multiple=1)
    assert len(rows) == 4 and sorted(i for row in rows for i in row) == list(range(8))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(pack_rows(lengths, 10, rows_multiple=3)) == 6  # 4 rounded up to a multiple of 3, none empty
    assert all(pack_rows(lengths, 10, rows_multiple=3))
    with pytest.raises(ValueError, match="a pair of 9 tokens does not fit in a row of 8"):
        pack_rows(lengths, 8)
    with pytest.raises(ValueError, match="8 pairs cannot fill a multiple of 9 rows"):
        pack_rows(lengths, 10, rows_multiple=9)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("packing, pp", [(True, 1), (True, 2), (False, 1)], ids=["packed", "fixed_rows", "padded"])
def test_fp8_row_lengths_suit_transformer_engine(tp, packing, pp):
    """With FP8, TE's GEMMs need each TP rank's token rows (sequence positions after the SP split, times rows) to be
    a multiple of 8 (TE `assert_dim_for_fp8_exec`); sequence parallelism needs positions divisible by TP."""
    layout = batch_layout(packing, None, ParallelLayout(world_size=tp * pp, tensor_model_parallel_size=tp,
                                                   pipeline_model_parallel_size=pp, sequence_parallel=tp > 1), fp8=True)
    pairs = _pairs(40, seed=tp)
    steps = [next(TrainPairIterator(pairs, 8, 2, 0, 1, seed, PAD, layout)).micro_batches for seed in range(3)]
    for micro_batch in [mb for step in steps for mb in step] + list(EvalPairs(pairs, 3, 0, 1, PAD, layout)):
        rows, length = micro_batch.input_ids.shape
        assert length % tp == 0 and (rows * length // tp) % 8 == 0, (rows, length)


def test_to_device_moves_every_tensor_the_model_and_loss_read():
    """On a GPU each micro-batch moves once, before the schedule; every tensor field but the source row numbers
    must go (a host tensor left in the forward or the loss fails there with a device mismatch). `meta` stands in
    for the GPU here."""
    columns = _pairs(12)[[1, 2]]
    for batch in (padded_micro_batch(columns, PAD), packed_micro_batch(columns, PAD, 8)):
        moved = batch.to_device(torch.device("meta"))
        tensors = {f.name for f in dataclasses.fields(MicroBatch) if isinstance(getattr(batch, f.name), torch.Tensor)}
        assert tensors - {"row_index"} <= set(DEVICE_FIELDS)
        for name in tensors - {"row_index"}:
            assert getattr(moved, name).device.type == "meta", name
        assert moved.row_index.device.type == "cpu" and moved.max_seqlen == batch.max_seqlen
        assert batch.to_device(None) is batch  # without a GPU nothing moves


@pytest.mark.parametrize("dp_size, micro_batch_size, sizes", [(1, 4, [4, 4, 4, 1]), (2, 4, [4, 2]), (3, 2, [2, 2])])
def test_eval_pairs_are_split_evenly_over_dp_without_silent_loss(dp_size, micro_batch_size, sizes):
    pairs = _pairs(13)
    shards = [EvalPairs(pairs, micro_batch_size, rank, dp_size, PAD) for rank in range(dp_size)]
    seen = []
    for shard in shards:
        micro_batches = list(shard)
        assert [mb.row_index.numel() for mb in micro_batches] == sizes and len(shard) == len(sizes)
        seen += [r for mb in micro_batches for r in mb.row_index.tolist()]
        assert shard.dropped_pairs == 13 % dp_size
    assert seen == list(range(100, 100 + 13 - 13 % dp_size))  # source order, each pair once
    assert [r for mb in shards[0] for r in mb.row_index.tolist()] == seen[:len(seen) // dp_size]  # re-iterable


def test_eval_pairs_give_the_interleaved_schedule_a_multiple_of_pp_micro_batches():
    assert [mb.row_index.numel() for mb in EvalPairs(_pairs(13), 4, 0, 1, PAD, BatchLayout(rows_per_rank_multiple=2))
            ] == [4, 4, 4, 1]  # already a multiple
    shard = EvalPairs(_pairs(13), 4, 0, 1, PAD, BatchLayout(rows_per_rank_multiple=3))
    assert [mb.row_index.numel() for mb in shard] == [3, 2, 2, 2, 2, 2]
    assert [r for mb in shard for r in mb.row_index.tolist()] == list(range(100, 113))
    with pytest.raises(ValueError, match="cannot form a multiple of 4 micro-batches"):
        EvalPairs(_pairs(3), 1, 0, 1, PAD, BatchLayout(rows_per_rank_multiple=4))


@pytest.mark.parametrize("dp_size, micro_batch_size, multiple, sizes", [
    (1, 4, 2, [3, 3, 3, 3]),  # 12 of 13 pairs (micro-batches of 4 would evaluate 8, of 1 also 12)
    (1, 2, 3, [2] * 6),
    (2, 4, 2, [3, 3]),  # 6 pairs per rank
    (1, 4, 4, [3] * 4),  # 12: 4 x 3 beats 12 x 1 (as many pairs, larger micro-batches)
])
def test_padded_eval_pairs_give_the_interleaved_schedule_micro_batches_of_one_shape(dp_size, micro_batch_size,
                                                                                    multiple, sizes):
    """Padded micro-batches of fewer pairs have fewer rows, another shape: the interleaved schedule gets a
    multiple of PP micro-batches of one size (at most --micro-batch-size, evaluating as many pairs as possible),
    and the pairs left over are reported."""
    layout = BatchLayout(packing=False, rows_per_rank_multiple=multiple)
    shards = [EvalPairs(_pairs(13), micro_batch_size, rank, dp_size, PAD, layout) for rank in range(dp_size)]
    for shard in shards:
        micro_batches = list(shard)
        assert [mb.input_ids.shape[0] for mb in micro_batches] == [2 * size for size in sizes]
        assert shard.num_pairs == sum(sizes)
        assert shard.dropped_pairs == 13 - dp_size * sum(sizes)
    with pytest.raises(ValueError, match="3 evaluation pairs per data-parallel rank cannot fill 4 micro-batches"):
        EvalPairs(_pairs(3), micro_batch_size, 0, 1, PAD, BatchLayout(packing=False, rows_per_rank_multiple=4))


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
    fixed = BatchLayout(fixed_length_rows=True, packed_length=20)
    longest = max(range(10), key=lambda i: 2 * len(pairs[i]["prompt_input_ids"]) + len(pairs[i]["chosen_input_ids"])
                  + len(pairs[i]["rejected_input_ids"]))
    with pytest.raises(ValueError, match=f"--packed-length 20 is shorter than the training pair of source row "
                                         f"{100 + longest}"):
        TrainPairIterator(pairs, 4, 2, 0, 1, 0, PAD, fixed)
    with pytest.raises(ValueError, match="--global-batch-size 4 is smaller than the 8 packed rows"):
        TrainPairIterator(pairs, 4, 1, 0, 2, 0, PAD, BatchLayout(fixed_length_rows=True, rows_per_rank_multiple=4))
    with pytest.raises(ValueError, match="cannot be combined with --no-packing"):
        BatchLayout(packing=False, packed_length=64)
