"""The whole loop on the embedded model, at a tiny size: every real stage body runs, then a rerun is all cached.

This checks the wiring, not the judge. tune-judge runs for real, but a judge fitted on 8 items is chosen by noise and
on one machine judged every red-team answer harmless (no pairs, then training failed on an empty dataset), so the
stages judge with the no-model rule, whose verdicts follow from the refusal detector alone on any machine."""

import json
from pathlib import Path

import pytest

from selfalign.pipeline import run_pipeline
from selfalign.pipeline.config import load_run_config

TINY = [
    "tune_judge.limit=8",
    "tune_judge.templates=[one-shot, complies]",
    "tune_judge.ensemble=[one-shot, complies]",
    "use_tuned_judge=false",
    "judge.design=rule",
    "preferences.prompts.0.limit=8",
    "preferences.prompts.1.limit=4",
    "preferences.prompts.2.limit=4",
    "preferences.generation.max_new_tokens=24",
    "preferences.revision.generation.max_new_tokens=24",
    "training.settings.max_steps=2",
    "training.settings.max_length=128",
    "evaluation.limit=4",
    "evaluation.capability_limit=8",
    "evaluation.generation.max_new_tokens=16",
    "evaluation.bootstrap_samples=200",
]


@pytest.mark.slow
def test_demo_loop_at_a_tiny_size(tmp_path):
    config = load_run_config(None, [f"out={tmp_path / 'run'}", *TINY])
    _, manifest = run_pipeline(config)
    run = tmp_path / "run"
    on_disk = json.loads((run / "run.json").read_text())
    assert set(on_disk["outputs"]) == {"tune-judge", "preferences", "sft", "dpo", "evaluate", "report"}
    assert on_disk["status"] == "completed"
    funnel = json.loads((Path(manifest["outputs"]["preferences"]) / "dataset" / "funnel.json").read_text())
    assert funnel["kept"]["refusal"] >= 1 and funnel["kept"]["helpful"] >= 1, funnel["steps"]
    evaluation = json.loads((Path(manifest["outputs"]["evaluate"]) / "metrics.json").read_text())
    assert evaluation["variants"] == ["base", "sft", "dpo"]
    assert (run / "report.md").read_text().startswith("# selfalign run report")
    assert "data:image/png;base64" in (run / "report.html").read_text()
    _, second = run_pipeline(config)
    assert not any(stage["ran"] for stage in second["stages"].values())
