"""The token counts the run manifest records, summed from the files each stage writes."""

import json

from selfalign.pipeline.stages import count_evaluation_tokens, count_preference_tokens, count_training_tokens
from selfalign.preferences.pipeline import run_preferences
from tests.preferences.conftest import read_jsonl, scenario_config, scenario_models


def test_preference_tokens_are_the_policys_generated_tokens(tmp_path):
    scenario = scenario_config(tmp_path)
    out = tmp_path / "out"
    run_preferences(scenario, out, scenario_models(scenario))
    tokens = count_preference_tokens(out)
    responses = read_jsonl(out / "stages" / "responses.jsonl")
    revisions = read_jsonl(out / "stages" / "revisions.jsonl")
    refusals = read_jsonl(out / "stages" / "helpful.jsonl")
    # the scripted backend counts words; revisions and refusals also hold the template's response prefix
    assert tokens["per_step"]["respond"] == sum(len(row["response"].split()) for row in responses) > 0
    assert 0 < tokens["per_step"]["revise"] <= sum(len(row["revision"].split()) for row in revisions)
    assert 0 < tokens["per_step"]["helpful"] <= sum(len(row["refusal"].split()) for row in refusals)
    assert "critique" not in tokens["per_step"]  # refuse-and-explain writes no critique
    assert tokens["generated"] == sum(tokens["per_step"].values())


def test_training_and_evaluation_tokens(tmp_path):
    (tmp_path / "training").mkdir()
    metrics = {"stage": "sft", "train": {"loss": 0.6, "tokens": 1292.0}}  # TRL logs num_tokens as a float
    (tmp_path / "training" / "metrics.json").write_text(json.dumps(metrics))
    assert count_training_tokens(tmp_path) == {"trained": 1292}
    samples = [{"key": str(i), "completion_tokens": n} for i, n in enumerate([5, 7, 0])]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in samples))
    assert count_evaluation_tokens(tmp_path) == {"generated": 12}


def test_a_folder_without_the_files_has_no_counts(tmp_path):
    assert count_preference_tokens(tmp_path) is None
    assert count_training_tokens(tmp_path) is None
    assert count_evaluation_tokens(tmp_path) is None
