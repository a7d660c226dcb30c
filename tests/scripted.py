"""A LanguageModel over the scripted backend, for stage tests that must run instantly."""

from __future__ import annotations

from collections.abc import Callable

from selfalign.backends.language_model import LanguageModel, ModelConfig
from selfalign.backends.scripted import ScriptedBackend
from selfalign.models.formats import get_prompt_format


def scripted_model(
    rules: list[tuple[str, str]] | Callable[[str], str] = (),
    default: str = "",
    score_rule: Callable[[str, str], float] | None = None,
) -> LanguageModel:
    backend = ScriptedBackend(rules=rules, default=default, score_rule=score_rule)
    return LanguageModel(ModelConfig(backend="scripted"), backend, get_prompt_format(None, "plain"))
