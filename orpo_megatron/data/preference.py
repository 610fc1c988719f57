"""One preference row -> one tokenized pair (prompt ids, chosen completion ids, rejected completion ids), or a reason
why the row is bad.

Owns the three input forms, the prompt/completion split, BOS/EOS, truncation and the bad-row reasons. It does not
iterate datasets, cache or apply the bad-row policy (`preprocess.py`), and does not batch (`batching.py`).

Input forms (all give identical ids for the same pairs):
- message lists (capybara): `chosen` / `rejected` are whole conversations whose last turn is the assistant
  completion; the prompt is `chosen[:-1]`, which must equal `rejected[:-1]` (the `prompt` string column is then
  ignored, as in the alignment-handbook). When the conversations hold only the assistant turn, the `prompt` string
  becomes one user message; a `prompt` that is itself a message list is TRL's explicit-prompt form.
  A message's content is a string or a list of content blocks (`[{"type": "text", "text": ...}]`, which Gemma-3's
  template needs for system messages), handed to the template as they are.
  Template variables: the tokenizer's special tokens, then `--chat-template-kwargs` (a JSON object), then the row's
  own `chat_template_kwargs` column (TRL's; e.g. Qwen3's `{"enable_thinking": false}`), later ones winning; null
  values are dropped (datasets fills the keys other rows have with null).
  Rendering: full text = template(prompt messages + completion turn); prompt text = template(prompt messages,
  add_generation_prompt=True). Usually the prompt text starts the full text and the completion is the rest.
  Reasoning templates whose generation prompt opens a think block (QwQ-32B `<|im_start|>assistant\n<think>\n`,
  DeepSeek-R1-Distill `<｜Assistant｜><think>\n`) render past turns without it, so the prompt text is not a prefix of
  any full conversation. There the boundary is the longest common prefix of the two texts (TRL's rule): the sequence
  is exactly the rendered conversation, and the generation prompt's remainder (`<think>\n`) is counted on the
  completion side: it is not in the rendered conversation, so it is neither masked nor trained on. The prompt turns
  must still render identically (template(prompt messages) starts the full text), else the row is a
  `template_error`.
- plain strings: `prompt`, `chosen`, `rejected` texts used verbatim (already templated, if at all).
- pre-tokenized: `prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids` (completions without the prompt).

Split: prompt + completion is tokenized as one text and the prompt is the longest common prefix of that and the
prompt tokenized alone (the shorter over chosen and rejected), so prompt + completion ids are exactly the ids of the
joint text even when a token straddles the boundary (TRL's `build_tokenized_answer` rule, generalised).

BOS/EOS: BOS is prepended when the tokenizer wants one (`add_bos_token`) and the prompt does not start with it.
A completion keeps exactly one final EOS: the EOS a template prints to close the turn counts (whitespace the
template prints after it is dropped: generation stops at EOS), otherwise EOS is appended.

Truncation (`max_length`, `max_prompt_length`, `truncation_mode`), avoiding TRL's known mistakes:
1. if prompt + the longer completion exceeds `max_length` and the prompt is longer than `max_prompt_length`, the
   prompt is cut to `max_prompt_length` tokens: `keep_end` keeps its last tokens (and BOS stays first), `keep_start`
   its first ones. `max_prompt_length` 0 disables prompt truncation.
2. each completion is then cut independently to its own budget `max_length - len(prompt)` (not a budget derived from
   `max_prompt_length` or from the other response). A cut completion loses its EOS: it was cut mid-text, and teaching
   the model to stop there would be wrong. Completions that fit keep their EOS.
3. a row is bad (`prompt_too_long`) only when no completion token fits after the (possibly truncated) prompt.
"""
from __future__ import annotations

import dataclasses

from orpo_megatron.data.chat_template import render
from orpo_megatron.data.sources import UNREADABLE_COLUMN
from orpo_megatron.data.tokenizer import SentencePieceTokenizer, TokenizerJsonTokenizer, load_tokenizer
from orpo_megatron.errors import ConfigError

PRETOKENIZED_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
CHAT_TEMPLATE_KWARGS_COLUMN = "chat_template_kwargs"
TRUNCATION_MODES = ("keep_end", "keep_start")

# Every reason a row can be rejected for, with what it means (printed by tools/inspect_data.py).
BAD_ROW_REASONS = {
    "unreadable": "a line of a JSON-lines file is not UTF-8 text or not one JSON object",
    "missing_field": "a needed value (prompt/chosen/rejected or a message's role/content) is missing or null",
    "wrong_type": "a value has the wrong type (not text, not a list of messages, not token ids in the vocabulary, "
                  "chat_template_kwargs not an object)",
    "no_assistant_completion": "the last message of chosen/rejected is not an assistant turn",
    "prompt_mismatch": "chosen and rejected conversations differ before their last turn",
    "template_error": "the chat template raised, or did not render the conversation as prompt + completion",
    "empty_completion": "a completion is empty or whitespace only",
    "prompt_too_long": "no completion token fits after the prompt (prompt truncation disabled)",
    "chosen_equals_rejected": "chosen and rejected completions are identical (after truncation)",
}


@dataclasses.dataclass(frozen=True)
class TruncationConfig:
    max_length: int = 1024
    max_prompt_length: int = 512
    truncation_mode: str = "keep_end"

    def __post_init__(self):
        if self.max_length <= 1:
            raise ConfigError(f"--max-length must be at least 2, got {self.max_length}")
        if not 0 <= self.max_prompt_length < self.max_length:
            raise ConfigError(f"--max-prompt-length must be in [0, --max-length) = [0, {self.max_length}), got "
                             f"{self.max_prompt_length} (0 disables prompt truncation)")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ConfigError(f"--truncation-mode must be one of {TRUNCATION_MODES}, got {self.truncation_mode!r}")


class BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in BAD_ROW_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # completion only, EOS last unless truncated
    rejected_ids: list[int]
    prompt_length_before: int  # lengths before truncation, for the length statistics
    chosen_length_before: int
    rejected_length_before: int
    prompt_truncated: bool
    chosen_truncated: bool
    rejected_truncated: bool


def required_columns(column_names: list[str]) -> tuple[str, ...]:
    """The columns this dataset is read from; a clear error when neither form's columns are there."""
    unreadable = (UNREADABLE_COLUMN,) if UNREADABLE_COLUMN in column_names else ()
    if all(name in column_names for name in PRETOKENIZED_COLUMNS):
        return PRETOKENIZED_COLUMNS + unreadable
    if "chosen" in column_names and "rejected" in column_names:
        columns = ("prompt", "chosen", "rejected") if "prompt" in column_names else ("chosen", "rejected")
        return columns + ((CHAT_TEMPLATE_KWARGS_COLUMN,) if CHAT_TEMPLATE_KWARGS_COLUMN in column_names else ()) + unreadable
    raise ConfigError("expected columns prompt/chosen/rejected (text or message lists) or "
                     f"{'/'.join(PRETOKENIZED_COLUMNS)} (token ids), found {column_names}")


class PairTokenizer:
    """Tokenizes rows of any form; picklable (the tokenizer is reloaded per process)."""

    def __init__(self, tokenizer_dir: str, chat_template: str | None, truncation: TruncationConfig,
                 chat_template_kwargs: dict | None = None):
        self.tokenizer_dir = tokenizer_dir
        self.chat_template = chat_template
        self.truncation = truncation
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self._tokenizer: SentencePieceTokenizer | TokenizerJsonTokenizer | None = None

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    @property
    def tokenizer(self) -> SentencePieceTokenizer | TokenizerJsonTokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_dir)
        return self._tokenizer

    def __call__(self, row: dict) -> TokenizedPair:
        """Tokenize one row; raises BadRow."""
        if row.get(UNREADABLE_COLUMN) is not None:
            raise BadRow("unreadable", row[UNREADABLE_COLUMN])
        if all(name in row for name in PRETOKENIZED_COLUMNS):
            prompt, chosen, rejected = (self._token_ids(row.get(name), name) for name in PRETOKENIZED_COLUMNS)
        else:
            prompt_text, chosen_text, rejected_text = self._texts(row)
            prompt, chosen, rejected = self._split(prompt_text, chosen_text, rejected_text)
        return self._finish(prompt, chosen, rejected)

    # -- the three forms ------------------------------------------------------------------------------------

    def _token_ids(self, value, name: str) -> list[int]:
        if value is None:
            raise BadRow("missing_field", f"{name} is null")
        if not isinstance(value, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in value):
            raise BadRow("wrong_type", f"{name} must be a list of integer token ids")
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in value):
            raise BadRow("wrong_type", f"{name} has ids outside the vocabulary [0, {vocab})")
        return list(value)

    def _texts(self, row: dict) -> tuple[str, str, str]:
        prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if value is None:
                raise BadRow("missing_field", f"{name} is null")
        if isinstance(chosen, str) and isinstance(rejected, str):
            if prompt is None:
                raise BadRow("missing_field", "prompt is null (plain-text rows need a prompt string)")
            if not isinstance(prompt, str):
                raise BadRow("wrong_type", "prompt must be a string when chosen/rejected are, got "
                                           f"{type(prompt).__name__}")
            for name, text in (("chosen", chosen), ("rejected", rejected)):
                if not text.strip():
                    raise BadRow("empty_completion", f"{name} is empty")
            return prompt, chosen, rejected
        return self._render_conversation(prompt, self._messages(chosen, "chosen"),
                                         self._messages(rejected, "rejected"), self._template_kwargs(row))

    def _template_kwargs(self, row: dict) -> dict:
        row_kwargs = row.get(CHAT_TEMPLATE_KWARGS_COLUMN)
        if row_kwargs is None:
            row_kwargs = {}
        if not isinstance(row_kwargs, dict):
            raise BadRow("wrong_type", f"{CHAT_TEMPLATE_KWARGS_COLUMN} must be an object (template variable -> "
                                       f"value), got {type(row_kwargs).__name__}")
        merged = {**self.chat_template_kwargs, **row_kwargs}
        return {key: value for key, value in merged.items() if value is not None}

    @staticmethod
    def _messages(value, name: str) -> list[dict]:
        if not isinstance(value, (list, tuple)) or not value:
            raise BadRow("wrong_type", f"{name} must be a string or a non-empty list of messages, "
                                       f"got {type(value).__name__}")
        messages = []
        for index, message in enumerate(value):
            if not isinstance(message, dict):
                raise BadRow("wrong_type", f"{name}[{index}] must be a message dict, got {type(message).__name__}")
            for key in ("role", "content"):
                if message.get(key) is None:
                    raise BadRow("missing_field", f"{name}[{index}] has no {key}")
            if not isinstance(message["role"], str):
                raise BadRow("wrong_type", f"{name}[{index}].role must be a string")
            content = message["content"]
            if not isinstance(content, str) and not (
                    isinstance(content, (list, tuple)) and all(isinstance(block, dict) for block in content)):
                raise BadRow("wrong_type", f"{name}[{index}].content must be a string or a list of content blocks "
                                           '([{"type": "text", "text": ...}])')
            messages.append(dict(message))
        return messages

    @staticmethod
    def _content_text(content) -> str:
        """The text of a message's content: the string, or its text blocks joined."""
        if isinstance(content, str):
            return content
        return "".join(block["text"] for block in content if isinstance(block.get("text"), str))

    def _render_conversation(self, prompt, chosen: list[dict], rejected: list[dict], template_kwargs: dict
                             ) -> tuple[str, str, str]:
        if isinstance(prompt, (list, tuple)):  # explicit prompt: chosen/rejected hold the completion turn(s)
            prompt_messages = self._messages(prompt, "prompt")
            chosen_turns, rejected_turns = chosen, rejected
        else:
            if prompt is not None and not isinstance(prompt, str):
                raise BadRow("wrong_type", "prompt must be a string or a list of messages, got "
                                           f"{type(prompt).__name__}")
            if chosen[:-1] != rejected[:-1]:
                raise BadRow("prompt_mismatch", "chosen[:-1] != rejected[:-1]")
            prompt_messages = chosen[:-1]
            if not prompt_messages:
                if prompt is None:
                    raise BadRow("missing_field", "no prompt: the conversations hold only the completion turn")
                prompt_messages = [{"role": "user", "content": prompt}]
            chosen_turns, rejected_turns = chosen[-1:], rejected[-1:]
        for name, turns in (("chosen", chosen_turns), ("rejected", rejected_turns)):
            if turns[-1]["role"] != "assistant":
                raise BadRow("no_assistant_completion", f"{name} ends with a {turns[-1]['role']!r} turn")
            if not self._content_text(turns[-1]["content"]).strip():
                raise BadRow("empty_completion", f"{name} assistant turn is empty")
        if self.chat_template is None:
            raise ConfigError(f"the rows are message lists but the tokenizer in {self.tokenizer_dir} has no chat "
                             "template: pass --chat-template zephyr|mistral|chatml or a jinja file")
        prompt_text = self._render(prompt_messages, True, template_kwargs)
        full_texts = [self._render(prompt_messages + turns, False, template_kwargs)
                      for turns in (chosen_turns, rejected_turns)]
        if not all(full.startswith(prompt_text) for full in full_texts):  # a reasoning template: see the docstring
            turns_text = self._render(prompt_messages, False, template_kwargs)
            for name, full in zip(("chosen", "rejected"), full_texts):
                if not full.startswith(turns_text):
                    raise BadRow("template_error", f"the rendered {name} conversation does not start with the "
                                                   "rendered prompt turns")
            prompt_text = prompt_text[:min(_common_prefix(prompt_text, full) for full in full_texts)]
        return prompt_text, full_texts[0][len(prompt_text):], full_texts[1][len(prompt_text):]

    def _render(self, messages: list[dict], add_generation_prompt: bool, template_kwargs: dict) -> str:
        try:
            return render(self.chat_template, messages, self.tokenizer.named_special_tokens, add_generation_prompt,
                          **template_kwargs)
        except Exception as error:  # a template's raise_exception or a jinja error; the row is bad, not the run
            raise BadRow("template_error", f"{type(error).__name__}: {error}") from error

    def _split(self, prompt_text: str, chosen_text: str, rejected_text: str) -> tuple[list[int], list[int], list[int]]:
        encode = self.tokenizer.encode
        prompt_alone = encode(prompt_text)
        chosen_full, rejected_full = encode(prompt_text + chosen_text), encode(prompt_text + rejected_text)
        split = min(_common_prefix(prompt_alone, chosen_full), _common_prefix(prompt_alone, rejected_full))
        return chosen_full[:split], chosen_full[split:], rejected_full[split:]

    # -- common to all forms ----------------------------------------------------------------------------------

    def _finish(self, prompt: list[int], chosen: list[int], rejected: list[int]) -> TokenizedPair:
        tok = self.tokenizer
        if tok.add_bos_token and prompt[:1] != [tok.bos_id]:
            prompt = [tok.bos_id] + prompt
        chosen, rejected = self._end_with_eos(chosen, "chosen"), self._end_with_eos(rejected, "rejected")
        lengths_before = len(prompt), len(chosen), len(rejected)
        limits = self.truncation
        prompt_truncated = False
        if (len(prompt) + max(len(chosen), len(rejected)) > limits.max_length
                and 0 < limits.max_prompt_length < len(prompt)):
            prompt = self._truncate_prompt(prompt)
            prompt_truncated = True
        budget = limits.max_length - len(prompt)
        if budget <= 0:
            raise BadRow("prompt_too_long", f"the prompt has {len(prompt)} tokens, --max-length is "
                                            f"{limits.max_length} and prompt truncation is off")
        chosen_truncated, rejected_truncated = len(chosen) > budget, len(rejected) > budget
        chosen, rejected = chosen[:budget], rejected[:budget]
        if chosen == rejected:
            raise BadRow("chosen_equals_rejected", f"both completions are the same {len(chosen)} tokens"
                                                   + (" after truncation" if chosen_truncated else ""))
        return TokenizedPair(prompt, chosen, rejected, *lengths_before, prompt_truncated, chosen_truncated,
                             rejected_truncated)

    def _end_with_eos(self, completion: list[int], name: str) -> list[int]:
        tok = self.tokenizer
        eos, whitespace = tok.eos_id, tok.whitespace_ids
        if eos in completion:
            last_eos = len(completion) - 1 - completion[::-1].index(eos)
            if all(t in whitespace for t in completion[last_eos + 1:]):
                completion = completion[:last_eos + 1]
        if all(t == eos or t in whitespace for t in completion):
            raise BadRow("empty_completion", f"{name} has no token besides EOS and whitespace")
        return completion if completion[-1] == eos else completion + [eos]

    def _truncate_prompt(self, prompt: list[int]) -> list[int]:
        keep = self.truncation.max_prompt_length
        if self.truncation.truncation_mode == "keep_start":
            return prompt[:keep]
        bos = self.tokenizer.bos_id
        if prompt[0] == bos:  # BOS must stay first: keep it and the last keep-1 tokens
            return [bos] + prompt[len(prompt) - (keep - 1):] if keep > 1 else [bos]
        return prompt[len(prompt) - keep:]


def _common_prefix(a: list[int] | str, b: list[int] | str) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length
