"""Row tokenization: the three input forms agree, the split and EOS follow transformers' own tokenization of the
rendered conversation, and truncation keeps every completion non-empty with its EOS unless it was cut."""
import json
import os
import random

import pytest
import torch
from transformers import LlamaTokenizer

from orpo_megatron.data.micro_batch import MicroBatch, padded_micro_batch
from orpo_megatron.data.chat_template import ZEPHYR
from orpo_megatron.data.preference import BadRow, PairTokenizer, TruncationConfig

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "data")
EXTRA_CONVERSATIONS = [  # a system turn and a whitespace-heavy answer, on top of the shipped examples
    {"prompt": "ignored", "chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello  there,\n friend!"}],
     "rejected": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Go away."}]},
]


def _read_jsonl(name: str) -> list[dict]:
    with open(os.path.join(EXAMPLES, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _batch(pair_tokenizer: PairTokenizer, rows: list[dict]) -> MicroBatch:
    pairs = [pair_tokenizer(row) for row in rows]
    columns = {"row_index": list(range(len(pairs))), "prompt_input_ids": [p.prompt_ids for p in pairs],
               "chosen_input_ids": [p.chosen_ids for p in pairs], "rejected_input_ids": [p.rejected_ids for p in pairs]}
    return padded_micro_batch(columns, pad_id=pair_tokenizer.tokenizer.pad_id)


@pytest.fixture(scope="module")
def reference(tiny_mixtral):
    return LlamaTokenizer.from_pretrained(tiny_mixtral)


@pytest.fixture(scope="module")
def capybara_rows():
    return _read_jsonl("capybara_style.jsonl") + EXTRA_CONVERSATIONS


def _reference_forms(reference, rows):
    """Plain-text and pre-tokenized copies of the capybara rows, made with transformers only."""
    plain, pretokenized = [], []
    for row in rows:
        history = row["chosen"][:-1]
        prompt = reference.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        prompt_ids = reference(prompt, add_special_tokens=False)["input_ids"]
        texts, completion_ids = {}, {}
        for name in ("chosen", "rejected"):
            full = reference.apply_chat_template(history + row[name][-1:], tokenize=False)
            full_ids = reference(full, add_special_tokens=False)["input_ids"]
            assert full.startswith(prompt) and full_ids[:len(prompt_ids)] == prompt_ids
            texts[name], completion_ids[name] = full[len(prompt):], full_ids[len(prompt_ids):]
        plain.append({"prompt": prompt, **texts})
        pretokenized.append({"prompt_input_ids": prompt_ids, "chosen_input_ids": completion_ids["chosen"],
                             "rejected_input_ids": completion_ids["rejected"]})
    return plain, pretokenized


def test_capybara_plain_and_pretokenized_forms_give_identical_ids_and_masks(tiny_mixtral, reference, capybara_rows):
    pair_tokenizer = PairTokenizer(tiny_mixtral, ZEPHYR, TruncationConfig())
    plain, pretokenized = _reference_forms(reference, capybara_rows)
    from_capybara = _batch(pair_tokenizer, capybara_rows)
    for other in (plain, pretokenized):
        batch = _batch(pair_tokenizer, other)
        for key in ("input_ids", "padding_mask", "completion_targets"):
            assert torch.equal(getattr(batch, key), getattr(from_capybara, key)), key
    # The committed plain copy of the shipped pairs.
    shipped = _batch(pair_tokenizer, _read_jsonl("capybara_style.jsonl"))
    shipped_plain = _batch(pair_tokenizer, _read_jsonl("plain.jsonl"))
    for key in ("input_ids", "padding_mask", "completion_targets"):
        assert torch.equal(getattr(shipped_plain, key), getattr(shipped, key)), key


def test_sequences_are_transformers_ids_of_the_rendered_conversation(tiny_mixtral, reference, capybara_rows):
    """Row = BOS + ids of the whole rendered conversation, without the newline the template prints after the
    final EOS; the completion mask starts where the generation prompt ends."""
    pair_tokenizer = PairTokenizer(tiny_mixtral, ZEPHYR, TruncationConfig())
    newline = reference.convert_tokens_to_ids("<0x0A>")
    for row in capybara_rows:
        pair = pair_tokenizer(row)
        prompt = reference.apply_chat_template(row["chosen"][:-1], tokenize=False, add_generation_prompt=True)
        assert pair.prompt_ids == reference(prompt)["input_ids"]  # BOS added, as add_bos_token says
        for name, completion in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            full = reference(reference.apply_chat_template(row[name], tokenize=False))["input_ids"]
            assert full[-2:] == [reference.eos_token_id, newline]
            assert pair.prompt_ids + completion == full[:-1]
            assert completion.count(reference.eos_token_id) == 1 and completion[-1] == reference.eos_token_id


def test_eos_is_appended_once_and_template_whitespace_after_it_dropped(tiny_mixtral):
    pair_tokenizer = PairTokenizer(tiny_mixtral, None, TruncationConfig())
    tokenizer = pair_tokenizer.tokenizer
    eos = tokenizer.eos_id
    pair = pair_tokenizer({"prompt": "Q: capital of France?", "chosen": " Paris.", "rejected": " Rome.</s>"})
    assert pair.chosen_ids == tokenizer.encode("Q: capital of France? Paris.")[len(pair.prompt_ids) - 1:] + [eos]
    assert pair.rejected_ids[-1] == eos and pair.rejected_ids.count(eos) == 1
    pair = pair_tokenizer({"prompt": "Q", "chosen": " A</s>\n \n", "rejected": " B</s>x"})
    assert pair.chosen_ids[-1] == eos and pair.chosen_ids.count(eos) == 1
    # Text after an EOS that is not whitespace is content: EOS closes it again.
    assert pair.rejected_ids[-2:] == [tokenizer.encode("Q B</s>x")[-1], eos] and pair.rejected_ids.count(eos) == 2


def test_split_is_exact_when_a_token_straddles_the_prompt_boundary(tiny_mixtral):
    pair_tokenizer = PairTokenizer(tiny_mixtral, None, TruncationConfig())
    tokenizer = pair_tokenizer.tokenizer
    prompt_alone, joint = tokenizer.encode("Hell"), tokenizer.encode("Hello")
    assert joint[:-1] == prompt_alone[:-1] and joint[-1] != prompt_alone[-1]  # the premise: 'l' + 'o' merge
    pair = pair_tokenizer({"prompt": "Hell", "chosen": "o", "rejected": "o there"})
    assert pair.prompt_ids + pair.chosen_ids == [tokenizer.bos_id] + joint + [tokenizer.eos_id]
    expected = [tokenizer.bos_id] + tokenizer.encode("Hello there") + [tokenizer.eos_id]
    assert pair.prompt_ids + pair.rejected_ids == expected


# -- truncation --------------------------------------------------------------------------------------------------

def _content_ids(tokenizer, count: int, start: int) -> list[int]:
    """`count` distinct ids that are neither special nor whitespace."""
    usable = [i for i in range(3, tokenizer.vocab_size) if i not in tokenizer.whitespace_ids]
    return usable[start:start + count]


@pytest.fixture(scope="module")
def truncating(tiny_mixtral):
    def make(mode="keep_end", max_length=40, max_prompt_length=20):
        return PairTokenizer(tiny_mixtral, None, TruncationConfig(max_length, max_prompt_length, mode))
    return make


def _pretokenized(prompt, chosen, rejected):
    return {"prompt_input_ids": prompt, "chosen_input_ids": chosen, "rejected_input_ids": rejected}


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_prompt_longer_than_limit_is_cut_per_mode_and_responses_get_their_own_budget(truncating, mode):
    pair_tokenizer = truncating(mode)
    tok = pair_tokenizer.tokenizer
    bos, eos = tok.bos_id, tok.eos_id
    prompt, chosen, rejected = (_content_ids(tok, 30, 0), _content_ids(tok, 5, 100), _content_ids(tok, 30, 200))
    pair = pair_tokenizer(_pretokenized(prompt, chosen, rejected))
    full_prompt = [bos] + prompt  # 31 tokens > max_prompt_length 20
    expected_prompt = [bos] + full_prompt[-19:] if mode == "keep_end" else full_prompt[:20]
    assert pair.prompt_ids == expected_prompt and pair.prompt_truncated
    # budget 40 - 20 = 20 for each response on its own: the short one keeps its EOS, the long one is cut.
    assert pair.chosen_ids == chosen + [eos] and not pair.chosen_truncated
    assert pair.rejected_ids == rejected[:20] and pair.rejected_truncated
    assert (pair.prompt_length_before, pair.chosen_length_before, pair.rejected_length_before) == (31, 6, 31)


def test_prompt_longer_than_max_length_still_leaves_completion_room(truncating):
    pair_tokenizer = truncating("keep_end")
    tok = pair_tokenizer.tokenizer
    prompt = _content_ids(tok, 60, 0)
    pair = pair_tokenizer(_pretokenized(prompt, _content_ids(tok, 3, 100), _content_ids(tok, 4, 200)))
    assert pair.prompt_ids == [tok.bos_id] + prompt[-19:]
    assert pair.chosen_ids[-1] == tok.eos_id and pair.rejected_ids[-1] == tok.eos_id


def test_response_budget_is_max_length_minus_actual_prompt(truncating):
    """TRL cut both responses to max_length - max_prompt_length (<=0.27) or max_length - longer response (>=0.28)."""
    pair_tokenizer = truncating("keep_end")
    tok = pair_tokenizer.tokenizer
    prompt, chosen, rejected = _content_ids(tok, 5, 0), _content_ids(tok, 38, 100), _content_ids(tok, 3, 200)
    pair = pair_tokenizer(_pretokenized(prompt, chosen, rejected))
    assert pair.prompt_ids == [tok.bos_id] + prompt and not pair.prompt_truncated
    assert pair.chosen_ids == chosen[:34] and pair.chosen_truncated  # 40 - 6
    assert pair.rejected_ids == rejected + [tok.eos_id] and not pair.rejected_truncated


def test_pair_that_fits_is_untouched_even_with_a_long_prompt(truncating):
    pair_tokenizer = truncating("keep_start")
    tok = pair_tokenizer.tokenizer
    prompt, chosen, rejected = _content_ids(tok, 25, 0), _content_ids(tok, 5, 100), _content_ids(tok, 7, 200)
    pair = pair_tokenizer(_pretokenized(prompt, chosen, rejected))
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == ([tok.bos_id] + prompt, chosen + [tok.eos_id],
                                                                      rejected + [tok.eos_id])


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_truncation_invariants_on_random_lengths(truncating, mode):
    pair_tokenizer = truncating(mode, max_length=48, max_prompt_length=16)
    tok = pair_tokenizer.tokenizer
    rng = random.Random(mode)
    for _ in range(300):
        prompt = _content_ids(tok, rng.randint(0, 70), 0)
        chosen, rejected = _content_ids(tok, rng.randint(1, 70), 100), _content_ids(tok, rng.randint(1, 70), 200)
        pair = pair_tokenizer(_pretokenized(prompt, chosen, rejected))
        full_prompt = [tok.bos_id] + prompt
        assert pair.prompt_ids[0] == tok.bos_id
        if mode == "keep_start":
            assert pair.prompt_ids == full_prompt[:len(pair.prompt_ids)]
        else:
            assert pair.prompt_ids[1:] == full_prompt[len(full_prompt) - len(pair.prompt_ids) + 1:]
        assert len(pair.prompt_ids) in (len(full_prompt), 16)
        for original, completion, cut in ((chosen, pair.chosen_ids, pair.chosen_truncated),
                                          (rejected, pair.rejected_ids, pair.rejected_truncated)):
            assert completion and len(pair.prompt_ids) + len(completion) <= 48
            assert (original + [tok.eos_id])[:len(completion)] == completion
            assert (completion[-1] == tok.eos_id) == (not cut)
            assert cut == (len(pair.prompt_ids) + len(original) + 1 > 48)


def test_no_prompt_truncation_makes_too_long_prompts_bad_rows(truncating):
    pair_tokenizer = truncating("keep_end", max_length=40, max_prompt_length=0)
    tok = pair_tokenizer.tokenizer
    with pytest.raises(BadRow) as bad:
        pair_tokenizer(_pretokenized(_content_ids(tok, 45, 0), _content_ids(tok, 3, 100), _content_ids(tok, 3, 200)))
    assert bad.value.reason == "prompt_too_long"
    pair = pair_tokenizer(_pretokenized(_content_ids(tok, 38, 0), _content_ids(tok, 3, 100), _content_ids(tok, 3, 200)))
    assert len(pair.prompt_ids) == 39 and len(pair.chosen_ids) == 1 and pair.chosen_truncated


def test_responses_equal_after_truncation_are_bad_rows(truncating):
    pair_tokenizer = truncating("keep_end")
    tok = pair_tokenizer.tokenizer
    shared = _content_ids(tok, 30, 100)
    with pytest.raises(BadRow) as bad:
        pair_tokenizer(_pretokenized(_content_ids(tok, 25, 0), shared + [5], shared + [6]))
    assert bad.value.reason == "chosen_equals_rejected"


def test_truncation_settings_are_validated():
    with pytest.raises(ValueError, match="--max-prompt-length"):
        TruncationConfig(max_length=100, max_prompt_length=100)
    with pytest.raises(ValueError, match="--truncation-mode"):
        TruncationConfig(truncation_mode="keep_middle")
