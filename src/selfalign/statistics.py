"""Rates with 95% intervals that hold at 0% and 100%, and paired differences from the base model.

A rate's interval is Wilson's score interval: a percentile bootstrap cannot leave 0% or 100% (0/40 printed as
[0.0, 0.0], claiming a certainty it does not have), while Wilson's interval for 0/40 is [0, 8.8%]. An adapter is
compared with the base on the same prompts, so its difference from the base is paired: a bootstrap that resamples
prompts, with McNemar's exact test on the prompts where the two disagree. Abstentions are their own count, never part
of a rate, and a paired difference uses only the prompts both decided.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95


def wilson_interval(count: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson's score interval for `count` successes in `n` trials (n > 0); never of zero width."""
    from scipy.stats import binomtest

    interval = binomtest(count, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def rate_with_interval(outcomes: Sequence[bool | None], confidence: float = CONFIDENCE) -> dict:
    """Share of True among the decided outcomes (None = abstained), with Wilson's interval; with no decided item
    every number is None."""
    decided = [bool(o) for o in outcomes if o is not None]
    return {**count_rate(sum(decided), len(decided), confidence), "abstained": sum(o is None for o in outcomes)}


def count_rate(count: int, n: int, confidence: float = CONFIDENCE) -> dict:
    """{rate, low, high, count, n}: count/n with Wilson's interval, which never has zero width (0/40 included);
    with n = 0 the rate and interval are None."""
    if n == 0:
        return {"rate": None, "low": None, "high": None, "count": count, "n": 0}
    low, high = wilson_interval(count, n, confidence)
    return {"rate": count / n, "low": low, "high": high, "count": count, "n": n}


def paired_difference(
    variant: Sequence[bool | None], base: Sequence[bool | None], samples: int = 2000, seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict:  # fmt: skip
    """Rate of `variant` minus rate of `base` on the same items (position i is one prompt in both), over the items
    both decided: the difference, a paired percentile-bootstrap interval, and McNemar's exact p-value."""
    from scipy.stats import binomtest

    if len(variant) != len(base):
        raise ValueError("paired_difference: both sides must hold the same items")
    both = [(bool(v), bool(b)) for v, b in zip(variant, base) if v is not None and b is not None]
    only_variant = sum(v and not b for v, b in both)
    only_base = sum(b and not v for v, b in both)
    result = {"difference": None, "low": None, "high": None, "n": len(both), "variant_only": only_variant,
              "base_only": only_base, "p_value": None}  # fmt: skip
    if not both:
        return result
    deltas = np.array([float(v) - float(b) for v, b in both])
    result["difference"] = float(deltas.mean())
    discordant = only_variant + only_base
    result["p_value"] = float(binomtest(only_variant, discordant).pvalue) if discordant else 1.0
    if discordant == 0:
        # every prompt agrees: the bootstrap would give [0, 0]; Wilson's bound on the discordant share is honest
        bound = wilson_interval(0, len(both), confidence)[1]
        result.update(low=-bound, high=bound)
        return result
    rng = np.random.default_rng(seed)
    means = rng.choice(deltas, size=(samples, deltas.size), replace=True).mean(axis=1)
    tail = (1 - confidence) / 2
    result.update(low=float(np.quantile(means, tail)), high=float(np.quantile(means, 1 - tail)))
    return result


# An item leans one way when its score is further than this from 0.5: closer is float rounding, which moved the
# counts of 9 of 88 items between two runs whose scores differed by 1e-8 (a judge with no preference scores both
# orders alike, and their average lands on 0.5 give or take the last bits).
LEAN_TOLERANCE = 1e-6


def win_rate_with_interval(outcomes: Sequence[float], samples: int = 1000, seed: int = 0) -> dict:
    """Mean of per-item scores in [0, 1] (P(variant better); 1 a sure win, 0.5 no preference, 0 a sure loss) with a
    percentile-bootstrap interval, plus how many items lean each way; an interval that would have zero width (every
    item scored alike) is widened to Wilson's bound for no discordant item, as in paired_difference."""
    values = np.array(outcomes, dtype=float)
    result = {
        "rate": None,
        "low": None,
        "high": None,
        "n": int(values.size),
        "wins": int((values > 0.5 + LEAN_TOLERANCE).sum()),
        "ties": int((np.abs(values - 0.5) <= LEAN_TOLERANCE).sum()),
        "losses": int((values < 0.5 - LEAN_TOLERANCE).sum()),
    }
    if values.size == 0:
        return result
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(samples, values.size), replace=True).mean(axis=1)
    low, high = float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))
    if high - low == 0.0:
        bound = wilson_interval(0, values.size)[1] / 2  # half the items could lean either way unseen
        low, high = max(0.0, low - bound), min(1.0, high + bound)
    result.update(rate=float(values.mean()), low=low, high=high)
    return result
