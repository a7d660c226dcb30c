"""Prompt formats: the one function that turns a conversation into model input, for generation and training alike.

A format renders the conversation up to the answer (`render_prompt`) and wraps an answer when it is a training
target (`render_completion`), so generation and training can never disagree. Special tokens are added exactly
once: the rendered text never starts with a BOS that the tokenizer will add again when encoding (the reference
experiment wrote `<s>` by hand on top of the tokenizer's own BOS).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from selfalign.errors import SelfAlignError
from selfalign.templating import render_template

Message = dict[str, str]
AUTO = "auto"
CHAT_TEMPLATE = "chat-template"


@functools.cache
def named_formats() -> dict[str, dict[str, Any]]:
    text = resources.files("selfalign.models").joinpath("formats.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def as_messages(prompt: str | list[Message], system_prompt: str | None = None) -> list[Message]:
    """A plain prompt string becomes one user turn; a list of messages is taken as it is."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos_id


@dataclass(frozen=True)
class PromptFormat:
    """A way to render conversations for one tokenizer. Build it with `get_prompt_format`."""

    name: str
    tokenizer: Any  # None for backends that have no local tokenizer
    template: str | None  # Jinja source for named formats; None means the tokenizer's chat template
    completion_prefix: str
    completion_suffix: str
    stop: tuple[str, ...]

    def render_prompt(self, prompt: str | list[Message], system_prompt: str | None = None) -> str:
        """Text to encode with `encode`: the conversation up to where the model answers."""
        messages = as_messages(prompt, system_prompt)
        if self.template is None:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = render_template(
                self.template,
                origin=f"prompt format '{self.name}'",
                messages=messages,
                bos_token=_token(self.tokenizer, "bos"),
                eos_token=_token(self.tokenizer, "eos"),
            )
        return self._without_duplicate_bos(text)

    def render_completion(self, completion: str) -> str:
        """An answer as a training target, following `render_prompt(...)` directly."""
        return self.completion_prefix + completion.strip() + self.completion_suffix

    def encode(self, text: str) -> list[int]:
        """Token ids of a rendered prompt; the tokenizer adds its special tokens here and only here."""
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def _without_duplicate_bos(self, text: str) -> str:
        bos = _token(self.tokenizer, "bos")
        if bos and text.startswith(bos) and tokenizer_adds_bos(self.tokenizer):
            return text[len(bos) :]
        return text


def _token(tokenizer: Any, kind: str) -> str:
    """The text of a tokenizer's BOS or EOS token; backends without a tokenizer (scripted, servers) have none."""
    return getattr(tokenizer, f"{kind}_token", None) or ""


def get_prompt_format(tokenizer: Any, name: str = AUTO) -> PromptFormat:
    """`auto`: the tokenizer's chat template if it has one, else `plain`. Also a named format or a YAML file path."""
    if name == AUTO:
        name = CHAT_TEMPLATE if getattr(tokenizer, "chat_template", None) else "plain"
    if name == CHAT_TEMPLATE:
        if not getattr(tokenizer, "chat_template", None):
            raise SelfAlignError(
                f"prompt format '{CHAT_TEMPLATE}': this tokenizer has no chat template; "
                f"choose one of: {', '.join(named_formats())}"
            )
        prefix, suffix = _chat_template_completion_wrapping(tokenizer)
        return PromptFormat(CHAT_TEMPLATE, tokenizer, None, prefix, suffix, ())
    spec, origin = _format_spec(name)
    suffix = render_template(spec.get("completion_suffix", ""), origin=origin, eos_token=_token(tokenizer, "eos"))
    return PromptFormat(
        name=name,
        tokenizer=tokenizer,
        template=spec["template"],
        completion_prefix=spec.get("completion_prefix", ""),
        completion_suffix=suffix,
        stop=tuple(spec.get("stop", ())),
    )


def _format_spec(name: str) -> tuple[dict[str, Any], str]:
    formats = named_formats()
    if name in formats:
        return formats[name], f"prompt format '{name}'"
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(spec, dict) or not isinstance(spec.get("template"), str):
            raise SelfAlignError(f"{path}: a prompt format file needs a 'template' string")
        return spec, str(path)
    accepted = ", ".join([AUTO, CHAT_TEMPLATE, *formats])
    raise SelfAlignError(f"unknown prompt format '{name}'; accepted: {accepted}, or a path to a format .yaml file")


def _chat_template_completion_wrapping(tokenizer: Any) -> tuple[str, str]:
    """What a chat template writes between the generation prompt and an answer, and after the answer."""
    marker = "SELFALIGN_ANSWER_MARKER"
    question = [{"role": "user", "content": "Q"}]
    prompt = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*question, {"role": "assistant", "content": marker}], tokenize=False, add_generation_prompt=False
    )
    if not full.startswith(prompt) or marker not in full:
        # Templates that rewrite earlier turns (e.g. drop reasoning) cannot be split; fall back to EOS-terminated.
        return "", tokenizer.eos_token or ""
    start = full.index(marker)
    return full[len(prompt) : start], full[start + len(marker) :]
