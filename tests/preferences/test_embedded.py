"""The engine end to end on the embedded model (Gemma 3 270M base): a few prompts, short answers."""

import json

import pytest

from selfalign.preferences.config import load_preferences_config
from selfalign.preferences.pipeline import run_pipeline


@pytest.mark.slow
def test_embedded_model_yields_refusal_and_helpful_pairs(tmp_path):
    (tmp_path / "c.yaml").write_text(
        """\
policy: {model: "embedded:gemma-3-270m", prompt_format: plain}
judge: {design: composite, template: one-shot}
prompts:
  - {data: "builtin:redteam:train", source: harmful, limit: 6}
  - {data: "builtin:benign-sensitive:train", source: benign, limit: 3}
  - {data: "builtin:helpful:train", source: benign, limit: 3}
generation: {max_new_tokens: 40, repetition_penalty: 1.15}
revision: {n_attempts: 1, generation: {max_new_tokens: 40, temperature: 0.7, top_p: 0.9, repetition_penalty: 1.15}}
chunk_size: 16
"""
    )
    dataset = run_pipeline(load_preferences_config(tmp_path / "c.yaml"), tmp_path / "out")
    funnel = json.loads((dataset / "funnel.json").read_text())
    steps = {row["step"]: (row["refusal"], row["helpful"]) for row in funnel["steps"]}
    assert steps["prompts"] == (6, 6)
    judged = [steps[f"judged {k}"] for k in ("harmful", "harmless")] + [steps["judge abstained"]]
    assert tuple(map(sum, zip(*judged))) == steps["answered (non-empty)"]
    # measured: the base model complies with red-team prompts, the composite judge flags those answers, and
    # revisions started with a refusal pass; its benign answers are judged harmless
    assert funnel["kept"]["refusal"] >= 1 and funnel["kept"]["helpful"] >= 1, steps
    rows = [json.loads(line) for name in ("train.jsonl", "eval.jsonl") for line in (dataset / name).open()]
    assert all(row["chosen"].strip() and row["rejected"].strip() and row["chosen"] != row["rejected"] for row in rows)
    card = (dataset / "README.md").read_text()
    assert "## Funnel" in card and "embedded:gemma-3-270m" in card
