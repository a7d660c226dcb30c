"""Capability retained: multiple-choice loading, log-likelihood scoring (acc, acc_norm), metrics and report."""

import json
import math
from types import SimpleNamespace

import pytest

from selfalign.errors import SelfAlignError
from selfalign.evaluation.capability import load_capability, score_choices
from selfalign.evaluation.metrics import compute_metrics
from selfalign.judging.judge import JudgeConfig
from selfalign.reporting.report import markdown_report
from tests.scripted import scripted_model

ROWS = [
    {"id": "q1", "question": "What do bees make?", "choices": ["honey", "milk", "silk thread", "wax paper"],
     "answer": 0, "domain": "animals"},
    {"id": "q2", "question": "How many days are in a week?", "choices": ["five", "seven", "ten", "twelve"],
     "answer": 1, "domain": "maths"},
]  # fmt: skip


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_acc_takes_the_highest_log_probability_and_acc_norm_divides_by_length(tmp_path):
    # every character costs 0.5 nats and "honey" and "seven" get a small bonus: acc picks the shortest option
    # ("milk", "ten"), acc_norm (per character) the bonus ones, which are right
    def score(prompt, continuation):
        bonus = 0.3 if continuation.strip() in ("honey", "seven") else 0.0
        return -0.5 * len(continuation.strip()) + bonus

    model = scripted_model(rules=lambda p: "", score_rule=score)
    records = score_choices(model, load_capability(write_rows(tmp_path / "mc.jsonl", ROWS)))
    assert [(r["chosen"], r["correct"]) for r in records] == [(1, False), (2, False)]
    assert [(r["chosen_norm"], r["correct_norm"]) for r in records] == [(0, True), (1, True)]
    assert records[0]["key"] == "capability:q1" and records[0]["options"] == 4


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question": "q", "choices": ["only one"], "answer": 0}, "line 2: field 'choices' needs at least two options"),
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, r"line 2: field 'answer' must be an index into choices "
                                                                r"\(0 to 1\), got 2"),
        ({"question": "q", "choices": ["a", "b"]}, "line 2: missing field 'answer'"),
        ({"question": "q", "choices": ["a", "b"], "answer": True}, "line 2: field 'answer'"),
    ],
)  # fmt: skip
def test_bad_multiple_choice_rows_name_the_file_line_and_field(tmp_path, row, message):
    path = write_rows(tmp_path / "mc.jsonl", [ROWS[0], row])
    with pytest.raises(SelfAlignError, match=f"mc.jsonl: {message}"):
        load_capability(path)


def test_capability_metrics_pair_the_adapter_with_the_base_and_the_report_shows_them():
    def record(key, correct):
        return {"key": key, "domain": "d", "options": 4, "chosen": 0, "chosen_norm": 0, "correct": correct,
                "correct_norm": correct}  # fmt: skip

    base = [record(f"q{i}", i < 30) for i in range(40)]
    sft = [record(f"q{i}", i < 20) for i in range(40)]
    samples = [{"variant": v, "key": "h1", "set": "harmful", "prompt": "p", "answer": "a", "category": "c",
                "source": "harmful", "judge_label": 0, "refused_detector": True, "complies_label": 0,
                "completion_tokens": 3} for v in ("base", "sft")]  # fmt: skip
    config = SimpleNamespace(bootstrap_samples=500, seed=0, judge=JudgeConfig())
    metrics = compute_metrics(samples, {}, config, {"base": base, "sft": sft})
    capability = metrics["models"]["sft"]["capability"]
    assert capability["acc"]["rate"] == 0.5 and capability["chance"] == 0.25
    assert capability["acc_vs_base"]["difference"] == pytest.approx(-0.25) and capability["acc_vs_base"]["n"] == 40
    assert math.isclose(metrics["models"]["base"]["capability"]["acc_norm"]["rate"], 0.75)
    report = markdown_report(metrics, samples, examples=0)
    assert "## Capability retained" in report and "| base | 75.0% [" in report
    assert "capability (acc_norm) |" in report and "-25.0 [" in report
