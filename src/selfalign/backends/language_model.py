"""A model as the stages see it: a backend plus the prompt format that turns requests into its input."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, SerializationInfo, field_serializer, model_validator

from selfalign.backends.base import BACKENDS, Backend, Completion, GenerationParams
from selfalign.config import StrictModel
from selfalign.errors import SelfAlignError
from selfalign.models.formats import AUTO, Message, PromptFormat, get_prompt_format
from selfalign.models.references import DEFAULT_MODEL

Pooling = Literal["last", "answer", "prompt"]
POOLINGS: tuple[Pooling, ...] = ("last", "answer", "prompt")  # how hidden states become one vector per input


class ModelConfig(StrictModel):
    """Which model answers, through which backend, in which prompt format."""

    model: str = Field(DEFAULT_MODEL, description="Model reference: embedded:NAME, ORG/NAME, a folder or a .gguf.")
    backend: str = Field("transformers", description="Generation backend: transformers, scripted, ...")
    adapter: str | None = Field(None, description="Path of a PEFT adapter applied on top of the model.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bf16 on GPUs and on CPUs with bf16 units, fp32 otherwise."
    )
    load_in_4bit: bool = Field(False, description="NF4 4-bit weights via bitsandbytes (CUDA only).")
    # 128: on 2 CPU cores the embedded model's decoding steps are the cheapest per row there (64: 1.16x the time of
    # the v2 evaluation, 256: as slow as 128 at 1.4x the memory; BENCHMARKS.md, "Evaluation on the v2 test sets").
    batch_size: int = Field(128, ge=1, description="Prompts per generation batch.")
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

    def hidden_states(
        self, requests: Sequence[str], answers: Sequence[str], layers: Sequence[int] | None = None,
        answer_prefix: str = "",
    ) -> dict[Pooling, Any]:  # fmt: skip
        """Pooled hidden states of each rendered request, {pooling: float32 numpy [request, layer, hidden]}, from one
        forward pass; `answers[i]` is the text in request i (its last occurrence) that `answer` pooling averages."""
        return self.hidden_states_and_scores(requests, answers, layers, answer_prefix)[0]

    def hidden_states_and_scores(
        self, requests: Sequence[str], answers: Sequence[str], layers: Sequence[int] | None = None,
        answer_prefix: str = "", continuations: Sequence[str] = (),
    ) -> tuple[dict[Pooling, Any], list[list[float]] | None]:  # fmt: skip
        """`hidden_states`, and from the same forward pass what `score` gives each of `continuations` after each
        request ([request][continuation]); None in place of those where the continuations differ in more than their
        last token, as one pass reads one next token (score them then)."""
        backend = self._hidden_state_backend()
        rendered = [self.render(request, answer_prefix) for request in requests]
        spans = [_answer_span(text, request, answer) for text, request, answer in zip(rendered, requests, answers)]
        pooled, log_probs = backend.hidden_states(rendered, spans, layers, continuations)
        return pooled, None if log_probs is None else log_probs.tolist()

    @property
    def has_hidden_states(self) -> bool:
        return hasattr(self.backend, "hidden_states")

    @property
    def hidden_size(self) -> int:
        return self._hidden_state_backend().hidden_size

    @property
    def hidden_state_count(self) -> int:
        """How many hidden states a forward pass gives: the embeddings, then one per layer."""
        return self._hidden_state_backend().hidden_state_count

    def _hidden_state_backend(self) -> Any:
        if not self.has_hidden_states:
            raise SelfAlignError(
                f"the probe judge needs the transformers backend (hidden states); this model uses '{self.backend.name}'"
            )
        return self.backend

    def close(self) -> None:
        """Release what the backend holds (vLLM: its engine and GPU memory; the engine is shared with every
        variant made by `with_adapter`); a no-op for backends that have nothing to release."""
        close = getattr(self.backend, "close", None)
        if callable(close):
            close()

    def merge_adapter(self) -> None:
        """For a model that only answers and scores: fold its adapter into its weights where the backend can
        (transformers: `TransformersBackend.merge_adapter`), which makes it faster; a no-op elsewhere."""
        merge = getattr(self.backend, "merge_adapter", None)
        if callable(merge) and self.config.adapter:
            merge()

    def with_adapter(self, config: ModelConfig) -> LanguageModel:
        """Variant `config` (this model with another adapter, or none) on this model's engine: backends in
        BACKENDS.serves_adapters only, loaded with that adapter among `adapters`."""
        return LanguageModel(config, self.backend.with_adapter(config.adapter), self.prompt_format)  # type: ignore[attr-defined]

    def count_tokens(self, text: str) -> int | None:
        """Tokens of a rendered input, where the backend has a local tokenizer."""
        return len(self.prompt_format.encode(text)) if self.prompt_format.tokenizer is not None else None


def _answer_span(rendered: str, request: str, answer: str) -> tuple[int, int] | None:
    """Character span of `answer` in the rendered input: its last occurrence inside the request, where the prompt
    format kept the request verbatim (so a short answer cannot match the format's own text), else in the whole."""
    answer = answer.strip()
    if not answer:
        return None
    offset = rendered.find(request)
    start = request.rfind(answer) if offset >= 0 else -1
    start = offset + start if start >= 0 else rendered.rfind(answer)
    if start < 0:
        raise SelfAlignError("hidden_states: an answer does not occur in the rendered request it belongs to")
    return start, start + len(answer)


def load_language_model(config: ModelConfig, adapters: Sequence[str] = ()) -> LanguageModel:
    """The model of `config`; `adapters`: more adapters its engine will serve through `with_adapter` (backends in
    BACKENDS.serves_adapters: vLLM)."""
    backend = BACKENDS.create(config.backend, config, adapters)
    name = config.prompt_format
    if name == AUTO:
        # A backend may know better than the tokenizer: a chat endpoint applies the server's template itself.
        name = getattr(backend, "default_prompt_format", AUTO)
    return LanguageModel(config, backend, get_prompt_format(backend.tokenizer, name))
