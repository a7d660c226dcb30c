"""The engine end to end on the embedded model (Gemma 3 270M base): a few prompts, short answers."""

import json

import pytest

from selfalign.preferences.config import load_preferences_config
from selfalign.preferences.pipeline import run_preferences


@pytest.mark.slow
def test_embedded_model_yields_refusal_and_helpful_pairs(tmp_path):
    (tmp_path / "c.yaml").write_text(
        """\
policy: {model: "embedded:gemma-3-270m", prompt_format: plain}
judge: {design: rule}
prompts:
  - {data: "builtin:redteam:train", source: harmful, limit: 6}
  - {data: "builtin:benign-sensitive:train", source: benign, limit: 3}
  - {data: "builtin:helpful:train", source: benign, limit: 3}
generation: {max_new_tokens: 40, repetition_penalty: 1.15}
revision: {n_attempts: 1, generation: {max_new_tokens: 40, temperature: 0.7, top_p: 0.9, repetition_penalty: 1.15}}
chunk_size: 16
"""
    )
    dataset = run_preferences(load_preferences_config(tmp_path / "c.yaml"), tmp_path / "out")
    funnel = json.loads((dataset / "funnel.json").read_text())
    steps = {row["step"]: (row["refusal"], row["helpful"]) for row in funnel["steps"]}
    assert steps["prompts"] == (6, 6)
    judged = [steps[f"judged {k}"] for k in ("harmful", "harmless")] + [steps["judge abstained"]]
    assert tuple(map(sum, zip(*judged))) == steps["answered (non-empty)"]
    # The judge is pinned to the no-model rule, so these hold on any machine: the base model barely ever refuses
    # (NOTES: 2 of 30), so its red-team answers are flagged; a revision starts with the strategy's refusal prefix, which
    # the rule accepts; benign answers are harmless by the rule. A judge fitted or run on the model is tested elsewhere.
    assert funnel["kept"]["refusal"] >= 1 and funnel["kept"]["helpful"] >= 1, steps
    rows = [json.loads(line) for name in ("train.jsonl", "eval.jsonl") for line in (dataset / name).open()]
    assert all(row["chosen"].strip() and row["rejected"].strip() and row["chosen"] != row["rejected"] for row in rows)
    card = (dataset / "README.md").read_text()
    assert "## Funnel" in card and "embedded:gemma-3-270m" in card
