"""The runtime tokenizer: the files of a Hugging Face tokenizer folder read the way transformers reads them.

Two kinds, picked by `load_tokenizer(directory)` from the files present (as transformers' AutoTokenizer does):
- `tokenizer.json` (byte-level BPE of Llama-3.x, Qwen2.5/Qwen3, Mistral-Nemo, SmolLM3; also the converted form of
  sentencepiece models): read with the `tokenizers` library, the Rust implementation transformers itself runs, so
  its normalizer, pre-tokenizer, added tokens (`lstrip`/`rstrip`/`single_word`/`normalized`) apply as they do there;
- `tokenizer.model` alone (sentencepiece): read the way transformers' Llama/Mixtral tokenizer reads it (below).

Owns text -> token ids for the data layer (special-token splitting, prefix spaces, BOS) and the metadata from
`tokenizer_config.json` (special tokens, null ones allowed, `add_bos_token`, the chat template). It does not render
chat templates (`chat_template.py`) and does not know about prompts or completions (`preference.py`).

`encode(text)` adds no special tokens; BOS is the caller's decision (`bos_id`, `add_bos_token`), like
`apply_chat_template(tokenize=True)` which tokenizes with `add_special_tokens=False`.

Sentencepiece behaviour matched to transformers' `LlamaTokenizer` (v5, the tokenizers backend) on the same files:
- no text normalization: the model's normalizer spec is replaced by identity (no NFKC, whitespace kept), as
  transformers ignores it too; spaces become `▁`;
- special tokens written in the text (`</s>` printed by a chat template) are split out first and map to their ids;
- a `▁` is prepended to the text that starts the input (`legacy: false`) or to every text piece between special
  tokens (`legacy: true`, Mixtral's setting), when `add_prefix_space` says so: its value in tokenizer_config.json,
  else the model's own `add_dummy_prefix` (true for Llama/Mistral, false for Gemma, whose tokenizer adds none).
"""
from __future__ import annotations

import json
import os
import re
from functools import cached_property

import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2

from orpo_megatron.errors import ConfigError

SPIECE_UNDERLINE = "▁"
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# Used when tokenizer_config.json does not name them (Llama/Mistral/Mixtral's); tokenizer.json folders have none.
SENTENCEPIECE_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}


def _token_content(value) -> str | None:
    """Special tokens are stored as plain strings or as serialized AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_tokenizer(directory: str) -> SentencePieceTokenizer | TokenizerJsonTokenizer:
    """The tokenizer of a folder: `tokenizer.json` when there is one (what transformers loads), else
    `tokenizer.model`."""
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return TokenizerJsonTokenizer(directory)
    if os.path.isfile(os.path.join(directory, "tokenizer.model")):
        return SentencePieceTokenizer(directory)
    raise FileNotFoundError(
        f"no tokenizer in {directory}: --tokenizer must name a folder with tokenizer.json or tokenizer.model (and "
        "tokenizer_config.json), e.g. the Hugging Face checkpoint folder")


class _TokenizerFolder:
    """What both kinds read the same way: tokenizer_config.json, the chat template, the named special tokens."""

    def __init__(self, directory: str, default_tokens: dict[str, str | None]):
        self.directory = directory
        config_path = os.path.join(directory, "tokenizer_config.json")
        self.config: dict = {}
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                self.config = json.load(f)
        self.chat_template = self._read_chat_template()
        # A key set to null (Qwen's "bos_token": null) means no such token; an absent one takes the default.
        named = {key: _token_content(self.config.get(key, default_tokens.get(key))) for key in NAMED_TOKENS}
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = (named[key] for key in NAMED_TOKENS)
        if self.eos_token is None:
            raise ConfigError(f"{directory}/tokenizer_config.json names no eos_token: every completion ends with one")

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

    @property
    def named_special_tokens(self) -> dict[str, str]:
        """bos/eos/unk/pad token strings that exist: what a chat template sees as variables."""
        return {key: value for key, value in zip(NAMED_TOKENS, (self.bos_token, self.eos_token, self.unk_token,
                                                                  self.pad_token)) if value is not None}

    def _resolve_named_ids(self, token_id) -> None:
        """bos_id (None without a BOS token), eos_id, pad_id (EOS when there is no pad token)."""
        self.bos_id = token_id(self.bos_token, "bos_token") if self.bos_token is not None else None
        self.eos_id = token_id(self.eos_token, "eos_token")
        self.pad_id = token_id(self.pad_token, "pad_token") if self.pad_token is not None else self.eos_id


class SentencePieceTokenizer(_TokenizerFolder):
    """Tokenizer read from a folder with `tokenizer.model` and (optionally) `tokenizer_config.json`."""

    def __init__(self, directory: str):
        model_path = os.path.join(directory, "tokenizer.model")
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"no sentencepiece tokenizer at {model_path}: --tokenizer must name a folder with tokenizer.model "
                "(and tokenizer_config.json), e.g. the Hugging Face checkpoint folder")
        super().__init__(directory, SENTENCEPIECE_SPECIAL_TOKENS)
        proto = sentencepiece_model_pb2.ModelProto()
        with open(model_path, "rb") as f:
            proto.ParseFromString(f.read())
        add_dummy_prefix = proto.normalizer_spec.add_dummy_prefix
        # transformers applies no normalizer and adds the `▁` prefix itself; do the same so ids match.
        proto.normalizer_spec.name = "identity"
        proto.normalizer_spec.precompiled_charsmap = b""
        proto.normalizer_spec.add_dummy_prefix = False
        proto.normalizer_spec.remove_extra_whitespaces = False
        self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

        self.legacy = bool(self.config.get("legacy", False))
        add_prefix_space = self.config.get("add_prefix_space")
        self.add_prefix_space = add_dummy_prefix if add_prefix_space is None else bool(add_prefix_space)
        self.add_bos_token = bool(self.config.get("add_bos_token", True)) and self.bos_token is not None
        self.special_tokens = self._read_special_tokens()
        self._resolve_named_ids(self._special_id)
        self.vocab_size = max([self._sp.get_piece_size() - 1, *self.special_tokens.values()]) + 1
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None

    def _read_special_tokens(self) -> dict[str, int]:
        """Added tokens matched verbatim in text: `added_tokens_decoder`, and the named special tokens."""
        tokens: dict[str, int] = {}
        for token_id, entry in self.config.get("added_tokens_decoder", {}).items():
            if entry.get("lstrip") or entry.get("rstrip"):
                raise ConfigError(f"{self.directory}/tokenizer_config.json: added token {entry.get('content')!r} "
                                 "strips neighbouring whitespace, which only a tokenizer.json folder supports here "
                                 "(save the tokenizer with transformers to write one)")
            tokens[entry["content"]] = int(token_id)
        for key, content in self.named_special_tokens.items():
            if content not in tokens:
                piece_id = self._sp.piece_to_id(content)
                if self._sp.id_to_piece(piece_id) != content:
                    raise ConfigError(f"{self.directory}: {key} {content!r} is not in the vocabulary")
                tokens[content] = piece_id
        return tokens

    def _special_id(self, content: str, key: str) -> int:
        if content not in self.special_tokens:
            raise ConfigError(f"{self.directory}/tokenizer_config.json: {key} {content!r} is not a special token")
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


class TokenizerJsonTokenizer(_TokenizerFolder):
    """Tokenizer read from a folder with `tokenizer.json` (and optionally `tokenizer_config.json`), as transformers'
    PreTrainedTokenizerFast reads it: the file's whole pipeline, no truncation or padding, special tokens in the
    text split out (the added tokens with their own `lstrip`/`rstrip`/`normalized` settings)."""

    def __init__(self, directory: str):
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        super().__init__(directory, {})
        self._tokenizer = tokenizers.Tokenizer.from_file(path)
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._resolve_named_ids(self._token_id)
        add_bos_token = self.config.get("add_bos_token")
        if add_bos_token is None:  # transformers then keeps the file's post-processor: does it prepend BOS?
            with_special = self._tokenizer.encode("a", add_special_tokens=True).ids
            add_bos_token = (len(with_special) > len(self.encode("a")) and self.bos_id is not None
                             and with_special[0] == self.bos_id)
        self.add_bos_token = bool(add_bos_token) and self.bos_id is not None
        self.vocab_size = max(self._tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    def _token_id(self, content: str, key: str) -> int:
        token_id = self._tokenizer.token_to_id(content)
        if token_id is None:
            raise ConfigError(f"{self.directory}/tokenizer_config.json: {key} {content!r} is not in tokenizer.json")
        return token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens written in it included, no BOS/EOS added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], starts_text: bool = True) -> str:
        """Text of `ids` with special tokens written out (for inspection); tokenizer.json's decoder decides about a
        leading space, so `starts_text` is not needed here."""
        del starts_text
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    @cached_property
    def whitespace_ids(self) -> frozenset[int]:
        """Ids of tokens that decode to whitespace only (`Ġ`, `Ċ`, `▁`, byte pieces of spaces/newlines...)."""
        special = {token_id for token_id, token in self._tokenizer.get_added_tokens_decoder().items() if token.special}
        decoder = self._tokenizer.decoder
        ids = set()
        for token, token_id in self._tokenizer.get_vocab(with_added_tokens=True).items():
            if token_id in special:
                continue
            # After an anchor, so decoders that strip the text's first space (Metaspace) keep this token's.
            text = decoder.decode(["a", token])[1:] if decoder is not None else token
            if text and not text.strip():
                ids.add(token_id)
        return frozenset(ids)
