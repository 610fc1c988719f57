"""Command-line flags of the data layer and their validated config.

Owns `add_data_args(parser)` (data flags, and the packing flags of `add_packing_args`) and `DataConfig`. Batch
sizes and `--seed` are the trainer's flags (Megatron names); the objective's flags (e.g. `--no-nll-on-prompt`)
are not here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json


from orpo_megatron.data.chat_template import BUILTIN_TEMPLATES
from orpo_megatron.data.mixture import MixtureSource, parse_sources
from orpo_megatron.data.preference import TRUNCATION_MODES, TruncationConfig
from orpo_megatron.data.sources import check_present, default_cache_dir
from orpo_megatron.errors import ConfigError

BAD_ROW_POLICIES = ("skip", "error")


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("preference data")
    group.add_argument("--data-path", type=str, nargs="+", default=None,
                       help="Preference data: a .json/.jsonl/.parquet file or folder, a folder written by "
                            "datasets' save_to_disk, or a Hub dataset name already in the local datasets cache. Rows "
                            "hold prompt/chosen/rejected as text or message lists, or prompt_input_ids/"
                            "chosen_input_ids/rejected_input_ids. Several sources as Megatron-LM blends them: "
                            "`W1 PATH1 W2 PATH2 ...`, each weight a source's share of the training pairs "
                            "(see orpo_megatron/data/mixture.py).")
    group.add_argument("--dataset-mixer", type=str, nargs="+", default=None, metavar="PATH=FRACTION",
                       help="Instead of --data-path, the alignment-handbook's dataset_mixer: each source keeps that "
                            "fraction (0-1] of its pairs, its first ones in source order.")
    group.add_argument("--split", type=str, default="train", help="Split to train on (default: train).")
    group.add_argument("--eval-split", type=str, default=None,
                       help="Split of --data-path to evaluate on (default: none; see --eval-fraction).")
    group.add_argument("--eval-fraction", type=float, default=0.0,
                       help="Fraction of the training pairs held out for evaluation, chosen by --seed, when there is "
                            "no --eval-split (default: 0, no evaluation).")
    group.add_argument("--tokenizer", type=str, default=None,
                       help="Folder with tokenizer.json (any kind the tokenizers library reads: byte-level BPE of "
                            "Llama-3/Qwen, ...) or a sentencepiece tokenizer.model, and tokenizer_config.json "
                            "(default: the tokenizer stored "
                            "with the loaded checkpoint).")
    group.add_argument("--chat-template", type=str, default=None,
                       help=f"Chat template for message-list rows: one of {sorted(BUILTIN_TEMPLATES)} or a jinja "
                            "file (default: the template in tokenizer_config.json).")
    group.add_argument("--chat-template-kwargs", type=str, default=None,
                       help="JSON object of extra chat template variables for every row, e.g. "
                            "'{\"enable_thinking\": false}' for Qwen3; a row's own chat_template_kwargs column "
                            "(TRL's) wins over it key by key (default: none).")
    group.add_argument("--max-length", type=int, default=1024,
                       help="Longest prompt + completion in tokens; longer completions are cut (default: 1024).")
    group.add_argument("--max-prompt-length", type=int, default=512,
                       help="When a pair is longer than --max-length, its prompt is first cut to this many tokens; "
                            "0 never cuts prompts (pairs whose prompt leaves no room are skipped) (default: 512).")
    group.add_argument("--truncation-mode", choices=TRUNCATION_MODES, default="keep_end",
                       help="Which end of a too-long prompt to keep (default: keep_end).")
    group.add_argument("--on-bad-row", choices=BAD_ROW_POLICIES, default="skip",
                       help="skip: drop bad rows and count them by reason; error: stop at the first one, naming the "
                            "row and the reason (default: skip).")
    group.add_argument("--max-bad-row-fraction", type=float, default=0.05,
                       help="Stop when more than this fraction of a split's rows is bad (default: 0.05).")
    group.add_argument("--data-num-workers", type=int, default=1,
                       help="Processes used to tokenize the data once (default: 1).")
    group.add_argument("--data-cache-dir", type=str, default=None,
                       help="Where tokenized data is cached (default: $HF_DATASETS_CACHE/orpo_megatron).")

    add_packing_args(parser)
    return parser


def add_packing_args(parser: argparse.ArgumentParser) -> None:
    """How pairs become micro-batch rows (shared with tools/estimate_memory.py's time prediction)."""
    group = parser.add_argument_group("packing")
    group.add_argument("--no-packing", dest="packing", action="store_false",
                       help="Pad each pair's chosen and rejected sequences into rows of one length instead of packing "
                            "a micro-batch's sequences into one padding-free row (attention and RoPE restart at "
                            "every sequence, so the results are the same).")
    group.add_argument("--packed-length", type=int, default=None,
                       help="Pack each step's pairs whole into rows of this many tokens, one micro-batch per row "
                            "(--micro-batch-size is then unused), the same number of rows on every data-parallel "
                            "rank. Always done with pipeline parallelism (which needs one row shape per step) unless "
                            "--no-packing, which pads each step's micro-batches to one shape instead. "
                            "Default: without pipelining one row per micro-batch of its own length; with it, the "
                            "longest pair of the training split (prompt + chosen + prompt + rejected).")


def check_packing_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.packed_length is not None and (not args.packing or args.packed_length < 2):
        parser.error(f"--packed-length {args.packed_length} needs packing (no --no-packing) and at least 2 tokens")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    data_path: str | None = None  # one source; `mixture` for several
    split: str = "train"
    eval_split: str | None = None
    eval_fraction: float = 0.0
    tokenizer: str | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict = dataclasses.field(default_factory=dict)
    truncation: TruncationConfig = TruncationConfig()
    on_bad_row: str = "skip"
    max_bad_row_fraction: float = 0.05
    num_workers: int = 1
    cache_dir: str = dataclasses.field(default_factory=default_cache_dir)
    mixture: tuple[MixtureSource, ...] = ()

    def __post_init__(self):
        if not self.data_path and not self.mixture:
            raise ConfigError("--data-path is required")
        if self.eval_split is not None and self.eval_fraction:
            raise ConfigError("pass --eval-split or --eval-fraction, not both")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.on_bad_row not in BAD_ROW_POLICIES:
            raise ConfigError(f"--on-bad-row must be one of {BAD_ROW_POLICIES}, got {self.on_bad_row!r}")
        if not 0.0 <= self.max_bad_row_fraction <= 1.0:
            raise ConfigError(f"--max-bad-row-fraction must be in [0, 1], got {self.max_bad_row_fraction}")
        if not isinstance(self.chat_template_kwargs, dict):
            raise ConfigError(f"--chat-template-kwargs must be a JSON object, got {self.chat_template_kwargs!r}")
        if self.num_workers < 1:
            raise ConfigError(f"--data-num-workers must be at least 1, got {self.num_workers}")

    @property
    def sources(self) -> tuple[MixtureSource, ...]:
        return self.mixture or (MixtureSource(self.data_path),)

    def check_present(self) -> None:
        """Every source exists (a file, a folder or a cached Hub dataset), before minutes of model building."""
        for source in self.sources:
            check_present(source.path)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DataConfig:
        cache_dir = args.data_cache_dir or default_cache_dir()
        try:
            template_kwargs = json.loads(args.chat_template_kwargs) if args.chat_template_kwargs else {}
        except json.JSONDecodeError as error:
            raise ConfigError(f"--chat-template-kwargs is not JSON ({error}): {args.chat_template_kwargs!r}") from None
        sources = parse_sources(args.data_path, getattr(args, "dataset_mixer", None))
        plain = len(sources) == 1 and sources[0] == MixtureSource(sources[0].path)
        return cls(data_path=sources[0].path if plain else None, mixture=() if plain else sources,
                   split=args.split, eval_split=args.eval_split,
                   eval_fraction=args.eval_fraction, tokenizer=args.tokenizer, chat_template=args.chat_template,
                   chat_template_kwargs=template_kwargs,
                   truncation=TruncationConfig(args.max_length, args.max_prompt_length, args.truncation_mode),
                   on_bad_row=args.on_bad_row, max_bad_row_fraction=args.max_bad_row_fraction,
                   num_workers=args.data_num_workers, cache_dir=cache_dir)
