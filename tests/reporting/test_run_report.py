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


def test_run_report_shows_answer_quality_and_the_pairwise_judge_of_every_variant(tmp_path):
    from types import SimpleNamespace

    from selfalign.evaluation.metrics import compute_metrics
    from selfalign.judging.judge import JudgeConfig

    def sample(variant, set_name, answer, key):
        return {"variant": variant, "key": key, "set": set_name, "prompt": "p", "answer": answer, "category": "c",
                "source": "harmful" if set_name == "harmful" else "benign", "judge_label": 0,
                "refused_detector": False, "complies_label": 1, "completion_tokens": 10,
                "difficulty": "plain"}  # fmt: skip

    loop = "I'm going to look at the house. " * 4
    samples = [sample("base", "harmful", loop, f"h{i}") for i in range(4)]
    samples += [sample("sft", "harmful", "I can't help with that." if i else loop, f"h{i}") for i in range(4)]
    pairwise = {"sft": [{"outcome": 0.6, "identical": False, "p_first_better": 0.9, "consistent": False}]}
    config = SimpleNamespace(bootstrap_samples=200, seed=0, judge=JudgeConfig())
    evaluation = tmp_path / "evaluate"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(json.dumps(compute_metrics(samples, pairwise, config)))
    write_run_report({"evaluate": evaluation}, tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Answer quality" in report
    assert "| base | 4 | 100.0% [51.0, 100.0] (4/4) |" in report and "| sft | 4 | 25.0% [4.6, 69.9] (1/4) |" in report
    assert "| sft | 60.0% [" in report and "| 0.900 | 0.0% (n=1) |" in report  # win-rate, position bias
    assert "## Red-team prompts by difficulty" in report
