"""The run report from a small finished run's files: every section it has data for is filled."""

import json

from selfalign.reporting.run_report import write_run_report


def test_run_report_shows_the_judge_table_the_funnel_and_training_numbers(tmp_path):
    tune = tmp_path / "tune-judge"
    tune.mkdir()
    (tune / "results.md").write_text(
        "# Judge tuning\n\n| design | ... |\n\n**No judge design beat the no-model rule**\n"
    )
    preferences = tmp_path / "preferences" / "dataset"
    preferences.mkdir(parents=True)
    funnel = {
        "steps": [{"step": "prompts", "refusal": 8, "helpful": 8}, {"step": "pairs kept (helpful mix)", "refusal": 3,
                                                                     "helpful": 1}],
        "helpful_mix": {"shortfall": True, "note": "helpful_mix=0.6 wanted 4 helpful pairs, 1 were available"},
        "kept": {"refusal": 3, "helpful": 1},
    }  # fmt: skip
    (preferences / "funnel.json").write_text(json.dumps(funnel))
    stages = {}
    for name, extra in (("sft", {}), ("dpo", {"eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.4})):
        folder = tmp_path / name / "training"
        folder.mkdir(parents=True)
        metrics = {
            "train": {"steps": 24, "loss": 1.25, "runtime_s": 100.0},
            "eval_before": {"eval_loss": 2.0, **({k: 0.0 for k in extra})},
            "eval_after": {"eval_loss": 1.5, **extra},
        }
        (folder / "metrics.json").write_text(json.dumps(metrics))
        stages[name] = folder.parent
    write_run_report({"tune-judge": tune, "preferences": preferences.parent, **stages}, tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Judge tuning" in report and "No judge design beat the no-model rule" in report
    assert "| prompts | 8 | 8 |" in report and "| pairs kept (helpful mix) | 3 | 1 |" in report
    assert "The helpful mix could not be met: helpful_mix=0.6 wanted 4" in report
    assert "```json" not in report
    assert "| stage | steps | train loss | seconds | eval loss before | eval loss after | reward accuracy before |" in (
        report
    )
    assert "| sft | 24 | 1.25 | 100 | 2 | 1.5 | n/a | n/a | n/a | n/a |" in report
    assert "| dpo | 24 | 1.25 | 100 | 2 | 1.5 | 0 | 0.75 | 0 | 0.4 |" in report
