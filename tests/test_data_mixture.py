"""Several preference sources in one run: Megatron-LM's weighted blend (`--data-path W1 A W2 B`) and the
alignment-handbook's `dataset_mixer` fractions (`--dataset-mixer A=F1 B=F2`), with the counts each form's definition
gives (computed by hand below), deterministic under --seed, held out per source, resumable mid-epoch."""
import argparse
import collections
import json
import os
import re

import pytest

from orpo_megatron.data import add_data_args, build_preference_data
from orpo_megatron.data.batching import BatchLayout
from orpo_megatron.data.mixture import parse_sources

A_PAIRS, B_PAIRS = 30, 50


def write_source(path, word: str, count: int) -> str:
    """`count` pairs whose prompts say which source and row they are."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            f.write(json.dumps({"prompt": f"{word} question {i}", "chosen": f"{word} good answer {i}",
                                "rejected": f"{word} bad answer {i}"}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixture")
    return (write_source(folder / "alpha.jsonl", "alpha", A_PAIRS), write_source(folder / "beta.jsonl", "beta", B_PAIRS),
            str(folder / "cache"))


def build(tiny_mixtral, cache, *flags, seed=7, global_batch_size=8):
    args = add_data_args(argparse.ArgumentParser()).parse_args(
        [*flags, "--data-cache-dir", cache, "--tokenizer", tiny_mixtral, "--max-length", "64", "--max-prompt-length", "32"])
    return build_preference_data(args, None, 0, 1, 2, global_batch_size, BatchLayout(packing=False), seed)


def pair_of(tokenizer, ids: list[int]) -> tuple[str, int]:
    """(source word, row) of a pair from its prompt's (or its whole sequence's) tokens."""
    word, row = re.search(r"(alpha|beta) question (\d+)", tokenizer.decode(ids)).groups()
    return word, int(row)


def source_counts(train, tiny_mixtral) -> dict[str, collections.Counter]:
    from orpo_megatron.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_mixtral)
    counts = {"alpha": collections.Counter(), "beta": collections.Counter()}
    for prompt in train.pairs["prompt_input_ids"]:
        word, row = pair_of(tokenizer, prompt)
        counts[word][row] += 1
    return counts


def test_megatron_blend_weights_are_shares_of_the_training_pairs(sources, tiny_mixtral):
    """0.7 / 0.3 of the 80 pairs: alpha gives 56 (its 30 once, 26 of them twice), beta 24 distinct pairs of its 50."""
    alpha, beta, cache = sources
    train, _, stats = build(tiny_mixtral, cache, "--data-path", "0.7", alpha, "0.3", beta)
    counts = source_counts(train, tiny_mixtral)
    assert sum(counts["alpha"].values()) == 56 and sum(counts["beta"].values()) == 24
    assert sorted(collections.Counter(counts["alpha"].values()).items()) == [(1, 4), (2, 26)]
    assert set(counts["alpha"]) == set(range(A_PAIRS))
    assert set(counts["beta"].values()) == {1} and len(counts["beta"]) == 24
    assert stats.train_pairs == 80
    assert stats.as_dict()["data/source0_drawn_pairs"] == 56 and stats.as_dict()["data/source1_pairs"] == 50
    assert f"mixture: {alpha}: 56 of its 30 pairs (70.0% of the training pairs)" in stats.summary()

    again, _, _ = build(tiny_mixtral, cache, "--data-path", "0.7", alpha, "0.3", beta)
    other_seed, _, _ = build(tiny_mixtral, cache, "--data-path", "0.7", alpha, "0.3", beta, seed=8)
    assert source_counts(again, tiny_mixtral) == counts  # the seed decides which pairs
    moved = source_counts(other_seed, tiny_mixtral)
    assert sum(moved["beta"].values()) == 24 and moved["beta"] != counts["beta"]


def test_handbook_mixer_keeps_the_first_fraction_of_each_source(sources, tiny_mixtral):
    """alignment-handbook's mix_datasets: `dataset.select(range(int(frac * len(dataset))))` per source."""
    alpha, beta, cache = sources
    train, _, stats = build(tiny_mixtral, cache, "--dataset-mixer", f"{alpha}=0.5", f"{beta}=0.9")
    counts = source_counts(train, tiny_mixtral)
    assert counts["alpha"] == collections.Counter(range(15)) and counts["beta"] == collections.Counter(range(45))
    assert stats.train_pairs == 60


def test_evaluation_is_held_out_of_each_source_before_mixing(sources, tiny_mixtral):
    """--eval-fraction 0.2: 6 of alpha's and 10 of beta's pairs; none of them is in the (repeating) training mix."""
    alpha, beta, cache = sources
    train, evaluation, stats = build(tiny_mixtral, cache, "--data-path", "0.8", alpha, "0.2", beta,
                                     "--eval-fraction", "0.2")
    assert stats.eval_pairs == 16 and stats.train_pairs == 64  # 0.8 and 0.2 of the 24 + 40 left
    from orpo_megatron.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_mixtral)
    held = {pair_of(tokenizer, ids.tolist()) for micro_batch in evaluation for ids in micro_batch.input_ids}
    counts = source_counts(train, tiny_mixtral)
    assert len(held) == 16 and sum(word == "alpha" for word, _ in held) == 6
    assert not any(row in counts[word] for word, row in held)
    assert sum(counts["alpha"].values()) == 51 and len(counts["alpha"]) == 24  # 0.8 x 64 = 51.2 -> 51


def test_a_blend_resumes_exactly_mid_epoch(sources, tiny_mixtral):
    alpha, beta, cache = sources
    flags = ("--data-path", "0.6", alpha, "0.4", beta)
    straight, _, _ = build(tiny_mixtral, cache, *flags)
    steps = [next(straight) for _ in range(14)]  # 10 steps an epoch: into the second epoch
    interrupted, _, _ = build(tiny_mixtral, cache, *flags)
    for _ in range(4):
        next(interrupted)
    resumed, _, _ = build(tiny_mixtral, cache, *flags)
    resumed.load_state_dict(interrupted.state_dict())
    for step in steps[4:]:
        again = next(resumed)
        assert [b.input_ids.tolist() for b in again.micro_batches] == [b.input_ids.tolist() for b in step.micro_batches]


@pytest.mark.parametrize("data_path, mixer, message", [
    (["0.7", "a.jsonl", "b.jsonl"], None, "takes weight-path pairs (W1 PATH1 W2 PATH2 ...), got 3 values"),
    (["x", "a.jsonl", "0.3", "b.jsonl"], None, "--data-path: expected a weight before a.jsonl, got 'x'"),
    (["0", "a.jsonl", "1", "b.jsonl"], None, "a weight before a.jsonl must be a finite number > 0, got '0'"),
    (None, ["a.jsonl"], "--dataset-mixer: expected PATH=FRACTION, got 'a.jsonl'"),
    (None, ["a.jsonl=1.5"], "the fraction of a.jsonl must be at most 1"),
    (["a.jsonl"], ["b.jsonl=0.5"], "pass --data-path or --dataset-mixer, not both"),
    (None, None, "--data-path is required"),
])
def test_mixture_flags_that_cannot_work_are_named(data_path, mixer, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_sources(data_path, mixer)


def test_a_share_that_rounds_to_no_pair_is_refused(sources, tiny_mixtral):
    alpha, beta, cache = sources
    with pytest.raises(ValueError, match=f"the mixture takes no pair of {beta}"):
        build(tiny_mixtral, cache, "--data-path", "1", alpha, "0.001", beta)


def test_inspect_data_shows_the_mixture(sources, tiny_mixtral, capsys):
    import importlib.util

    alpha, beta, cache = sources
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "inspect_data.py")
    spec = importlib.util.spec_from_file_location("inspect_data", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--data-path", "0.7", alpha, "0.3", beta, "--tokenizer", tiny_mixtral,
                      "--data-cache-dir", cache, "--max-length", "64", "--max-prompt-length", "32"]) == 0
    out = capsys.readouterr().out
    assert f"{alpha} [train]: 30 rows, 30 pairs kept" in out and f"{beta} [train]: 50 rows, 50 pairs kept" in out
    assert "mixture (--data-path weights, --seed 1234): 80 training pairs" in out
    assert f"{alpha}: 56 of its 30 pairs (weight 0.7; 70.0% of the mixture)" in out


def test_the_trainer_trains_on_a_blend_and_logs_each_source(sources, tiny_converted, tmp_path):
    from conftest import trainer_signal_handlers_undone
    from megatron.core import parallel_state

    from orpo_megatron import parallel, train

    alpha, beta, cache = sources
    if parallel_state.model_parallel_is_initialized():  # another test's one-process group (conversion)
        parallel.destroy()
    save = tmp_path / "run"
    with trainer_signal_handlers_undone():
        assert train.main(["--load", tiny_converted, "--save", str(save), "--data-path", "0.7", alpha, "0.3", beta,
                           "--data-cache-dir", cache, "--max-length", "64", "--max-prompt-length", "32",
                           "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "2",
                           "--log-interval", "1", "--lr", "1e-4"]) == 0
    events = [json.loads(line) for line in open(save / "metrics.jsonl")]
    assert events[0]["data/source0_drawn_pairs"] == 56 and events[0]["data/source1_drawn_pairs"] == 24
    assert [event["iteration"] for event in events if "train/loss" in event] == [1, 2]
