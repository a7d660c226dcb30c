"""Classification metrics for judges. Abstentions are counted on their own and never folded into a rate."""

from __future__ import annotations

from collections.abc import Sequence


def binary_metrics(
    labels: Sequence[int], predictions: Sequence[int | None], scores: Sequence[float | None] = ()
) -> dict:
    """Accuracy, precision, recall and F1 over the items the judge decided; AUROC over scored items.

    `abstained` counts predictions of None; `coverage` is the share decided. Rates are over decided items only,
    so a judge that abstains a lot shows it in `abstention_rate`, not as a hidden 0 or 1.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

    decided = [(y, p) for y, p in zip(labels, predictions) if p is not None]
    n = len(labels)
    result: dict = {
        "n": n,
        "decided": len(decided),
        "abstained": n - len(decided),
        "abstention_rate": (n - len(decided)) / n if n else 0.0,
        "accuracy": None,
        "precision": None,
        "recall": None,
        "f1": None,
        "auroc": None,
    }
    if decided:
        truth, predicted = zip(*decided)
        precision, recall, f1, _ = precision_recall_fscore_support(
            truth, predicted, average="binary", pos_label=1, zero_division=0
        )
        result.update(
            accuracy=float(accuracy_score(truth, predicted)), precision=float(precision), recall=float(recall),
            f1=float(f1),
        )  # fmt: skip
    scored = [(y, s) for y, s in zip(labels, scores) if s is not None]
    if scored and len({y for y, _ in scored}) == 2:
        truth, values = zip(*scored)
        result["auroc"] = float(roc_auc_score(truth, values))
    return result


def best_threshold(labels: Sequence[int], scores: Sequence[float | None], objective: str = "f1") -> float:
    """The threshold on P(harmful) that maximises `objective` (f1 or accuracy) on these items (the dev split)."""
    candidates = sorted({s for s in scores if s is not None} | {0.5})
    best, best_value = 0.5, -1.0
    for threshold in candidates:
        predictions = [None if s is None else int(s >= threshold) for s in scores]
        value = binary_metrics(labels, predictions)[objective] or 0.0
        if value > best_value:
            best, best_value = threshold, value
    return best
