"""Capability retained: multiple-choice questions scored by log-likelihood, as lm-evaluation-harness does.

Each option is scored as the continuation " {choice}" after the question in the model's own prompt format; `acc`
counts the items whose right option has the highest summed log-probability, `acc_norm` the items whose right option
wins once each log-probability is divided by the option's length in characters (lm-evaluation-harness's `acc_norm`,
which stops longer options losing for their length alone). One forward pass scores every option: nothing is
generated, so the check is cheap beside answering. An adapter that forgot what the base model knew shows as a drop,
paired with the base on the same questions.
"""

from __future__ import annotations

from typing import Any

from selfalign.backends.language_model import LanguageModel
from selfalign.data.loading import read_reference_rows
from selfalign.errors import SelfAlignError

COLUMNS = ("question", "choices", "answer")


def load_capability(reference: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Questions with a stable key; a row with fewer than two options or an answer index out of range is a one-line
    error naming the file, the line and the field."""
    items = []
    for line, row in enumerate(read_reference_rows(reference), start=1):
        where = f"{reference}: line {line}"
        missing = [column for column in COLUMNS if column not in row]
        if missing:
            raise SelfAlignError(f"{where}: missing field '{missing[0]}'")
        question, choices, answer = row["question"], row["choices"], row["answer"]
        if not isinstance(question, str) or not question.strip():
            raise SelfAlignError(f"{where}: field 'question' must be non-empty text")
        if not isinstance(choices, list) or len(choices) < 2:
            raise SelfAlignError(f"{where}: field 'choices' needs at least two options")
        if not all(isinstance(choice, str) and choice.strip() for choice in choices):
            raise SelfAlignError(f"{where}: field 'choices' must hold non-empty text only")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise SelfAlignError(
                f"{where}: field 'answer' must be an index into choices (0 to {len(choices) - 1}), got {answer!r}"
            )
        key = f"capability:{row.get('id', line)}"
        items.append({"key": key, "question": question, "choices": choices, "answer": answer,
                      "domain": str(row.get("domain", "all"))})  # fmt: skip
    if not items:
        raise SelfAlignError(f"{reference}: no multiple-choice rows")
    return items[:limit] if limit else items


def score_choices(model: LanguageModel, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per question: the option chosen by `acc` and by `acc_norm`, and whether each is right."""
    requests = [item["question"] for item in items for _ in item["choices"]]
    continuations = [" " + choice.strip() for item in items for choice in item["choices"]]
    scores = model.score(requests, continuations)
    records, start = [], 0
    for item in items:
        count = len(item["choices"])
        logprobs = scores[start : start + count]
        start += count
        normalized = [lp / len(choice.strip()) for lp, choice in zip(logprobs, item["choices"])]
        chosen = max(range(count), key=lambda i: logprobs[i])
        chosen_norm = max(range(count), key=lambda i: normalized[i])
        records.append(
            {"key": item["key"], "domain": item["domain"], "options": count, "chosen": chosen,
             "chosen_norm": chosen_norm, "correct": chosen == item["answer"],
             "correct_norm": chosen_norm == item["answer"]}
        )  # fmt: skip
    return records
