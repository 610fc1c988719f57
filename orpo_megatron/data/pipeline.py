"""The one call the trainer makes: flags -> (training iterator, evaluation micro-batches, statistics).

Owns the order of the steps (load the split(s), tokenize once, apply the bad-row policy, hold out evaluation pairs,
build the iterators) and the statistics object. Each step lives in its own module.
"""
from __future__ import annotations

import argparse
import dataclasses
import random

import datasets

from orpo_megatron.data.arguments import DataConfig
from orpo_megatron.data.batching import BatchLayout, EvalPairs, TrainPairIterator
from orpo_megatron.data.chat_template import resolve_chat_template
from orpo_megatron.data.mixture import SourceDraw, mix
from orpo_megatron.data.preference import PairTokenizer
from orpo_megatron.data.preprocess import PreprocessStats, apply_bad_row_policy, tokenize_dataset
from orpo_megatron.data.sources import load_split
from orpo_megatron.data.tokenizer import load_tokenizer
from orpo_megatron.errors import ConfigError


@dataclasses.dataclass
class PreferenceDataStats:
    """Counts for the logs: per split, and after the train/eval split and DP sharding."""
    train: PreprocessStats
    eval: PreprocessStats | None
    train_pairs: int
    eval_pairs: int
    eval_pairs_dropped: int  # what does not split evenly over DP ranks (and padded interleaved micro-batches)
    mixture: list[SourceDraw] = dataclasses.field(default_factory=list)  # several sources only

    def summary(self) -> str:
        lines = [self.train.summary()]
        if self.eval is not None:
            lines.append(self.eval.summary())
        total = sum(draw.drawn for draw in self.mixture)
        lines += [f"mixture: {draw.summary(f'{draw.drawn / total:.1%} of the training pairs')}"
                  for draw in self.mixture]
        lines.append(f"training pairs {self.train_pairs}, evaluation pairs {self.eval_pairs}"
                     + (f" ({self.eval_pairs_dropped} left out to split evenly over DP ranks and micro-batches)"
                        if self.eval_pairs_dropped else ""))
        return "\n".join(lines)

    def as_dict(self) -> dict[str, int]:
        flat = {"data/train_pairs": self.train_pairs, "data/eval_pairs": self.eval_pairs,
                "data/eval_pairs_dropped": self.eval_pairs_dropped}
        for index, draw in enumerate(self.mixture):
            flat[f"data/source{index}_pairs"], flat[f"data/source{index}_drawn_pairs"] = draw.pairs, draw.drawn
        for name, stats in (("train", self.train), ("eval", self.eval)):
            if stats is None:
                continue
            flat[f"data/{name}_rows"] = stats.rows
            flat.update({f"data/{name}_bad_rows/{reason}": count for reason, count in stats.bad_rows.items()})
            for field in ("prompt_truncated", "chosen_truncated", "rejected_truncated"):
                flat[f"data/{name}_{field}"] = getattr(stats, field)
        return flat


def make_pair_tokenizer(config: DataConfig, tokenizer_dir_fallback: str | None) -> PairTokenizer:
    tokenizer_dir = config.tokenizer or tokenizer_dir_fallback
    if tokenizer_dir is None:
        raise ConfigError("no tokenizer: pass --tokenizer DIR (a folder with tokenizer.json or tokenizer.model), or "
                         "load a checkpoint "
                         "that stores one")
    tokenizer = load_tokenizer(tokenizer_dir)
    template = resolve_chat_template(config.chat_template, tokenizer.chat_template, tokenizer_dir)
    return PairTokenizer(tokenizer_dir, template, config.truncation, config.chat_template_kwargs)


def tokenized_table(config: DataConfig, pair_tokenizer: PairTokenizer, split: str, path: str
                    ) -> tuple[datasets.Dataset, str]:
    """Every row of one split of one source tokenized (bad ones with their reason), and its name for messages."""
    source = f"{path} [{split}]"
    return tokenize_dataset(load_split(path, split, config.cache_dir), pair_tokenizer, config.cache_dir,
                            config.num_workers, source), source


def source_splits(config: DataConfig, pair_tokenizer: PairTokenizer, split: str
                  ) -> list[tuple[datasets.Dataset, PreprocessStats]]:
    """Per source: the good pairs of one split (source order) and what happened to the rest."""
    return [apply_bad_row_policy(*tokenized_table(config, pair_tokenizer, split, source.path), config.on_bad_row,
                                 config.max_bad_row_fraction) for source in config.sources]


def tokenized_split(config: DataConfig, pair_tokenizer: PairTokenizer, split: str
                    ) -> tuple[datasets.Dataset, PreprocessStats]:
    """The good pairs of one split (source order; every source's, one after the other, unweighted) and what
    happened to the rest."""
    parts = source_splits(config, pair_tokenizer, split)
    if len(parts) == 1:
        return parts[0]
    return (datasets.concatenate_datasets([pairs for pairs, _ in parts]),
            PreprocessStats.total([stats for _, stats in parts]))


def tokenize_into_cache(config: DataConfig, tokenizer_dir_fallback: str | None, splits: list[str | None]) -> None:
    """Tokenize `splits` (None entries skipped) into `config.cache_dir`, for the launch's first rank to call
    before torch.distributed and CUDA start: `datasets.map(num_proc=N)` forks, and a fork of a process running
    NCCL and CUDA threads can deadlock. The other ranks wait for it in the rendezvous, then read the cache."""
    pair_tokenizer = make_pair_tokenizer(config, tokenizer_dir_fallback)
    for split in splits:
        if split is not None:
            tokenized_split(config, pair_tokenizer, split)


def hold_out(pairs: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval): round(fraction * n) pairs (at least one) drawn by `seed`, both kept in source order."""
    count = max(1, round(fraction * pairs.num_rows))
    if count >= pairs.num_rows:
        raise ConfigError(f"--eval-fraction {fraction} leaves no training pairs out of {pairs.num_rows}")
    held = set(random.Random(f"orpo-megatron-eval-{seed}").sample(range(pairs.num_rows), count))
    return (pairs.select([i for i in range(pairs.num_rows) if i not in held]),
            pairs.select(sorted(held)))


def build_preference_data(args: argparse.Namespace, tokenizer_dir_fallback: str | None, dp_rank: int, dp_size: int,
                          micro_batch_size: int, global_batch_size: int, layout: BatchLayout, seed: int
                          ) -> tuple[TrainPairIterator, EvalPairs | None, PreferenceDataStats]:
    """Everything the training loop needs from the data; `args` carries the flags of `add_data_args`."""
    config = DataConfig.from_args(args)
    pair_tokenizer = make_pair_tokenizer(config, tokenizer_dir_fallback)
    parts = source_splits(config, pair_tokenizer, config.split)
    train_stats = parts[0][1] if len(parts) == 1 else PreprocessStats.total([stats for _, stats in parts])
    source_pairs = [pairs for pairs, _ in parts]
    eval_pairs, eval_stats = None, None
    if config.eval_split is not None:
        eval_pairs, eval_stats = tokenized_split(config, pair_tokenizer, config.eval_split)
    elif config.eval_fraction > 0:  # out of each source before mixing: a repeated pair stays on one side
        held = [hold_out(pairs, config.eval_fraction, seed) for pairs in source_pairs]
        source_pairs = [train for train, _ in held]
        eval_pairs = datasets.concatenate_datasets([evaluation for _, evaluation in held])
    train_pairs, draws = mix(config.sources, source_pairs, seed)
    pad_id = pair_tokenizer.tokenizer.pad_id
    train_iterator = TrainPairIterator(train_pairs, global_batch_size, micro_batch_size, dp_rank, dp_size, seed,
                                       pad_id, layout)
    evaluation = (EvalPairs(eval_pairs, micro_batch_size, dp_rank, dp_size, pad_id, layout)
                  if eval_pairs is not None else None)
    stats = PreferenceDataStats(
        train=train_stats, eval=eval_stats, train_pairs=train_pairs.num_rows,
        mixture=draws if config.mixture else [],
        eval_pairs=eval_pairs.num_rows if eval_pairs is not None else 0,
        eval_pairs_dropped=evaluation.dropped_pairs if evaluation is not None else 0)
    return train_iterator, evaluation, stats
