"""The runtime tokenizer and chat templates against transformers on the same files (the test reference)."""
import json
import os
import random
import shutil

import jinja2
import pytest
from transformers import AutoTokenizer, LlamaTokenizer

from orpo_megatron import fixtures
from orpo_megatron.data import chat_template
from orpo_megatron.data.tokenizer import SentencePieceTokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "And  then?\n"}],
]


def _texts() -> list[str]:
    lines = open(fixtures.TOKENIZER_CORPUS, encoding="utf-8").read().splitlines()
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
    assert chat_template.ZEPHYR == fixtures.ZEPHYR_CHAT_TEMPLATE == SentencePieceTokenizer(tiny_mixtral).chat_template


def test_unknown_template_name_is_a_clear_error(tiny_mixtral):
    with pytest.raises(ValueError, match="--chat-template 'llama9'.*chatml"):
        chat_template.resolve_chat_template("llama9", None, tiny_mixtral)


def test_missing_tokenizer_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        SentencePieceTokenizer(str(tmp_path))


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
