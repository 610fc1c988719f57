"""Chat templates: rendering a message list to text exactly as transformers' `apply_chat_template` does.

Owns the jinja2 environment (sandboxed, `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, a
non-escaping `tojson`, `strftime_now`, the `{% generation %}` tag of training templates, whose body is rendered),
the variables a template sees (the tokenizer's special tokens, `messages` with their reasoning fields aliased,
`tools`/`documents` (none), `add_generation_prompt`, extra `chat_template_kwargs` such as Qwen3's
`enable_thinking`) and the built-in templates for `--chat-template NAME` when `tokenizer_config.json` has
none. It does not tokenize and does not know which part of a conversation is the completion (`preference.py`).
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from orpo_megatron.errors import ConfigError

# The alignment-handbook's Zephyr template (recipes/zephyr-141b-A35b/orpo/config_full.yaml), also the one the tiny
# test tokenizer carries.
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

# Mistral/Mixtral-Instruct's [INST] format: BOS once, strictly alternating user/assistant turns, each assistant turn
# closed by EOS; a system message is prepended to the first user turn.
MISTRAL = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user, assistant and a leading system role are supported') }}"
    "{% endif %}"
    "{% endfor %}"
)

# ChatML (`<|im_start|>role\n...<|im_end|>\n`).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {"zephyr": ZEPHYR, "mistral": MISTRAL, "chatml": CHATML}


def resolve_chat_template(choice: str | None, tokenizer_template: str | None, tokenizer_dir: str) -> str | None:
    """The template to use: `--chat-template` (a built-in name or a jinja file) wins, else the tokenizer's own."""
    if choice is None:
        return tokenizer_template
    if choice in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[choice]
    if os.path.isfile(choice):
        with open(choice, encoding="utf-8") as f:
            return f.read()
    own = "has a" if tokenizer_template else "has no"
    raise ConfigError(f"--chat-template {choice!r}: expected one of {sorted(BUILTIN_TEMPLATES)} or a jinja file path "
                     f"(the tokenizer in {tokenizer_dir} {own} template of its own)")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (SmolLM3, Phi-4-reasoning, TRL's `*_training.jinja`): marks the
    assistant's output for transformers' assistant-token mask; rendering it is rendering its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


@lru_cache(maxsize=8)
def compile_template(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols, GenerationTag])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(template)


# Older names of a message's reasoning, filled in from each other as transformers does (Qwen3 reads
# `reasoning_content`, gpt-oss `thinking`).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def render(template: str, messages: list[dict], special_tokens: dict[str, str],
           add_generation_prompt: bool = False, **template_kwargs) -> str:
    """Render `messages` like `tokenizer.apply_chat_template(messages, tokenize=False, ...)`.

    `special_tokens` maps `bos_token`, `eos_token`, ... to their strings; `template_kwargs` (transformers'
    `**kwargs`, TRL's `chat_template_kwargs`) are further variables and win over special tokens of the same name.
    Keys of a message whose value is None are dropped first, as transformers does.
    """
    conversation = []
    for message in messages:
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in REASONING_FIELDS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        conversation.append(message)
    variables = {**special_tokens, **template_kwargs}
    return compile_template(template).render(messages=conversation, tools=None, documents=None,
                                             add_generation_prompt=add_generation_prompt, **variables)
