"""A scripted backend with fixed answers and scores, like inspect_ai's mock model: stage tests run instantly."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from selfalign.backends.base import Completion, GenerationParams, check_score_inputs, truncate_at_stop
from selfalign.errors import SelfAlignError

ResponseRule = Callable[[str], str]
ScoreRule = Callable[[str, str], float]


class ScriptedBackend:
    """Answers by rule: the first `(substring, answer)` whose substring occurs in the prompt, else `default`.

    `score_rule(prompt, continuation)` gives log-probabilities (default: every continuation scores -1.0). Every
    call is recorded in `calls` so tests can check what a stage asked for, and that nothing was asked twice.
    """

    name = "scripted"
    tokenizer = None

    def __init__(
        self,
        rules: Sequence[tuple[str, str]] | ResponseRule = (),
        default: str = "",
        score_rule: ScoreRule | None = None,
    ) -> None:
        self.rules = rules
        self.default = default
        self.score_rule = score_rule or (lambda prompt, continuation: -1.0)
        self.calls: list[tuple[str, list[str]]] = []

    def respond(self, prompt: str) -> str:
        if callable(self.rules):
            return self.rules(prompt)
        return next((answer for needle, answer in self.rules if needle in prompt), self.default)

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[Completion]:
        self.calls.append(("generate", list(prompts)))
        completions = []
        for prompt in prompts:
            words = self.respond(prompt).split(" ")
            text = " ".join(words[: params.max_new_tokens])
            text, stopped = truncate_at_stop(text, params.stop)
            finish = "stop" if stopped or len(words) <= params.max_new_tokens else "length"
            completions.append(Completion(text.strip(), len(prompt.split()), len(text.split()), finish))
        return completions

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        check_score_inputs(prompts, continuations)
        self.calls.append(("score", list(prompts)))
        return [float(self.score_rule(p, c)) for p, c in zip(prompts, continuations)]


def create_scripted_backend(config: Any) -> ScriptedBackend:
    """`backend: scripted` with `options: {rules: [[substring, answer], ...], default: answer}`."""
    options = dict(config.options)
    rules = options.pop("rules", [])
    default = options.pop("default", "")
    if options:
        raise SelfAlignError(f"scripted backend: unknown options {sorted(options)}; known: rules, default")
    if not all(isinstance(rule, (list, tuple)) and len(rule) == 2 for rule in rules):
        raise SelfAlignError("scripted backend: options.rules must be a list of [substring, answer] pairs")
    return ScriptedBackend(rules=[(str(needle), str(answer)) for needle, answer in rules], default=str(default))
