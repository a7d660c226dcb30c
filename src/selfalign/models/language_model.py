"""A model as the stages see it: a backend plus the prompt format that turns requests into its input."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, SerializationInfo, field_serializer, model_validator

from selfalign.backends.base import BACKENDS, Backend, Completion, GenerationParams
from selfalign.config import StrictModel
from selfalign.models.formats import AUTO, Message, PromptFormat, get_prompt_format
from selfalign.models.references import DEFAULT_MODEL


class ModelConfig(StrictModel):
    """Which model answers, through which backend, in which prompt format."""

    model: str = Field(DEFAULT_MODEL, description="Model reference: embedded:NAME, ORG/NAME, a folder or a .gguf.")
    backend: str = Field("transformers", description="Generation backend: transformers, scripted, ...")
    adapter: str | None = Field(None, description="Path of a PEFT adapter applied on top of the model.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bf16 on GPUs and on CPUs with bf16 units, fp32 otherwise."
    )
    load_in_4bit: bool = Field(False, description="NF4 4-bit weights via bitsandbytes (CUDA only).")
    batch_size: int = Field(32, ge=1, description="Prompts per generation batch.")
    prompt_format: str = Field("auto", description="auto, chat-template, plain, mistral-inst, raw or a format .yaml.")
    system_prompt: str | None = Field(None, description="System message placed before every request.")
    options: dict[str, Any] = Field(default_factory=dict, description="Backend-specific settings.")

    @model_validator(mode="after")
    def _known_options(self) -> ModelConfig:
        BACKENDS.check_options(self.backend, self.options)  # a misspelt option fails when the config loads
        return self

    @field_serializer("options")
    def _options_for(self, options: dict[str, Any], info: SerializationInfo) -> dict[str, Any]:
        """With context {"cache_key": True} (stage keys), options that cannot change an output are left out."""
        if not (info.context or {}).get("cache_key"):
            return options
        neutral = BACKENDS.output_neutral_options(self.backend)
        return {key: value for key, value in options.items() if key not in neutral}


@dataclass
class LanguageModel:
    config: ModelConfig
    backend: Backend
    prompt_format: PromptFormat

    def render(self, request: str | list[Message], answer_prefix: str = "") -> str:
        """The model input for a request; `answer_prefix` starts the answer for the model (e.g. '#answer:')."""
        text = self.prompt_format.render_prompt(request, self.config.system_prompt)
        return text + self.prompt_format.completion_prefix + answer_prefix if answer_prefix else text

    def answer(
        self, requests: Sequence[str | list[Message]], params: GenerationParams, answer_prefix: str = ""
    ) -> list[Completion]:
        """Render each request in the model's format and generate; the format's stop strings are always added."""
        stop = list(dict.fromkeys([*params.stop, *self.prompt_format.stop]))
        rendered = [self.render(request, answer_prefix) for request in requests]
        return self.backend.generate(rendered, params.model_copy(update={"stop": stop}))

    def score(
        self, requests: Sequence[str | list[Message]], continuations: Sequence[str], answer_prefix: str = ""
    ) -> list[float]:
        return self.backend.score([self.render(request, answer_prefix) for request in requests], continuations)

    def count_tokens(self, text: str) -> int | None:
        """Tokens of a rendered input, where the backend has a local tokenizer."""
        return len(self.prompt_format.encode(text)) if self.prompt_format.tokenizer is not None else None


def load_language_model(config: ModelConfig) -> LanguageModel:
    backend = BACKENDS.create(config.backend, config)
    name = config.prompt_format
    if name == AUTO:
        # A backend may know better than the tokenizer: a chat endpoint applies the server's template itself.
        name = getattr(backend, "default_prompt_format", AUTO)
    return LanguageModel(config, backend, get_prompt_format(backend.tokenizer, name))
