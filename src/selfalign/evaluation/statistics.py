"""Rates with 95% bootstrap confidence intervals. Abstentions are their own count, never part of a rate."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rate_with_interval(
    outcomes: Sequence[bool | None], samples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict:
    """Share of True among the decided outcomes (None = abstained), with a percentile bootstrap interval.

    The bootstrap resamples the decided items with replacement; with no decided item every number is None.
    """
    decided = np.array([bool(o) for o in outcomes if o is not None], dtype=float)
    abstained = sum(o is None for o in outcomes)
    result = {
        "rate": None,
        "low": None,
        "high": None,
        "count": int(decided.sum()),
        "n": int(decided.size),
        "abstained": int(abstained),
    }
    if decided.size == 0:
        return result
    rng = np.random.default_rng(seed)
    means = rng.choice(decided, size=(samples, decided.size), replace=True).mean(axis=1)
    tail = (1 - confidence) / 2
    result.update(
        rate=float(decided.mean()), low=float(np.quantile(means, tail)), high=float(np.quantile(means, 1 - tail))
    )
    return result


def win_rate_with_interval(outcomes: Sequence[float], samples: int = 1000, seed: int = 0) -> dict:
    """Mean of per-item scores (1 win, 0.5 tie, 0 loss) with a bootstrap interval, plus the counts."""
    values = np.array(outcomes, dtype=float)
    result = {
        "rate": None,
        "low": None,
        "high": None,
        "n": int(values.size),
        "wins": int((values == 1).sum()),
        "ties": int((values == 0.5).sum()),
        "losses": int((values == 0).sum()),
    }
    if values.size == 0:
        return result
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(samples, values.size), replace=True).mean(axis=1)
    result.update(
        rate=float(values.mean()), low=float(np.quantile(means, 0.025)), high=float(np.quantile(means, 0.975))
    )
    return result
