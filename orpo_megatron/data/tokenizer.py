"""The runtime tokenizer: a sentencepiece `tokenizer.model` read the way Hugging Face's Llama/Mixtral tokenizer
reads it.

Owns text -> token ids for the data layer (special-token splitting, the `▁` prefix rule, BOS) and the metadata from
`tokenizer_config.json` (special tokens, `add_bos_token`, `legacy`, the chat template). It does not render chat
templates (`chat_template.py`) and does not know about prompts or completions (`preference.py`).

Behaviour matched to transformers' `LlamaTokenizer` (v5, the tokenizers backend) on the same files:
- no text normalization: the model's normalizer spec is replaced by identity (no NFKC, whitespace kept), as
  transformers ignores it too; spaces become `▁`;
- special tokens written in the text (`</s>` printed by a chat template) are split out first and map to their ids;
- a `▁` is prepended to the text that starts the input (`legacy: false`) or to every text piece between special
  tokens (`legacy: true`, Mixtral's setting), unless `add_prefix_space` is false;
- `encode(text)` adds no special tokens; BOS is the caller's decision (`bos_id`, `add_bos_token`), like
  `apply_chat_template(tokenize=True)` which tokenizes with `add_special_tokens=False`.
"""
from __future__ import annotations

import json
import os
import re
from functools import cached_property

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

SPIECE_UNDERLINE = "▁"
# Used when tokenizer_config.json does not name them (Llama/Mistral/Mixtral's).
DEFAULT_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}


def _token_content(value) -> str | None:
    """Special tokens are stored as plain strings or as serialized AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class SentencePieceTokenizer:
    """Tokenizer read from a folder with `tokenizer.model` and (optionally) `tokenizer_config.json`."""

    def __init__(self, directory: str):
        model_path = os.path.join(directory, "tokenizer.model")
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"no sentencepiece tokenizer at {model_path}: --tokenizer must name a folder with tokenizer.model "
                "(and tokenizer_config.json), e.g. the Hugging Face checkpoint folder")
        self.directory = directory
        config_path = os.path.join(directory, "tokenizer_config.json")
        self.config: dict = {}
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                self.config = json.load(f)

        proto = sentencepiece_model_pb2.ModelProto()
        with open(model_path, "rb") as f:
            proto.ParseFromString(f.read())
        # transformers applies no normalizer and adds the `▁` prefix itself; do the same so ids match.
        proto.normalizer_spec.name = "identity"
        proto.normalizer_spec.precompiled_charsmap = b""
        proto.normalizer_spec.add_dummy_prefix = False
        proto.normalizer_spec.remove_extra_whitespaces = False
        self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

        self.legacy = bool(self.config.get("legacy", False))
        self.add_prefix_space = self.config.get("add_prefix_space") is not False  # None means True, as in HF
        self.add_bos_token = bool(self.config.get("add_bos_token", True))
        self.chat_template = self._read_chat_template()
        named = {key: _token_content(self.config.get(key, default)) for key, default in DEFAULT_SPECIAL_TOKENS.items()}
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = (
            named["bos_token"], named["eos_token"], named["unk_token"], named["pad_token"])
        self.special_tokens = self._read_special_tokens(named)
        self.bos_id = self._special_id(self.bos_token, "bos_token")
        self.eos_id = self._special_id(self.eos_token, "eos_token")
        self.pad_id = self._special_id(self.pad_token, "pad_token") if self.pad_token else self.eos_id
        self.vocab_size = max([self._sp.get_piece_size() - 1, *self.special_tokens.values()]) + 1
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None

    def _read_special_tokens(self, named: dict[str, str | None]) -> dict[str, int]:
        """Added tokens matched verbatim in text: `added_tokens_decoder`, and the named special tokens."""
        tokens: dict[str, int] = {}
        for token_id, entry in self.config.get("added_tokens_decoder", {}).items():
            if entry.get("lstrip") or entry.get("rstrip"):
                raise ValueError(f"{self.directory}/tokenizer_config.json: added token {entry.get('content')!r} "
                                 "strips neighbouring whitespace, which this tokenizer does not implement")
            tokens[entry["content"]] = int(token_id)
        for key, content in named.items():
            if content and content not in tokens:
                piece_id = self._sp.piece_to_id(content)
                if self._sp.id_to_piece(piece_id) != content:
                    raise ValueError(f"{self.directory}: {key} {content!r} is not in the vocabulary")
                tokens[content] = piece_id
        return tokens

    def _read_chat_template(self) -> str | None:
        """`chat_template.jinja` (how recent transformers save it), else `chat_template` in tokenizer_config.json
        (a string, or a list of named templates of which `default` is the chat one)."""
        jinja_path = os.path.join(self.directory, "chat_template.jinja")
        if os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                return f.read()
        template = self.config.get("chat_template")
        if isinstance(template, list):
            named = {entry["name"]: entry["template"] for entry in template}
            return named.get("default")
        return template

    def _special_id(self, content: str | None, key: str) -> int:
        if content is None or content not in self.special_tokens:
            raise ValueError(f"{self.directory}/tokenizer_config.json: {key} {content!r} is not a special token")
        return self.special_tokens[content]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens written in it included, no BOS/EOS added."""
        pieces = self._special_re.split(text) if self._special_re else [text]
        ids: list[int] = []
        offset = 0
        for index, piece in enumerate(pieces):
            if index % 2 == 1:  # re.split puts the captured special tokens at odd positions
                ids.append(self.special_tokens[piece])
            elif piece:
                text = piece.replace(" ", SPIECE_UNDERLINE)
                # Like tokenizers' Metaspace: no extra `▁` when the text already starts with a space.
                if self.add_prefix_space and (self.legacy or offset == 0) and not text.startswith(SPIECE_UNDERLINE):
                    text = SPIECE_UNDERLINE + text
                ids.extend(self._sp.encode(text))
            offset += len(piece)
        return ids

    def decode(self, ids: list[int], starts_text: bool = True) -> str:
        """Text of `ids` with special tokens written out (for inspection). `starts_text`: the ids begin the encoded
        text, so the `▁` that encode() put in front is dropped."""
        by_id = {token_id: content for content, token_id in self.special_tokens.items()}
        out, run = [], []
        for token_id in ids:
            if token_id in by_id:
                out.append(self._sp.decode(run))
                out.append(by_id[token_id])
                run = []
            else:
                run.append(token_id)
        out.append(self._sp.decode(run))
        text = "".join(out)
        return text[1:] if starts_text and self.add_prefix_space and text.startswith(" ") else text

    @cached_property
    def whitespace_ids(self) -> frozenset[int]:
        """Ids of pieces that are only whitespace (`▁`, byte pieces of spaces/newlines...)."""
        ids = set()
        for token_id in range(self._sp.get_piece_size()):
            if self._sp.is_control(token_id) or self._sp.is_unknown(token_id):
                continue
            piece = self._sp.id_to_piece(token_id)
            if self._sp.is_byte(token_id):  # <0xNN>; bytes >= 0x80 are parts of UTF-8 characters, never spaces
                byte = int(piece[3:5], 16)
                text = chr(byte) if byte < 0x80 else "x"
            else:
                text = piece.replace(SPIECE_UNDERLINE, " ")
            if text and not text.strip():
                ids.add(token_id)
        return frozenset(ids)
