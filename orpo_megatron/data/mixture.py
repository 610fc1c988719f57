"""Several preference sources in one run: which pairs of each source the training set holds.

Two forms, each with the semantics of where users know it from:
- Megatron-LM's blend, `--data-path 0.7 A 0.3 B`: the weights (normalized) are each source's share of the
  training pairs. The mixture has as many pairs as the sources together; a source whose share exceeds its size
  repeats all of its pairs as often as it fits and draws the rest by `--seed`; a smaller share is a draw by
  `--seed` without repetition.
- The alignment-handbook's `dataset_mixer`, `--dataset-mixer A=0.5 B=1.0`: each source keeps that fraction of its
  pairs, its first `int(fraction x pairs)` in source order, as `alignment.data.mix_datasets` does (the trainer
  shuffles the mixture every epoch, as it shuffles one source).
The result is one table of pairs; the trainer's epochs, order and resume position work on it as on one source.
Evaluation pairs are held out of each source before mixing, so a repeated pair never lands on both sides.
"""
from __future__ import annotations

import dataclasses
import math
import random

import datasets

from orpo_megatron.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MixtureSource:
    """One source of the mixture: a blend weight or a mixer fraction (neither for a single source)."""

    path: str
    weight: float | None = None
    fraction: float | None = None


@dataclasses.dataclass(frozen=True)
class SourceDraw:
    """What the mixture took from one source."""

    path: str
    pairs: int  # the source's good pairs (after hold-out)
    drawn: int  # pairs in the mixture, repetitions included

    def summary(self, share: str) -> str:
        return f"{self.path}: {self.drawn} of its {self.pairs} pairs ({share})"


def _number(text: str, flag: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{flag}: expected {what}, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{flag}: {what} must be a finite number > 0, got {text!r}")
    return value


def parse_sources(data_path: list[str] | None, dataset_mixer: list[str] | None) -> tuple[MixtureSource, ...]:
    """The sources named by `--data-path PATH`, `--data-path W1 PATH1 W2 PATH2 ...` or
    `--dataset-mixer PATH1=F1 PATH2=F2 ...`; errors name the flag and what was expected."""
    if dataset_mixer:
        if data_path:
            raise ConfigError("pass --data-path or --dataset-mixer, not both")
        sources = []
        for item in dataset_mixer:
            path, separator, fraction = item.rpartition("=")
            if not separator or not path:
                raise ConfigError(f"--dataset-mixer: expected PATH=FRACTION, got {item!r}")
            value = _number(fraction, "--dataset-mixer", f"the fraction of {path}")
            if value > 1:
                raise ConfigError(f"--dataset-mixer: the fraction of {path} must be at most 1 (a share of its "
                                 f"pairs), got {fraction}")
            sources.append(MixtureSource(path, fraction=value))
        return tuple(sources)
    if not data_path:
        raise ConfigError("--data-path is required")
    if len(data_path) == 1:
        return (MixtureSource(data_path[0]),)
    if len(data_path) % 2:
        raise ConfigError(f"--data-path with several sources takes weight-path pairs (W1 PATH1 W2 PATH2 ...), got "
                         f"{len(data_path)} values: {' '.join(data_path)}")
    return tuple(MixtureSource(path, weight=_number(weight, "--data-path", f"a weight before {path}"))
                 for weight, path in zip(data_path[::2], data_path[1::2]))


def _quotas(weights: list[float], total: int) -> list[int]:
    """`total` split in proportion to `weights`, rounded by largest remainder (so the quotas sum to `total`)."""
    exact = [total * weight / sum(weights) for weight in weights]
    quotas = [math.floor(share) for share in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (quotas[i] - exact[i], i))
    for i in by_remainder[: total - sum(quotas)]:
        quotas[i] += 1
    return quotas


def _draw(num_pairs: int, quota: int, seed: int, source_index: int) -> list[int]:
    """`quota` row positions of a source of `num_pairs`: every pair quota // num_pairs times, then a draw by the
    seed of the remainder without repetition; in source order."""
    repeats, rest = divmod(quota, num_pairs)
    drawn = random.Random(f"orpo-megatron-mixture-{seed}-{source_index}").sample(range(num_pairs), rest)
    return sorted(list(range(num_pairs)) * repeats + drawn)


def mix(sources: tuple[MixtureSource, ...], pairs: list[datasets.Dataset], seed: int
        ) -> tuple[datasets.Dataset, list[SourceDraw]]:
    """The training pairs of the mixture, and what each source gave."""
    if len(sources) == 1 and sources[0].weight is None and sources[0].fraction is None:
        return pairs[0], [SourceDraw(sources[0].path, pairs[0].num_rows, pairs[0].num_rows)]
    for source, table in zip(sources, pairs):
        if table.num_rows == 0:
            raise ConfigError(f"{source.path}: no training pairs to mix")
    if sources[0].fraction is not None:
        positions = [list(range(int(source.fraction * table.num_rows))) for source, table in zip(sources, pairs)]
    else:
        quotas = _quotas([source.weight for source in sources], sum(table.num_rows for table in pairs))
        positions = [_draw(table.num_rows, quota, seed, index)
                     for index, (table, quota) in enumerate(zip(pairs, quotas))]
    draws = [SourceDraw(source.path, table.num_rows, len(rows)) for source, table, rows in zip(sources, pairs, positions)]
    empty = [draw.path for draw in draws if draw.drawn == 0]
    if empty:
        raise ConfigError(f"the mixture takes no pair of {', '.join(empty)} (its share rounds to 0 pairs); raise its "
                         "weight or fraction, or leave it out")
    return datasets.concatenate_datasets([table.select(rows) for table, rows in zip(pairs, positions)]), draws
