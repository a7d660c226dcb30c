from types import SimpleNamespace

import pytest

from selfalign.evaluation.metrics import compute_metrics
from selfalign.evaluation.statistics import rate_with_interval, win_rate_with_interval
from selfalign.judging.judge import JudgeConfig

CONFIG = SimpleNamespace(bootstrap_samples=500, seed=0, judge=JudgeConfig())


def sample(variant, set_name, judge_label, refused, complies=1, category="c1"):
    return {"variant": variant, "key": f"{set_name}:{id(object())}", "set": set_name, "prompt": "p", "answer": "a",
            "category": category, "source": "harmful" if set_name == "harmful" else "benign",
            "judge_label": judge_label, "refused_detector": refused, "complies_label": complies,
            "completion_tokens": 10}  # fmt: skip


def test_rate_and_interval_on_a_known_set():
    result = rate_with_interval([True] * 30 + [False] * 10 + [None] * 5, samples=2000, seed=1)
    assert result["rate"] == pytest.approx(0.75)
    assert (result["count"], result["n"], result["abstained"]) == (30, 40, 5)
    # binomial standard error sqrt(.75*.25/40) = 0.068: the 95% interval is about +-0.13
    assert 0.59 < result["low"] < 0.66 and 0.84 < result["high"] < 0.90


def test_constant_outcomes_have_a_degenerate_interval_and_no_decided_items_no_rate():
    assert rate_with_interval([True] * 8) == {"rate": 1.0, "low": 1.0, "high": 1.0, "count": 8, "n": 8, "abstained": 0}
    empty = rate_with_interval([None, None])
    assert empty["rate"] is None and empty["abstained"] == 2


def test_win_rate_counts_ties_as_half():
    result = win_rate_with_interval([1, 1, 0.5, 0], samples=200)
    assert result["rate"] == pytest.approx(0.625)
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)


def test_metrics_on_hand_made_samples():
    samples = [
        sample("base", "harmful", 1, False),
        sample("base", "harmful", 1, False, category="c2"),
        sample("base", "harmful", 0, True, complies=0),
        sample("base", "harmful", None, False),  # abstained: not harmless, not harmful
        sample("base", "benign", 0, False),
        sample("base", "benign", 0, True, complies=0),
        sample("dpo", "harmful", 0, True, complies=0),
        sample("dpo", "harmful", 0, True, complies=0),
        sample("dpo", "harmful", 0, True, complies=0, category="c2"),
        sample("dpo", "harmful", 0, False),
        sample("dpo", "benign", 0, True, complies=0),
        sample("dpo", "benign", 0, True, complies=0),
    ]
    pairwise = {"dpo": [{"outcome": 0.0}, {"outcome": 0.5}]}
    metrics = compute_metrics(samples, pairwise, CONFIG)
    base, dpo = metrics["models"]["base"], metrics["models"]["dpo"]
    assert base["harmless"]["rate"] == pytest.approx(1 / 3) and base["harmless"]["abstained"] == 1
    assert base["judge_abstained"] == {"harmful": 1, "benign": 0}
    assert base["refused_harmful_detector"]["rate"] == pytest.approx(1 / 4)
    assert base["over_refusal_detector"]["rate"] == pytest.approx(0.5)
    assert dpo["harmless"]["rate"] == 1.0 and dpo["refused_harmful_detector"]["rate"] == pytest.approx(0.75)
    assert dpo["over_refusal_detector"]["rate"] == 1.0 and dpo["over_refusal_judge"]["rate"] == 1.0
    assert dpo["win_rate_vs_base"]["rate"] == pytest.approx(0.25)
    assert "win_rate_vs_base" not in base
    assert base["by_category"]["harmless"]["c2"]["rate"] == 0.0
    assert base["detector_vs_judge"] == {
        "refused_and_judged_harmful": 0, "refused_and_judged_harmless": 2, "not_refused_and_judged_harmful": 2,
        "not_refused_and_judged_harmless": 1, "judge_abstained": 1,
    }  # fmt: skip
