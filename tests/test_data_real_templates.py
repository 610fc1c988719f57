"""Real chat templates x both tokenizer kinds: our pairs against transformers' `apply_chat_template` + tokenization of
the same conversation, and against TRL's prompt/completion texts.

Each template gets a tokenizer folder of each kind (the tiny sentencepiece model, the tiny Qwen3-style byte-level
tokenizer.json) with the model's own BOS/EOS and control tokens as special tokens (Phi-3's with `rstrip`, as it
ships them, in the tokenizer.json kind: the sentencepiece kind refuses stripping tokens).
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys

import datasets
import pytest
from tokenizers import AddedToken, Tokenizer
from transformers import AutoTokenizer, LlamaTokenizer
from trl.data_utils import apply_chat_template as trl_apply_chat_template

from orpo_megatron import tiny_model
from orpo_megatron.data.chat_template import ZEPHYR
from orpo_megatron.data.preference import BadRow, PairTokenizer, TruncationConfig

TESTS = os.path.dirname(os.path.abspath(__file__))
TEMPLATE_DIR = os.path.join(TESTS, "fixtures", "chat_templates")
EXAMPLES = os.path.join(os.path.dirname(TESTS), "examples", "data")

# template -> (bos_token, eos_token, control tokens its model's tokenizer has as special tokens); as the models'
# tokenizer_config.json name them.
TEMPLATES = {
    "zephyr": ("<s>", "</s>", ()),
    "llama3_1": ("<|begin_of_text|>", "<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>")),
    "qwen2_5": (None, "<|im_end|>", ("<|im_start|>",)),
    "qwen3": (None, "<|im_end|>", ("<|im_start|>",)),
    "qwen3_training": (None, "<|im_end|>", ("<|im_start|>",)),
    "gemma": ("<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>")),
    "gemma3": ("<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>")),
    "phi3": ("<s>", "<|endoftext|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
    "deepseek_r1_distill": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ("<｜User｜>", "<｜Assistant｜>")),
}
RSTRIP_TOKENS = {"<|system|>", "<|user|>", "<|assistant|>", "<|end|>"}  # Phi-3's added tokens strip the newline after
# What each template cannot render of _rows(), in its own words: Gemma-2's refuses system turns; Gemma-3's and
# Llama-3.1's read content blocks; the others concatenate content as a string, so the content-block row fails.
REPORTED = {"gemma": ["System role not supported"] * 2, "gemma3": [], "llama3_1": []}
# Templates whose generation prompt opens a think block that past turns do not have: the prompt is the common prefix.
THINK_PREFILL = {"deepseek_r1_distill"}


def _template(name: str) -> str:
    if name == "zephyr":
        return ZEPHYR
    with open(os.path.join(TEMPLATE_DIR, f"{name}.jinja"), encoding="utf-8") as f:
        return f.read()


def _rows() -> list[dict]:
    with open(os.path.join(EXAMPLES, "capybara_style.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(8), f)]
    system = {"role": "system", "content": "Be brief."}
    blocks = {"role": "system", "content": [{"type": "text", "text": "Answer in one line."}]}  # Gemma-3's form
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
               {"role": "user", "content": "Name a  prime.\n"}]
    reasoning = "<think>\nSmall primes: 2, 3.\n</think>\n\n"
    extra = [
        ([system, {"role": "user", "content": "Hi"}], "Hello  there,\n friend!", "Go away."),
        ([blocks, {"role": "user", "content": [{"type": "text", "text": "Capital of Peru?"}]}],
         [{"type": "text", "text": "Lima."}], "Quito."),
        (history, "2 is prime.", "4 is prime."),
        (history, reasoning + "3.", reasoning + "9."),
    ]
    for prompt, chosen, rejected in extra:
        rows.append({"prompt": None, "chosen": prompt + [{"role": "assistant", "content": chosen}],
                     "rejected": prompt + [{"role": "assistant", "content": rejected}]})
    for row in rows[::3]:  # TRL's per-row column; only Qwen3's templates read this variable
        row["chat_template_kwargs"] = {"enable_thinking": False}
    return rows


def _special_tokens(name: str) -> list[str]:
    bos, eos, control = TEMPLATES[name]
    return [token for token in (bos, eos, *control) if token is not None]


def _config(name: str, added: dict[int, str], tokenizer_class: str, rstrip: bool) -> dict:
    bos, eos, _ = TEMPLATES[name]
    return {"tokenizer_class": tokenizer_class, "bos_token": bos, "eos_token": eos, "pad_token": None,
            "add_bos_token": bos is not None, "chat_template": _template(name),
            "added_tokens_decoder": {str(token_id): {
                "content": content, "lstrip": False, "normalized": False, "single_word": False, "special": True,
                "rstrip": rstrip and content in RSTRIP_TOKENS} for token_id, content in added.items()}}


def _sentencepiece_folder(name: str, base: str, out: str) -> None:
    """The tiny sentencepiece model with the template's tokens added after its 600 pieces (<s>, </s> are pieces)."""
    os.makedirs(out)
    shutil.copy(os.path.join(base, "tokenizer.model"), out)
    new = [token for token in _special_tokens(name) if token not in ("<s>", "</s>")]
    added = {tiny_model.TINY_VOCAB_SIZE + index: token for index, token in enumerate(new)}
    config = {**_config(name, added, "LlamaTokenizer", rstrip=False), "unk_token": "<unk>", "legacy": False}
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)


def _byte_level_folder(name: str, base: str, out: str) -> None:
    """The tiny Qwen3-style tokenizer.json with the template's tokens added as special tokens."""
    os.makedirs(out)
    tokenizer = Tokenizer.from_file(os.path.join(base, "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True, rstrip=token in RSTRIP_TOKENS)
                                  for token in _special_tokens(name)])
    tokenizer.save(os.path.join(out, "tokenizer.json"))
    config = _config(name, {}, "Qwen2Tokenizer", rstrip=True)
    config["added_tokens_decoder"] = {str(token_id): {  # every added token, as transformers saves them
        "content": token.content, "lstrip": token.lstrip, "rstrip": token.rstrip, "normalized": token.normalized,
        "single_word": token.single_word, "special": token.special}
        for token_id, token in tokenizer.get_added_tokens_decoder().items()}
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)


@pytest.fixture(scope="module")
def byte_level_base(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("byte_level_base"))
    tiny_model.write_tiny_byte_level_tokenizer(folder)
    return folder


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _expected_completion(reference, ids: list[int]) -> list[int]:
    """The documented end-of-turn rule, decided with transformers' decode: drop what follows the last EOS when it
    decodes to whitespace, then end with EOS."""
    eos = reference.eos_token_id
    if eos in ids:
        last = len(ids) - 1 - ids[::-1].index(eos)
        if not reference.decode(ids[last + 1:]).strip():
            ids = ids[:last + 1]
    return ids if ids[-1] == eos else ids + [eos]


@pytest.mark.parametrize("kind", ["sentencepiece", "byte_level"])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_real_template_pairs_equal_transformers_and_trl(name, kind, tiny_mixtral, byte_level_base, tmp_path):
    folder = str(tmp_path / "tokenizer")
    if kind == "sentencepiece":
        _sentencepiece_folder(name, tiny_mixtral, folder)
        reference = LlamaTokenizer.from_pretrained(folder)
    else:
        _byte_level_folder(name, byte_level_base, folder)
        reference = AutoTokenizer.from_pretrained(folder)
    template = _template(name)
    assert reference.chat_template == template
    pair_tokenizer = PairTokenizer(folder, template, TruncationConfig(max_length=4096, max_prompt_length=2048))
    encode = lambda text: reference(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos = reference.bos_token_id
    reported, kept = [], 0
    for row in _rows():
        kwargs = row.get("chat_template_kwargs", {})
        history = row["chosen"][:-1]
        try:
            prompt = reference.apply_chat_template(history, tokenize=False, add_generation_prompt=True, **kwargs)
            full = {key: reference.apply_chat_template(row[key], tokenize=False, **kwargs)
                    for key in ("chosen", "rejected")}
        except Exception as error:  # raise_exception's TemplateError, or e.g. a TypeError on list content
            with pytest.raises(BadRow) as bad:
                pair_tokenizer(row)
            assert bad.value.reason == "template_error" and str(error) in bad.value.detail
            reported.append(str(error))
            continue
        pair = pair_tokenizer(row)
        kept += 1
        prompt_ids, full_ids = encode(prompt), {key: encode(text) for key, text in full.items()}
        boundary = min(_common_prefix(prompt_ids, ids) for ids in full_ids.values())
        if name in THINK_PREFILL:
            assert prompt.endswith("<think>\n") and boundary < len(prompt_ids)
        else:
            assert boundary == len(prompt_ids)  # the generation prompt starts both conversations
        start = [bos] if reference.bos_token is not None and full_ids["chosen"][:1] != [bos] else []
        assert pair.prompt_ids == start + full_ids["chosen"][:boundary]
        assert pair.chosen_ids == _expected_completion(reference, full_ids["chosen"][boundary:])
        assert pair.rejected_ids == _expected_completion(reference, full_ids["rejected"][boundary:])
        # TRL's texts (its per-row chat_template_kwargs included) give the same ids: prompt, then prompt + completion.
        trl = trl_apply_chat_template({"prompt": history, "chosen": row["chosen"][-1:],
                                       "rejected": row["rejected"][-1:], "chat_template_kwargs": kwargs}, reference)
        assert encode(trl["prompt"]) == full_ids["chosen"][:boundary]
        for key in ("chosen", "rejected"):
            assert encode(trl["prompt"] + trl[key]) == full_ids[key]
    assert kept >= 8
    assert reported == REPORTED.get(name, ['can only concatenate str (not "list") to str'])


# -- chat_template_kwargs: the flag, the row column, through the cached tokenization and a training run -----------

def _qwen3_prompt_ids(reference, history: list[dict], **kwargs) -> list[int]:
    text = reference.apply_chat_template(history, chat_template=_template("qwen3"), tokenize=False,
                                         add_generation_prompt=True, **kwargs)
    return reference(text, add_special_tokens=False)["input_ids"]


def test_chat_template_kwargs_flag_and_row_column(byte_level_base, tmp_path):
    """`--chat-template-kwargs` reaches the template; a row's own chat_template_kwargs wins key by key; rows read
    through datasets (which fills absent keys with null) keep the flag's value."""
    from orpo_megatron.data.arguments import DataConfig, add_data_args
    from orpo_megatron.data.pipeline import make_pair_tokenizer
    from orpo_megatron.data.preprocess import cache_key, tokenize_dataset
    from orpo_megatron.data.sources import load_split

    reference = AutoTokenizer.from_pretrained(byte_level_base)
    template = os.path.join(TEMPLATE_DIR, "qwen3.jinja")
    rows = _rows()[:3]
    for row in rows:
        row.pop("chat_template_kwargs", None)
    rows[1]["chat_template_kwargs"] = {"enable_thinking": True}
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    parser = add_data_args(argparse.ArgumentParser())
    args = parser.parse_args(["--data-path", str(data), "--tokenizer", byte_level_base, "--chat-template", template,
                              "--chat-template-kwargs", '{"enable_thinking": false}',
                              "--data-cache-dir", str(tmp_path / "cache")])
    config = DataConfig.from_args(args)
    pair_tokenizer = make_pair_tokenizer(config, None)
    assert pair_tokenizer.chat_template_kwargs == {"enable_thinking": False}
    table = tokenize_dataset(load_split(config.data_path, config.split), pair_tokenizer, config.cache_dir, 1, "rows")
    for row, prompt_ids in zip(rows, table["prompt_input_ids"]):
        thinking = row.get("chat_template_kwargs", {}).get("enable_thinking", False)
        history = row["chosen"][:-1]
        assert prompt_ids == _qwen3_prompt_ids(reference, history, enable_thinking=thinking)
        # The premise: the flag changes the prompt (Qwen3 then closes an empty think block in it).
        assert prompt_ids != _qwen3_prompt_ids(reference, history, enable_thinking=not thinking)
    # The cache is keyed by the kwargs and by tokenizer.json: changing either tokenizes again.
    source = load_split(config.data_path, config.split).digest
    without_flag = PairTokenizer(byte_level_base, pair_tokenizer.chat_template, config.truncation)
    assert cache_key(source, without_flag) != cache_key(source, pair_tokenizer)
    other_tokenizer = tmp_path / "other_tokenizer"
    shutil.copytree(byte_level_base, other_tokenizer)
    tokenizer = Tokenizer.from_file(str(other_tokenizer / "tokenizer.json"))
    tokenizer.add_tokens(["<tool_call>"])
    tokenizer.save(str(other_tokenizer / "tokenizer.json"))
    changed = PairTokenizer(str(other_tokenizer), pair_tokenizer.chat_template, config.truncation,
                            pair_tokenizer.chat_template_kwargs)
    assert cache_key(source, changed) != cache_key(source, pair_tokenizer)
    for value, message in (("{enable_thinking: false}", "--chat-template-kwargs is not JSON"),
                           ('["enable_thinking"]', "--chat-template-kwargs must be a JSON object")):
        with pytest.raises(ValueError, match=message):
            DataConfig.from_args(parser.parse_args(["--data-path", str(data), "--chat-template-kwargs", value]))
    with pytest.raises(BadRow, match="wrong_type: chat_template_kwargs must be an object"):
        pair_tokenizer({**rows[0], "chat_template_kwargs": "enable_thinking=False"})


def test_tiny_qwen3_style_byte_level_tokenizer_trains_end_to_end(byte_level_base, tiny_converted, tmp_path):
    """The tiny Mixtral (vocabulary 600) trained on CPU with the byte-level tokenizer.json and Qwen3's template:
    every capybara row becomes a pair (the flag in its prompts), and the steps run with finite losses."""
    data_cache, save = tmp_path / "cache", tmp_path / "run"
    command = [sys.executable, "-m", "orpo_megatron.train", "--load", tiny_converted, "--save", str(save),
               "--tokenizer", byte_level_base, "--chat-template", os.path.join(TEMPLATE_DIR, "qwen3.jinja"),
               "--chat-template-kwargs", '{"enable_thinking": false}',
               "--data-path", os.path.join(EXAMPLES, "capybara_style.jsonl"), "--data-cache-dir", str(data_cache),
               "--max-length", "96", "--max-prompt-length", "64", "--micro-batch-size", "2",
               "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-3", "--log-interval", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env,
                          cwd=os.path.dirname(TESTS))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "300 pairs from 300 rows; bad rows skipped: none" in proc.stdout + proc.stderr
    metrics = [json.loads(line) for line in open(save / "metrics.jsonl")]
    losses = [row["train/loss"] for row in metrics if "train/loss" in row]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    reference = AutoTokenizer.from_pretrained(byte_level_base)
    with open(os.path.join(EXAMPLES, "capybara_style.jsonl"), encoding="utf-8") as f:
        first = json.loads(f.readline())
    cached = datasets.Dataset.from_file(next(str(path) for path in data_cache.glob("preference-*.arrow")))
    assert cached[0]["prompt_input_ids"] == _qwen3_prompt_ids(reference, first["chosen"][:-1], enable_thinking=False)
