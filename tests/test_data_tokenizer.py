"""The runtime tokenizer and chat templates against transformers on the same files (the test reference)."""
import json
import os
import random
import shutil

import jinja2
import pytest
from tokenizers import AddedToken
from transformers import AutoTokenizer, GemmaTokenizer, LlamaTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer

from orpo_megatron import tiny_model
from orpo_megatron.data import chat_template
from orpo_megatron.data.tokenizer import SentencePieceTokenizer, TokenizerJsonTokenizer, load_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "And  then?\n"}],
]


def _texts() -> list[str]:
    lines = open(tiny_model.TOKENIZER_CORPUS, encoding="utf-8").read().splitlines()
    rng = random.Random(0)
    texts = lines + ["", " ", "  two  spaces ", "\n\nnewlines\n", "a</s>\nb", "<s>x", "</s>", "x<unk>y",
                     "héllo wörld 日本語 😀", "<|user|>\nHi</s>\n<|assistant|>\n", "tab\there"]
    pieces = lines + ["</s>", "<s>", "\n", " ", "  ", "é"]
    for _ in range(200):
        texts.append("".join(rng.choice(pieces)[:rng.randint(0, 40)] for _ in range(rng.randint(1, 4))))
    return texts


@pytest.fixture(scope="module", params=[False, True], ids=["legacy_false", "legacy_true"])
def tokenizer_dir(request, tiny_mixtral, tmp_path_factory) -> str:
    """The tiny tokenizer as written by the fixture (legacy false) and with Mixtral's `legacy: true`."""
    if not request.param:
        return tiny_mixtral
    folder = str(tmp_path_factory.mktemp("legacy_tokenizer"))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(tiny_mixtral, name), folder)
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = json.load(open(config_path))
    json.dump({**config, "legacy": True}, open(config_path, "w"))
    return folder


def test_token_ids_match_transformers_llama_tokenizer(tokenizer_dir):
    ours = SentencePieceTokenizer(tokenizer_dir)
    # The class tokenizer_config.json names (Mixtral's). AutoTokenizer on a folder whose config.json says
    # model_type mixtral builds a generic sentencepiece conversion instead, which applies the tiny model's NFKC
    # normalizer; Mixtral's own tokenizer.model has an identity normalizer, where both agree.
    reference = LlamaTokenizer.from_pretrained(tokenizer_dir)
    mismatches = [text for text in _texts()
                  if ours.encode(text) != reference(text, add_special_tokens=False)["input_ids"]]
    assert not mismatches, mismatches[:5]
    # BOS: transformers adds it for add_special_tokens=True (add_bos_token), never EOS; encode() adds neither.
    assert reference("Hello world")["input_ids"] == [ours.bos_id] + ours.encode("Hello world")
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)  # no pad token in the config: pad with EOS
    assert ours.add_bos_token


def test_decode_writes_special_tokens(tiny_mixtral):
    tokenizer = SentencePieceTokenizer(tiny_mixtral)
    text = "<|user|>\nHello world</s>\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("name", sorted(chat_template.BUILTIN_TEMPLATES) + ["tokenizer_config"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_template_rendering_equals_apply_chat_template(tiny_mixtral, name, add_generation_prompt):
    reference = AutoTokenizer.from_pretrained(tiny_mixtral)
    ours = SentencePieceTokenizer(tiny_mixtral)
    template = chat_template.resolve_chat_template(None if name == "tokenizer_config" else name,
                                                   ours.chat_template, tiny_mixtral)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    for messages in CONVERSATIONS:
        expected = reference.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        assert chat_template.render(template, messages, special, add_generation_prompt) == expected


def test_template_raise_exception_raises_like_transformers(tiny_mixtral):
    reference = AutoTokenizer.from_pretrained(tiny_mixtral)
    not_alternating = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        reference.apply_chat_template(not_alternating, chat_template=chat_template.MISTRAL, tokenize=False)
    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        chat_template.render(chat_template.MISTRAL, not_alternating, {"bos_token": "<s>", "eos_token": "</s>"})


def test_builtin_zephyr_is_the_fixture_tokenizers_template(tiny_mixtral):
    assert chat_template.ZEPHYR == tiny_model.ZEPHYR_CHAT_TEMPLATE == SentencePieceTokenizer(tiny_mixtral).chat_template


def test_unknown_template_name_is_a_clear_error(tiny_mixtral):
    with pytest.raises(ValueError, match="--chat-template 'llama9'.*chatml"):
        chat_template.resolve_chat_template("llama9", None, tiny_mixtral)


def test_missing_tokenizer_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        SentencePieceTokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model"):
        load_tokenizer(str(tmp_path))


# -- tokenizer.json (the tokenizers library) ------------------------------------------------------------------------

QWEN_TEXTS = ["<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nYo<|im_end|>\n",
              "x<|endoftext|>y", "<think>a</think>", "don't  stop\r\n\n  it's 2024!!", "ＡＢＣ ｆｕｌｌ"]


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("byte_level"))
    tiny_model.write_tiny_byte_level_tokenizer(folder)
    return folder


def test_byte_level_tokenizer_json_matches_transformers(byte_level_dir):
    """The Qwen3-style folder: `bos_token` null, EOS <|im_end|>, pad <|endoftext|>, non-special added <think>."""
    ours = load_tokenizer(byte_level_dir)
    assert isinstance(ours, TokenizerJsonTokenizer)
    # AutoTokenizer builds Qwen2Tokenizer's own pipeline from the vocabulary and merges (an independent
    # construction); PreTrainedTokenizerFast runs tokenizer.json as it is.
    qwen2, fast = AutoTokenizer.from_pretrained(byte_level_dir), PreTrainedTokenizerFast.from_pretrained(byte_level_dir)
    assert isinstance(qwen2, Qwen2Tokenizer)
    for reference in (qwen2, fast):
        mismatches = [text for text in _texts() + QWEN_TEXTS
                      if ours.encode(text) != reference(text, add_special_tokens=False)["input_ids"]]
        assert not mismatches, mismatches[:5]
    assert qwen2.bos_token is None and ours.bos_token is None and ours.bos_id is None and not ours.add_bos_token
    assert qwen2("Hi")["input_ids"] == ours.encode("Hi")  # no BOS is added
    assert (ours.eos_id, ours.pad_id) == (qwen2.eos_token_id, qwen2.pad_token_id) == (
        qwen2.convert_tokens_to_ids("<|im_end|>"), qwen2.convert_tokens_to_ids("<|endoftext|>"))
    assert ours.vocab_size == len(qwen2) == tiny_model.TINY_VOCAB_SIZE
    for text in QWEN_TEXTS:
        assert ours.decode(ours.encode(text)) == qwen2.decode(qwen2(text)["input_ids"]) == text
    newline_and_spaces = {token_id for token_id in range(len(qwen2)) if qwen2.decode([token_id]).strip() == ""
                          and qwen2.decode([token_id]) and token_id not in qwen2.all_special_ids}
    assert ours.whitespace_ids == newline_and_spaces


@pytest.mark.parametrize("legacy", [False, True])
def test_llama_style_tokenizer_json_with_stripping_added_tokens(tiny_mixtral, tmp_path, legacy):
    """The tiny sentencepiece model saved by transformers as tokenizer.json (how Mixtral, Gemma and Phi-3 folders
    ship it), with Phi-3's kind of added tokens that swallow the whitespace around them; the tokenizer.model next to
    it is not what is read."""
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(os.path.join(tiny_mixtral, "tokenizer.model"), source)
    config = json.load(open(os.path.join(tiny_mixtral, "tokenizer_config.json")))
    (source / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": legacy}))
    llama = LlamaTokenizer.from_pretrained(str(source))
    llama.add_tokens([AddedToken("<|end|>", rstrip=True, special=True),
                     AddedToken("<|user|>", lstrip=True, rstrip=True, special=True)], special_tokens=True)
    folder = str(tmp_path / "saved")
    llama.save_pretrained(folder)
    shutil.copy(os.path.join(tiny_mixtral, "tokenizer.model"), folder)
    ours = load_tokenizer(folder)
    assert isinstance(ours, TokenizerJsonTokenizer)
    reference = PreTrainedTokenizerFast.from_pretrained(folder)
    texts = _texts() + ["x <|end|>\n\n y", "q  <|user|>  z", "<|end|>", " <|user|>"]
    mismatches = [text for text in texts if ours.encode(text) != reference(text, add_special_tokens=False)["input_ids"]]
    assert not mismatches, mismatches[:5]
    assert ours.encode("a <|end|>\n b") == ours.encode("a <|end|>b")  # the premise: rstrip took "\n "
    # Same ids as our sentencepiece reading of the same model (no stripping token in these texts).
    sentencepiece = SentencePieceTokenizer(str(source))
    assert all(ours.encode(text) == sentencepiece.encode(text) for text in _texts() if "<|user|>" not in text)
    assert ours.add_bos_token and reference("Hello")["input_ids"] == [ours.bos_id] + ours.encode("Hello")


def test_tokenizer_json_without_eos_token_is_a_clear_error(byte_level_dir, tmp_path):
    shutil.copy(os.path.join(byte_level_dir, "tokenizer.json"), tmp_path)
    config = json.load(open(os.path.join(byte_level_dir, "tokenizer_config.json")))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": None}))
    with pytest.raises(ValueError, match="names no eos_token"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|eot|>"}))
    with pytest.raises(ValueError, match="eos_token '<\\|eot\\|>' is not in tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_sentencepiece_without_dummy_prefix_adds_no_prefix_space_like_gemma(tmp_path):
    """A model trained without `add_dummy_prefix` (Gemma's) and no `add_prefix_space` in its config: no `▁` is put
    before the text, as transformers' GemmaTokenizer does."""
    tiny_model.write_tiny_tokenizer(str(tmp_path), add_dummy_prefix=False)
    config = json.load(open(tmp_path / "tokenizer_config.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GemmaTokenizer"}))
    ours, reference = load_tokenizer(str(tmp_path)), AutoTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(reference, GemmaTokenizer) and not ours.add_prefix_space
    mismatches = [text for text in _texts() if ours.encode(text) != reference(text, add_special_tokens=False)["input_ids"]]
    assert not mismatches, mismatches[:5]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_prefix_space": True}))
    assert load_tokenizer(str(tmp_path)).encode("Hello") != ours.encode("Hello")  # the config's own value wins


def test_chat_template_is_read_where_transformers_saves_it(tiny_mixtral, tmp_path):
    shutil.copy(os.path.join(tiny_mixtral, "tokenizer.model"), tmp_path)
    config = json.load(open(os.path.join(tiny_mixtral, "tokenizer_config.json")))
    config["chat_template"] = [{"name": "tool_use", "template": "x"},
                               {"name": "default", "template": chat_template.CHATML}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert SentencePieceTokenizer(str(tmp_path)).chat_template == chat_template.CHATML
    (tmp_path / "chat_template.jinja").write_text(chat_template.MISTRAL)
    assert SentencePieceTokenizer(str(tmp_path)).chat_template == chat_template.MISTRAL
    reference = AutoTokenizer.from_pretrained(str(tmp_path))
    assert reference.chat_template == chat_template.MISTRAL
