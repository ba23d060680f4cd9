"""Chat templates: render OpenAI `messages` into a prompt with a Jinja template.

The model's own template (from GGUF metadata or the tokenizer config) comes first. A model
without one (Gemma 3 270M is a base model) gets `--chat-template` (a file or a known name) or
the known template for its architecture; never an empty prompt. Templates run in Jinja's
sandbox, as Hugging Face does, since they come from model files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

KNOWN: dict[str, tuple[str, list[str]]] = {
    # name: (template, stop strings)
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        ["<|im_end|>"],
    ),
    "gemma": (
        "{{ bos_token }}{% set sys = namespace(text='') %}"
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{% set sys.text = sys.text + m['content'] + '\n\n' %}{% else %}"
        "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
        "{% if m['role'] == 'user' %}{{ sys.text }}{% set sys.text = '' %}{% endif %}"
        "{{ m['content'] | trim }}<end_of_turn>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
        ["<end_of_turn>"],
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
        "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
        ["<|eot_id|>"],
    ),
    "plain": (
        "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}",
        ["\nUser:", "\nSystem:"],
    ),
}

# A known template for architectures whose base models ship none.
BY_ARCHITECTURE = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma"}


class ChatTemplateError(ValueError):
    """The template failed on these messages (e.g. it forbids a role order)."""


@dataclass
class ChatTemplate:
    source: str
    name: str  # where it came from: "model", a known name, or a file path
    stop: list[str] = field(default_factory=list)
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None,
               variables: dict[str, Any] | None = None) -> str:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(message)

        env.globals["raise_exception"] = raise_exception
        try:
            template = env.from_string(self.source)
            return template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **(variables or {}),
            )
        except ChatTemplateError:
            raise
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template ({self.name}) failed: {e}") from e


def choose(
    own: str | None,
    requested: str | None,
    architecture: str | None,
    bos_token: str = "",
    eos_token: str = "",
) -> ChatTemplate:
    """The template to use: `--chat-template` if given, else the model's own, else a known one."""
    if requested:
        if requested in KNOWN:
            src, stop = KNOWN[requested]
            return ChatTemplate(src, requested, list(stop), bos_token, eos_token)
        path = Path(requested).expanduser()
        if not path.is_file():
            raise ValueError(
                f"--chat-template {requested!r} is neither a file nor a known name "
                f"({', '.join(KNOWN)})"
            )
        return ChatTemplate(path.read_text(), str(path), [], bos_token, eos_token)
    if own:
        return ChatTemplate(own, "model", [], bos_token, eos_token)
    name = BY_ARCHITECTURE.get((architecture or "").lower(), "chatml")
    src, stop = KNOWN[name]
    return ChatTemplate(src, name, list(stop), bos_token, eos_token)
