from types import SimpleNamespace

import pytest

from selfalign.evaluation.metrics import compute_metrics
from selfalign.evaluation.statistics import rate_with_interval, win_rate_with_interval
from selfalign.judging.judge import JudgeConfig

CONFIG = SimpleNamespace(bootstrap_samples=500, seed=0, judge=JudgeConfig())


def sample(variant, set_name, judge_label, refused, complies=1, category="c1", key=None):
    return {"variant": variant, "key": key or f"{set_name}:{id(object())}", "set": set_name, "prompt": "p",
            "answer": "a", "category": category, "source": "harmful" if set_name == "harmful" else "benign",
            "judge_label": judge_label, "refused_detector": refused, "complies_label": complies,
            "completion_tokens": 10}  # fmt: skip


def test_rate_and_wilson_interval_on_a_known_set():
    result = rate_with_interval([True] * 30 + [False] * 10 + [None] * 5)
    assert result["rate"] == pytest.approx(0.75)
    assert (result["count"], result["n"], result["abstained"]) == (30, 40, 5)
    # Wilson's 95% interval for 30/40, by its formula
    assert result["low"] == pytest.approx(0.5980, abs=1e-3) and result["high"] == pytest.approx(0.8581, abs=1e-3)


def test_intervals_never_have_zero_width_at_0_and_100_percent():
    none = rate_with_interval([False] * 40)
    assert none["rate"] == 0.0 and none["low"] == 0.0 and none["high"] == pytest.approx(0.0876, abs=1e-3)
    every = rate_with_interval([True] * 8)
    assert (
        every["rate"] == 1.0 and every["high"] == pytest.approx(1.0) and every["low"] == pytest.approx(0.676, abs=1e-3)
    )
    empty = rate_with_interval([None, None])
    assert empty["rate"] is None and empty["abstained"] == 2


def test_paired_difference_uses_the_same_prompts_and_mcnemar():
    from selfalign.evaluation.statistics import paired_difference

    variant = [True] * 30 + [False] * 10 + [None]
    base = [False] * 36 + [True] * 4 + [True]
    result = paired_difference(variant, base, samples=2000, seed=0)
    # 40 prompts decided by both (the abstention is left out); 30 refused only by the variant, 4 only by the base
    assert result["n"] == 40 and (result["variant_only"], result["base_only"]) == (30, 4)
    assert result["difference"] == pytest.approx(26 / 40)
    assert 0.4 < result["low"] < 0.65 < result["high"] <= 0.9
    assert result["p_value"] < 1e-4
    same = paired_difference([False] * 40, [False] * 40)
    assert same["difference"] == 0 and same["p_value"] == 1.0 and same["low"] < 0 < same["high"]  # not [0, 0]
    with pytest.raises(ValueError, match="same items"):
        paired_difference([True], [True, False])


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


def test_every_adapter_carries_its_paired_difference_from_the_base():
    from selfalign.reporting.report import markdown_report

    samples = [sample("base", "harmful", 1, False, key=f"h{i}") for i in range(10)]
    samples += [sample("base", "benign", 0, False, key=f"b{i}") for i in range(10)]
    samples += [sample("sft", "harmful", 0, i < 8, complies=0, key=f"h{i}") for i in range(10)]
    samples += [sample("sft", "benign", 0, i < 3, key=f"b{i}") for i in range(10)]
    metrics = compute_metrics(samples, {}, CONFIG)
    assert "vs_base" not in metrics["models"]["base"]
    paired = metrics["models"]["sft"]["vs_base"]
    assert paired["refused_harmful_detector"]["difference"] == pytest.approx(0.8) and paired["harmless"]["n"] == 10
    assert paired["over_refusal_detector"]["difference"] == pytest.approx(0.3)
    report = markdown_report(metrics, samples, examples=0)
    assert "Difference from the base on the same prompts" in report
    assert "| sft | +100.0 [" in report and "pts, p=0.002 (n=10)" in report
    assert "0.0% [0.0, 27.8]" in report  # the base's 0/10: Wilson, not [0.0, 0.0]


def test_every_variant_reports_how_its_answers_read():
    looping = "I will go home now. I will go home now. I will go home now."
    samples = [{**sample("base", "harmful", 0, False, key=f"h{i}"), "answer": looping if i < 3 else "A plain answer.",
                "finish_reason": "length" if i < 3 else "stop"} for i in range(10)]  # fmt: skip
    metrics = compute_metrics(samples, {}, CONFIG)
    quality = metrics["models"]["base"]["answer_quality"]
    assert quality["loops"]["count"] == 3 and quality["hit_token_limit"]["count"] == 3 and quality["n"] == 10
    from selfalign.reporting.report import markdown_report

    assert "## Answer quality" in markdown_report(metrics, samples, examples=0)
