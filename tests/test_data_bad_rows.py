"""Bad rows: each kind is skipped and counted by default, stops the run naming the row with --on-bad-row error, and
too many of them stop the run."""
import json
import os

import pytest

from orpo_megatron.data.arguments import DataConfig
from orpo_megatron.data.pipeline import make_pair_tokenizer, tokenized_split
from orpo_megatron.data.preference import BAD_ROW_REASONS, BadRow, PairTokenizer, TruncationConfig
from orpo_megatron.data.preprocess import BadRowError

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "data")
GOOD_ROWS = 30
BAD_AT = 17
LONG_PROMPT = "<|user|>\n" + "Please tell me a long story about the quick brown fox and the lazy dog. " * 4


def _rows(name: str) -> list[dict]:
    with open(os.path.join(EXAMPLES, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f][:GOOD_ROWS]


def _pretokenized(tokenizer_dir: str) -> list[dict]:
    tokenizer = PairTokenizer(tokenizer_dir, None, TruncationConfig()).tokenizer
    return [{"prompt_input_ids": tokenizer.encode(r["prompt"]), "chosen_input_ids": tokenizer.encode(r["chosen"]),
             "rejected_input_ids": tokenizer.encode(r["rejected"])} for r in _rows("plain.jsonl")]


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


# reason -> (form of the good rows, the bad row, extra flags)
CASES = {
    "missing_field": ("capybara", {"prompt": "Q", "chosen": None, "rejected": [_user("Q"), _assistant("A")]}, {}),
    "wrong_type": ("pretokenized", {"prompt_input_ids": [1, 300], "chosen_input_ids": [300, 99999],
                                    "rejected_input_ids": [301]}, {}),
    "no_assistant_completion": ("capybara", {"prompt": "Q", "chosen": [_user("Q"), _user("again?")],
                                             "rejected": [_user("Q"), _user("again?")]}, {}),
    "prompt_mismatch": ("capybara", {"prompt": "Q", "chosen": [_user("Q"), _assistant("A")],
                                     "rejected": [_user("Other"), _assistant("B")]}, {}),
    "template_error": ("capybara", {"prompt": "Q", "chosen": [_user("Q"), _user("Q2"), _assistant("A")],
                                    "rejected": [_user("Q"), _user("Q2"), _assistant("B")]},
                       {"chat_template": "mistral"}),
    "empty_completion": ("plain", {"prompt": "<|user|>\nQ</s>\n<|assistant|>\n", "chosen": "  ", "rejected": "No."},
                         {}),
    "prompt_too_long": ("plain", {"prompt": LONG_PROMPT, "chosen": "Yes.", "rejected": "No."},
                        {"truncation": TruncationConfig(max_length=96, max_prompt_length=0)}),
    "chosen_equals_rejected": ("plain", {"prompt": "<|user|>\nQ</s>\n<|assistant|>\n", "chosen": "Same.</s>\n",
                                         "rejected": "Same.</s>\n"}, {}),
}


def test_every_reason_has_a_case():
    # unreadable lines (not UTF-8, not JSON) cannot be written as rows here: tests/test_user_errors.py has them
    assert set(CASES) | {"unreadable"} == set(BAD_ROW_REASONS)


def _write(tmp_path, tokenizer_dir, reason) -> tuple[str, dict]:
    form, bad_row, flags = CASES[reason]
    rows = {"capybara": lambda: _rows("capybara_style.jsonl"), "plain": lambda: _rows("plain.jsonl"),
            "pretokenized": lambda: _pretokenized(tokenizer_dir)}[form]()
    rows.insert(BAD_AT, bad_row)
    path = tmp_path / f"{reason}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path), flags


@pytest.mark.parametrize("reason", sorted(CASES))
def test_bad_row_is_counted_by_default_and_named_under_error_policy(tmp_path, tiny_mixtral, reason):
    path, flags = _write(tmp_path, tiny_mixtral, reason)
    config = DataConfig(data_path=path, cache_dir=str(tmp_path / "cache"), max_bad_row_fraction=0.1, **flags)
    pair_tokenizer = make_pair_tokenizer(config, tiny_mixtral)
    pairs, stats = tokenized_split(config, pair_tokenizer, "train")
    assert stats.bad_rows == {reason: 1}
    assert (stats.rows, stats.pairs, pairs.num_rows) == (GOOD_ROWS + 1, GOOD_ROWS, GOOD_ROWS)
    assert BAD_AT not in pairs["row_index"]
    strict = DataConfig(data_path=path, cache_dir=str(tmp_path / "cache"), on_bad_row="error", **flags)
    with pytest.raises(BadRowError, match=rf"row {BAD_AT} is bad \({reason}: "):
        tokenized_split(strict, pair_tokenizer, "train")


def test_more_bad_rows_than_allowed_stops_the_run(tmp_path, tiny_mixtral):
    rows = _rows("plain.jsonl")
    rows[3] = dict(rows[3], rejected=rows[3]["chosen"])
    rows[9] = dict(rows[9], chosen=" ")
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = DataConfig(data_path=str(path), cache_dir=str(tmp_path / "cache"))  # 2/30 > 0.05
    with pytest.raises(BadRowError, match=r"2 of 30 rows are bad .*--max-bad-row-fraction 0.05"):
        tokenized_split(config, make_pair_tokenizer(config, tiny_mixtral), "train")


def test_wrong_python_types_are_bad_rows(tiny_mixtral):
    """Types a JSON column cannot mix but in-memory datasets can."""
    pair_tokenizer = PairTokenizer(tiny_mixtral, None, TruncationConfig())
    for row in ({"prompt": ["not", "messages"], "chosen": "a", "rejected": "b"},
                {"prompt": "Q", "chosen": 3, "rejected": "b"},
                {"prompt": "Q", "chosen": [{"role": "assistant", "content": 5}], "rejected": [_assistant("b")]},
                {"prompt": "Q", "chosen": [_assistant(["not", "blocks"])], "rejected": [_assistant("b")]},
                {"prompt": "Q", "chosen": [_assistant("a")], "rejected": [_assistant("b")],
                 "chat_template_kwargs": ["enable_thinking"]},
                {"prompt_input_ids": [1, 2.5], "chosen_input_ids": [300], "rejected_input_ids": [301]}):
        with pytest.raises(BadRow) as bad:
            pair_tokenizer(row)
        assert bad.value.reason == "wrong_type", row


def test_content_blocks_without_text_are_an_empty_completion(tiny_mixtral):
    pair_tokenizer = PairTokenizer(tiny_mixtral, "{{ messages | tojson }}", TruncationConfig())
    row = {"prompt": "Q", "chosen": [_assistant([{"type": "image"}, {"type": "text", "text": " "}])],
           "rejected": [_assistant([{"type": "text", "text": "b"}])]}
    with pytest.raises(BadRow, match="empty_completion: chosen assistant turn is empty"):
        pair_tokenizer(row)


def test_dataset_without_preference_columns_is_a_clear_error(tmp_path, tiny_mixtral):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "Q", "answer": "A"}) + "\n")
    config = DataConfig(data_path=str(path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"expected columns prompt/chosen/rejected.*found \['question', 'answer'\]"):
        tokenized_split(config, make_pair_tokenizer(config, tiny_mixtral), "train")
