"""The generation backend interface: two operations, no framework types.

`generate` answers prompts; `score` gives the log-probability of continuations (what a log-probability judge
needs). transformers, vLLM and OpenAI-compatible servers implement it, and a scripted backend makes stage tests
instant. Prompts arrive already rendered by a PromptFormat: backends never add templates of their own.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import Field

from selfalign.config import StrictModel
from selfalign.errors import SelfAlignError

FinishReason = Literal["stop", "length"]


class GenerationParams(StrictModel):
    """Sampling settings. temperature 0 means greedy decoding."""

    max_new_tokens: int = Field(256, ge=1, description="Most tokens generated per prompt.")
    temperature: float = Field(0.0, ge=0.0, description="0 is greedy; above 0 samples.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (sampling only).")
    repetition_penalty: float = Field(
        1.0,
        gt=0.0,
        description="1.0 is off; the reference experiment used 1.15. transformers and vLLM penalise every token "
        "already in the prompt too: with worked exemplars in context, 1.15 kept the embedded model from ever writing "
        "a refusal (benchmarks/policy.py).",
    )
    no_repeat_ngram_size: int = Field(
        0,
        ge=0,
        description="Never repeat a token n-gram of this size within the answer (0 is off; the prompt does not count). "
        "transformers only: vLLM has no such option; OpenAI-compatible servers take an output-only penalty through "
        "the backend's extra_body ({frequency_penalty: 0.5}, or llama.cpp's DRY sampler {dry_multiplier: 0.8}).",
    )
    stop: list[str] = Field(default_factory=list, description="Generation ends at the first of these strings.")
    seed: int = Field(0, description="Seed for sampling, so runs repeat.")


@dataclass(frozen=True)
class Completion:
    text: str  # up to (not including) the stop string or EOS
    prompt_tokens: int
    completion_tokens: int  # tokens up to the stop, not padding
    finish_reason: FinishReason


@runtime_checkable
class Backend(Protocol):
    name: str
    tokenizer: Any  # the model's tokenizer where the backend has one (prompt formats need it), else None

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[Completion]:
        """One completion per prompt, in input order."""
        ...

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """Sum of log-probabilities of each continuation's tokens following its prompt, in input order."""
        ...


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` at the earliest stop string; True when one was found."""
    cut = min((index for s in stop if s and (index := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def check_score_inputs(prompts: Sequence[str], continuations: Sequence[str]) -> None:
    if len(prompts) != len(continuations):
        raise SelfAlignError(f"score: {len(prompts)} prompts but {len(continuations)} continuations")
    if any(not c for c in continuations):
        raise SelfAlignError("score: every continuation needs at least one character")


BackendFactory = Callable[[Any], Backend]  # ModelConfig -> Backend


@dataclass
class BackendRegistry:
    """Backends by name, so configs say `backend: transformers` and new engines plug in without edits here.

    Built-in backends are registered as "module:function" strings and imported on first use, so that choosing
    the scripted backend never imports torch.
    """

    factories: dict[str, BackendFactory | str] = field(default_factory=dict)
    # name -> "module:Class" of the pydantic model of its `options:`, so configs are checked when they load
    options_models: dict[str, str] = field(default_factory=dict)
    # backends that serve the base model and several adapters from one load: their factory takes
    # `adapters=[paths]` and their backend has `with_adapter(path | None)`, a view of the same engine
    serves_adapters: set[str] = field(default_factory=set)

    def register(self, name: str) -> Callable[[BackendFactory], BackendFactory]:
        def decorator(factory: BackendFactory) -> BackendFactory:
            self.factories[name] = factory
            return factory

        return decorator

    def create(self, name: str, config: Any, adapters: Sequence[str] = ()) -> Backend:
        """Backend `name` for `config`; `adapters`: more adapters it will serve (`serves_adapters` backends only)."""
        if adapters and name not in self.serves_adapters:
            raise SelfAlignError(f"backend '{name}' loads one adapter per model; it cannot serve several")
        factory = self.factories.get(name)
        if factory is None:
            raise SelfAlignError(f"unknown backend '{name}'; available: {', '.join(sorted(self.factories))}")
        if isinstance(factory, str):
            module_name, _, function_name = factory.partition(":")
            factory = getattr(importlib.import_module(module_name), function_name)
        return factory(config, adapters=adapters) if adapters else factory(config)  # type: ignore[call-arg]

    def options_model(self, name: str) -> type[StrictModel] | None:
        """The pydantic model of backend `name`'s options, or None where the backend checks its own."""
        target = self.options_models.get(name)
        if target is None:
            return None
        module_name, _, class_name = target.partition(":")
        return getattr(importlib.import_module(module_name), class_name)

    def check_options(self, name: str, options: dict[str, Any]) -> None:
        """Raise ValueError naming the first bad option, so a misspelt option fails before any stage runs."""
        from pydantic import ValidationError

        model = self.options_model(name)
        if model is None:
            return
        try:
            model.model_validate(options)
        except ValidationError as exc:
            error = exc.errors()[0]
            key = ".".join(str(part) for part in error["loc"])
            problem = (
                "unknown option" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
            )
            raise ValueError(f"backend {name}: {f'{key}: ' if key else ''}{problem}") from None

    def output_neutral_options(self, name: str) -> frozenset[str]:
        """Options that change how outputs are fetched (servers, concurrency, retries) but never what they are:
        cache keys leave them out, so adding a server reruns nothing (as inspect_ai leaves out retries)."""
        model = self.options_model(name)
        return getattr(model, "OUTPUT_NEUTRAL", frozenset()) if model is not None else frozenset()


BACKENDS = BackendRegistry(
    {
        "transformers": "selfalign.backends.transformers_backend:create_transformers_backend",
        "scripted": "selfalign.backends.scripted:create_scripted_backend",
        "openai": "selfalign.backends.openai_backend:create_openai_backend",
        "vllm": "selfalign.backends.vllm_backend:create_vllm_backend",
    },
    {
        "openai": "selfalign.backends.openai_backend:OpenAIOptions",
        "vllm": "selfalign.backends.vllm_backend:VLLMOptions",
    },
    {"vllm"},
)
