"""Pairwise helpfulness of a variant's answers against the base model's, judged in both orders.

One log-probability forward per order: P(' A') against P(' B') after the template's prefix, normalised over the two
labels. An item's outcome is P(variant better) averaged over the two orders (MT-Bench's remedy for position bias,
kept soft as AlpacaEval's length-controlled win-rate keeps its preference): a small judge that prefers whichever
answer comes first, as the embedded model does, then reads near 0.5 instead of turning every disagreement into an
exact tie, and a preference that holds in both orders moves the outcome. Identical answers are not judged (0.5).
Per item the judge's position preference is kept too: P(first better) averaged over both orders, 0.5 when it has
none; `position_bias` summarises it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated

from selfalign.backends.language_model import LanguageModel
from selfalign.config import loaded_by
from selfalign.errors import SelfAlignError
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
    """Per item: {'outcome': P(variant better) averaged over both orders, 'p_variant_first', 'p_variant_second',
    'p_first_better' (the judge's preference for position A averaged over both orders), 'consistent' (both orders
    prefer the same answer), 'identical'}."""
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
    results = [
        {"outcome": 0.5, "p_variant_first": None, "p_variant_second": None, "p_first_better": None,
         "consistent": None, "identical": True}
        for _ in requests
    ]  # fmt: skip
    for position, i in enumerate(to_judge):
        p_variant_as_a = p_first_is_a[2 * position]
        p_variant_as_b = 1.0 - p_first_is_a[2 * position + 1]
        results[i] = {
            "outcome": (p_variant_as_a + p_variant_as_b) / 2,
            "p_variant_first": p_variant_as_a,
            "p_variant_second": p_variant_as_b,
            "p_first_better": (p_first_is_a[2 * position] + p_first_is_a[2 * position + 1]) / 2,
            "consistent": (p_variant_as_a > 0.5) == (p_variant_as_b > 0.5),
            "identical": False,
        }
    return results


def position_bias(results: Sequence[dict]) -> dict:
    """How much the judge prefers the first answer whatever it is: mean P(first better) over the judged items
    (0.5: none; 1.0: always the first), and the share of items on which both orders prefer the same answer."""
    judged = [r for r in results if not r.get("identical") and r.get("p_first_better") is not None]
    if not judged:
        return {"n": 0, "p_first_better": None, "consistent": None}
    return {
        "n": len(judged),
        "p_first_better": sum(r["p_first_better"] for r in judged) / len(judged),
        "consistent": sum(r["consistent"] for r in judged) / len(judged),
    }
