"""Tokenize a preference dataset once (`datasets.map`, multiprocess, cached) and apply the bad-row policy.

Owns the tokenized table (one row per source row: ids, lengths, truncation flags, `bad_reason`), its cache key
(source content digest + tokenizer files + chat template + truncation settings + this package's tokenization code),
the bad-row policy (`skip` and count by reason, or `error` naming the first bad row; stop above
`max_bad_row_fraction` either way) and the statistics the trainer logs. Row-level rules live in `preference.py`.

Every DP rank calls this: the first one to finish writes the cache, the others read it. On a shared filesystem let
one rank run it first (then a barrier) so the others only read.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os

import datasets

from orpo_megatron.data import chat_template as chat_template_module
from orpo_megatron.data import preference, tokenizer as tokenizer_module
from orpo_megatron.data.preference import BadRow, PairTokenizer
from orpo_megatron.data.sources import SourceSplit
from orpo_megatron.errors import DataError

TOKENIZED_FEATURES = datasets.Features({
    "row_index": datasets.Value("int64"),
    "bad_reason": datasets.Value("string"),
    "bad_detail": datasets.Value("string"),
    "prompt_input_ids": datasets.List(datasets.Value("int32")),
    "chosen_input_ids": datasets.List(datasets.Value("int32")),
    "rejected_input_ids": datasets.List(datasets.Value("int32")),
    "prompt_length_before": datasets.Value("int32"),
    "chosen_length_before": datasets.Value("int32"),
    "rejected_length_before": datasets.Value("int32"),
    "prompt_truncated": datasets.Value("bool"),
    "chosen_truncated": datasets.Value("bool"),
    "rejected_truncated": datasets.Value("bool"),
})


class BadRowError(DataError):
    """The bad-row policy stopped the run."""


@dataclasses.dataclass
class PreprocessStats:
    """What tokenization did to one split; the trainer logs it."""
    source: str
    rows: int
    pairs: int
    bad_rows: dict[str, int]
    prompt_truncated: int
    chosen_truncated: int
    rejected_truncated: int

    @classmethod
    def total(cls, parts: list[PreprocessStats]) -> PreprocessStats:
        """The counts of several sources' splits together."""
        bad_rows: dict[str, int] = {}
        for part in parts:
            for reason, count in part.bad_rows.items():
                bad_rows[reason] = bad_rows.get(reason, 0) + count
        return cls(" + ".join(part.source for part in parts), sum(part.rows for part in parts),
                   sum(part.pairs for part in parts), bad_rows,
                   *(sum(getattr(part, name) for part in parts)
                     for name in ("prompt_truncated", "chosen_truncated", "rejected_truncated")))

    def summary(self) -> str:
        bad = ", ".join(f"{reason} {count}" for reason, count in sorted(self.bad_rows.items())) or "none"
        return (f"{self.source}: {self.pairs} pairs from {self.rows} rows; bad rows skipped: {bad}; truncated: "
                f"prompts {self.prompt_truncated}, chosen {self.chosen_truncated}, rejected {self.rejected_truncated}")


def _tokenize_batch(batch: dict[str, list], indices: list[int], pair_tokenizer: PairTokenizer,
                    columns: tuple[str, ...]) -> dict[str, list]:
    out = {name: [] for name in TOKENIZED_FEATURES}
    for position, row_index in enumerate(indices):
        row = {name: batch[name][position] for name in columns}
        out["row_index"].append(row_index)
        try:
            pair = pair_tokenizer(row)
        except BadRow as bad:
            values = {"bad_reason": bad.reason, "bad_detail": bad.detail, "prompt_input_ids": [],
                      "chosen_input_ids": [], "rejected_input_ids": [], "prompt_length_before": 0,
                      "chosen_length_before": 0, "rejected_length_before": 0, "prompt_truncated": False,
                      "chosen_truncated": False, "rejected_truncated": False}
        else:
            values = {"bad_reason": "", "bad_detail": "", "prompt_input_ids": pair.prompt_ids,
                      "chosen_input_ids": pair.chosen_ids, "rejected_input_ids": pair.rejected_ids,
                      **{name: getattr(pair, name) for name in (
                          "prompt_length_before", "chosen_length_before", "rejected_length_before",
                          "prompt_truncated", "chosen_truncated", "rejected_truncated")}}
        for name, value in values.items():
            out[name].append(value)
    return out


def _file_digest(path: str) -> str:
    if not os.path.isfile(path):
        return "absent"
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def cache_key(source_digest: str, pair_tokenizer: PairTokenizer) -> str:
    """Changes whenever the source content, tokenizer, template, truncation settings or tokenization code change."""
    code = [module.__file__ for module in (preference, tokenizer_module, chat_template_module)] + [__file__]
    parts = {
        "source": source_digest,
        "tokenizer": [_file_digest(os.path.join(pair_tokenizer.tokenizer_dir, name))
                      for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                                   "chat_template.jinja")],
        "chat_template": pair_tokenizer.chat_template,
        "chat_template_kwargs": pair_tokenizer.chat_template_kwargs,
        "truncation": dataclasses.asdict(pair_tokenizer.truncation),
        "code": [_file_digest(path) for path in code],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def tokenize_dataset(source: SourceSplit, pair_tokenizer: PairTokenizer, cache_dir: str, num_proc: int,
                     description: str) -> datasets.Dataset:
    """The tokenized table of every row (bad ones included, with their reason), cached in `cache_dir`."""
    dataset = source.rows
    try:
        columns = preference.required_columns(dataset.column_names)
    except ValueError as err:
        raise DataError(f"{description}: {err}") from None
    key = cache_key(source.digest, pair_tokenizer)
    os.makedirs(cache_dir, exist_ok=True)
    return dataset.map(
        _tokenize_batch, fn_kwargs={"pair_tokenizer": pair_tokenizer, "columns": columns},
        with_indices=True, batched=True, batch_size=256, remove_columns=dataset.column_names,
        features=TOKENIZED_FEATURES, num_proc=num_proc if num_proc > 1 and len(dataset) > 1 else None,
        cache_file_name=os.path.join(cache_dir, f"preference-{key}.arrow"), new_fingerprint=key,
        load_from_cache_file=True, desc=f"Tokenizing {description}")


def apply_bad_row_policy(tokenized: datasets.Dataset, source: str, on_bad_row: str,
                         max_bad_row_fraction: float) -> tuple[datasets.Dataset, PreprocessStats]:
    """Keep the good pairs (in source order) or stop, as the policy says; count what happened."""
    reasons = list(tokenized["bad_reason"])
    bad_positions = [position for position, reason in enumerate(reasons) if reason]
    if bad_positions and on_bad_row == "error":
        first = tokenized[bad_positions[0]]
        raise BadRowError(f"{source}: row {first['row_index']} is bad ({first['bad_reason']}: {first['bad_detail']}); "
                          f"{len(bad_positions)} bad rows in all. Fix the data, or pass --on-bad-row skip to drop "
                          "them")
    bad_counts = dict(collections.Counter(reasons[p] for p in bad_positions))
    if tokenized.num_rows and len(bad_positions) / tokenized.num_rows > max_bad_row_fraction:
        first = tokenized[bad_positions[0]]
        raise BadRowError(f"{source}: {len(bad_positions)} of {tokenized.num_rows} rows are bad ({bad_counts}), more "
                          f"than --max-bad-row-fraction {max_bad_row_fraction} (the first: row {first['row_index']}, "
                          f"{first['bad_reason']}: {first['bad_detail']}); check the columns and the chat template"
                          " with tools/inspect_data.py")
    good = tokenized.select([p for p, reason in enumerate(reasons) if not reason]) if bad_positions else tokenized
    stats = PreprocessStats(
        source=source, rows=tokenized.num_rows, pairs=good.num_rows, bad_rows=bad_counts,
        prompt_truncated=sum(good["prompt_truncated"]), chosen_truncated=sum(good["chosen_truncated"]),
        rejected_truncated=sum(good["rejected_truncated"]))
    return good, stats
