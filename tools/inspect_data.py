"""Look at preference data before a big run: what tokenization keeps, cuts and drops, and what the model is trained on.

    python tools/inspect_data.py --data-path examples/data/capybara_style.jsonl --tokenizer CHECKPOINT_OR_TOKENIZER_DIR
        [--split train] [--chat-template zephyr] [--max-length 1024 --max-prompt-length 512] [--example N]

Prints the number of pairs, bad rows by reason (with the first row of each), whether --max-bad-row-fraction would
stop training, how many prompts/responses are truncated, length percentiles before and after truncation, and one
pair as the model sees it with the masked part (the prompt: no log-prob, no reward) marked. Takes the same data flags
as training and fills the same tokenization cache. With several sources (`--data-path W1 A W2 B`, or
`--dataset-mixer A=F1 B=F2`) it reports each, then the mixture: how many pairs each gives the training set.
"""
from __future__ import annotations

import argparse
import os
import sys

# Run from a checkout without installing: make the package next to tools/ importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MASK_OPEN, MASK_CLOSE = "[[", "]]"
PERCENTILES = (0, 50, 90, 95, 99, 100)


def build_parser() -> argparse.ArgumentParser:
    from orpo_megatron.data.arguments import add_data_args

    parser = argparse.ArgumentParser(prog="inspect_data.py", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_data_args(parser)
    parser.add_argument("--seed", type=int, default=1234,
                        help="The trainer's --seed: which pairs a --data-path blend draws. Default: 1234.")
    parser.add_argument("--example", type=int, default=0,
                        help="Which kept pair (position among the good pairs) to print rendered (default: 0).")
    return parser


def percentile_table(columns: dict[str, list[int]]) -> str:
    import numpy as np

    header = f"{'tokens':<28}" + "".join(f"{('p' + str(p)) if p not in (0, 100) else ('min', 'max')[p // 100]:>8}"
                                         for p in PERCENTILES)
    lines = [header]
    for name, values in columns.items():
        figures = np.percentile(np.asarray(values), PERCENTILES, method="nearest") if values else [0] * len(PERCENTILES)
        lines.append(f"{name:<28}" + "".join(f"{int(v):>8}" for v in figures))
    return "\n".join(lines)


def render_pair(tokenizer, pair: dict) -> str:
    """The chosen and rejected sequences with the prompt (masked) part between markers."""
    prompt = tokenizer.decode(pair["prompt_input_ids"])
    out = [f"row {pair['row_index']}: prompt {len(pair['prompt_input_ids'])} tokens"
           + (" (truncated)" if pair["prompt_truncated"] else "")]
    for name in ("chosen", "rejected"):
        completion_ids = pair[f"{name}_input_ids"]
        ending = "cut by truncation, no EOS" if pair[f"{name}_truncated"] else "ends with EOS"
        out.append(f"--- {name}: {len(completion_ids)} completion tokens, {ending}")
        out.append(MASK_OPEN + prompt + MASK_CLOSE + tokenizer.decode(completion_ids, starts_text=False))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from orpo_megatron.data.arguments import DataConfig
    from orpo_megatron.data.mixture import mix
    from orpo_megatron.data.pipeline import make_pair_tokenizer, tokenized_table
    from orpo_megatron.errors import UserError

    if args.tokenizer is None:
        print("inspect_data.py: --tokenizer is required (a folder with tokenizer.json or tokenizer.model)", file=sys.stderr)
        return 2
    try:
        config = DataConfig.from_args(args)
        pair_tokenizer = make_pair_tokenizer(config, None)
        tables = [tokenized_table(config, pair_tokenizer, config.split, source.path) for source in config.sources]
    except UserError as error:
        print(f"inspect_data.py: error: {error}", file=sys.stderr)
        return 1
    goods = [report(table, source, config, pair_tokenizer, args.example) for table, source in tables]
    if config.mixture:
        try:
            mixed, draws = mix(config.sources, goods, args.seed)
        except UserError as error:
            print(f"inspect_data.py: error: {error}", file=sys.stderr)
            return 1
        print(f"\nmixture ({'--dataset-mixer fractions' if config.mixture[0].fraction else '--data-path weights'}, "
              f"--seed {args.seed}): {mixed.num_rows} training pairs before any --eval-fraction hold-out")
        for source, draw in zip(config.sources, draws):
            share = f"fraction {source.fraction:g}" if source.fraction else f"weight {source.weight:g}"
            print(f"  {draw.summary(f'{share}; {draw.drawn / mixed.num_rows:.1%} of the mixture')}")
    return 0


def report(table, source: str, config, pair_tokenizer, example: int):
    """One source's rows, bad rows, truncation, lengths and an example; returns its good pairs."""
    from orpo_megatron.data.preference import BAD_ROW_REASONS

    reasons = list(table["bad_reason"])
    good = table.select([i for i, reason in enumerate(reasons) if not reason])
    print(f"{source}: {table.num_rows} rows, {good.num_rows} pairs kept")
    bad_total = table.num_rows - good.num_rows
    first_bad = {}
    for position, reason in enumerate(reasons):
        if reason and reason not in first_bad:
            first_bad[reason] = position
    print(f"bad rows: {bad_total}" + (" (none)" if not bad_total else ""))
    for reason, position in sorted(first_bad.items()):
        row = table[position]
        print(f"  {reason:<24}{reasons.count(reason):>6}  e.g. row {row['row_index']}: {row['bad_detail']}  "
              f"[{BAD_ROW_REASONS[reason]}]")
    if table.num_rows and bad_total / table.num_rows > config.max_bad_row_fraction:
        print(f"  training would STOP: {bad_total / table.num_rows:.1%} bad > --max-bad-row-fraction "
              f"{config.max_bad_row_fraction}")
    elif bad_total and config.on_bad_row == "error":
        print("  training would STOP at the first bad row (--on-bad-row error)")
    limits = config.truncation
    cut = {name: sum(good[f"{name}_truncated"]) for name in ("prompt", "chosen", "rejected")}
    print(f"truncation (--max-length {limits.max_length}, --max-prompt-length {limits.max_prompt_length}, "
          f"{limits.truncation_mode}): prompts {cut['prompt']}, chosen {cut['chosen']}, rejected {cut['rejected']} "
          f"of {good.num_rows} pairs")
    lengths = {name: good[name] for name in ("prompt_length_before", "chosen_length_before", "rejected_length_before")}
    lengths["pair_length_before"] = [p + max(c, r) for p, c, r in zip(*lengths.values())]
    lengths["sequence_length_after"] = [len(p) + max(len(c), len(r)) for p, c, r in zip(
        good["prompt_input_ids"], good["chosen_input_ids"], good["rejected_input_ids"])]
    print(percentile_table(lengths))
    if good.num_rows:
        example = min(max(example, 0), good.num_rows - 1)
        print(f"\nexample (masked prompt part between {MASK_OPEN} {MASK_CLOSE}):")
        print(render_pair(pair_tokenizer.tokenizer, good[example]))
    return good


if __name__ == "__main__":
    sys.exit(main())
