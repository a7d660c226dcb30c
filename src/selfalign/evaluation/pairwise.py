"""Pairwise helpfulness of a variant's answers against the base model's, judged in both orders.

One log-probability forward per order: P(' A') against P(' B') after the template's prefix. The variant wins an
item only when both orders prefer it, loses only when both prefer the base, and ties otherwise (including
identical answers, which are not judged at all).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated

from selfalign.config import loaded_by
from selfalign.errors import SelfAlignError
from selfalign.models.language_model import LanguageModel
from selfalign.templating import parse_template_yaml, read_template_file, render_template, template_variables

REQUIRED = ("request", "answer_a", "answer_b")


@functools.lru_cache(maxsize=8)
def load_pairwise_template(name_or_path: str = "pairwise") -> dict:
    if name_or_path.endswith((".yaml", ".yml")):
        path, source = Path(name_or_path), name_or_path
        if not path.is_file():
            raise SelfAlignError(f"{path}: pairwise template file not found")
        spec = parse_template_yaml(read_template_file(path), source)
    else:
        folder = resources.files("selfalign.evaluation").joinpath("templates")
        shipped = folder.joinpath(f"{name_or_path}.yaml")
        if not shipped.is_file():
            raise SelfAlignError(f"unknown pairwise template '{name_or_path}'")
        source = f"pairwise template '{name_or_path}'"
        spec = parse_template_yaml(shipped.read_text(encoding="utf-8"), source)
    if not isinstance(spec, dict) or not isinstance(spec.get("prompt"), str) or len(spec.get("labels", [])) != 2:
        raise SelfAlignError(f"{source}: needs a 'prompt' string and two 'labels'")
    missing = [name for name in REQUIRED if name not in template_variables(spec["prompt"], source)]
    if missing:
        raise SelfAlignError(f"{source}: the prompt never uses {', '.join(missing)}")
    return {**spec, "source": source}


PairwiseTemplateName = Annotated[str, loaded_by(load_pairwise_template)]


def compare_answers(
    judge: LanguageModel, requests: Sequence[str], variant: Sequence[str], base: Sequence[str], template: str
) -> list[dict]:
    """Per item: {'outcome': 1 win / 0.5 tie / 0 loss for the variant, 'p_variant_first', 'p_variant_second'}."""
    spec = load_pairwise_template(template)
    label_a, label_b = spec["labels"]
    to_judge = [i for i in range(len(requests)) if variant[i].strip() != base[i].strip()]
    prompts = []
    for i in to_judge:
        for answer_a, answer_b in ((variant[i], base[i]), (base[i], variant[i])):
            prompts.append(
                render_template(
                    spec["prompt"], origin=spec["source"], request=requests[i], answer_a=answer_a, answer_b=answer_b
                )
            )
    scores = judge.score(prompts * 2, [label_a] * len(prompts) + [label_b] * len(prompts), spec["response_prefix"])
    log_a, log_b = scores[: len(prompts)], scores[len(prompts) :]
    p_first_is_a = [1.0 / (1.0 + math.exp(b - a)) for a, b in zip(log_a, log_b)]
    results = [{"outcome": 0.5, "p_variant_first": None, "p_variant_second": None, "identical": True} for _ in requests]
    for position, i in enumerate(to_judge):
        p_variant_as_a = p_first_is_a[2 * position]
        p_variant_as_b = 1.0 - p_first_is_a[2 * position + 1]
        if p_variant_as_a > 0.5 and p_variant_as_b > 0.5:
            outcome = 1.0
        elif p_variant_as_a < 0.5 and p_variant_as_b < 0.5:
            outcome = 0.0
        else:
            outcome = 0.5
        results[i] = {
            "outcome": outcome,
            "p_variant_first": p_variant_as_a,
            "p_variant_second": p_variant_as_b,
            "identical": False,
        }
    return results
