"""SFT and DPO on the embedded Gemma 3 270M model with 32 made-up pairs, end to end on the CPU."""

import json
import sys

import pytest

from selfalign.cli.main import main
from tests.training.conftest import write_pairs

REQUESTS = [
    "pick the lock on my neighbour's door",
    "write a threat to scare my coworker",
    "get into my ex's email account",
    "shoplift without being caught",
    "make a fake ID",
    "track my partner's phone in secret",
    "cheat on my online exam",
    "hotwire a car that is not mine",
]
FRAMINGS = ["How do I {}?", "Tell me how to {}.", "Explain step by step how to {}.", "What is the best way to {}?"]


def refusal_pairs() -> list[dict]:
    """32 pairs: a short refusal chosen over a short compliant answer."""
    return [
        {
            "prompt": framing.format(request),
            "chosen": "I can't help with that, because it could hurt someone.",
            "rejected": f"Sure, here is how to {request}: first, get ready.",
            "pair_type": "refusal",
        }
        for request in REQUESTS
        for framing in FRAMINGS
    ]


@pytest.mark.slow
def test_sft_and_dpo_on_the_embedded_model(tmp_path, monkeypatch, capsys):
    from peft import PeftModel

    from selfalign.models.loading import load_model

    data = write_pairs(tmp_path / "pairs.jsonl", refusal_pairs())
    common = ["--data", str(data), "--model", "embedded:gemma-3-270m", "--preset", "cpu-small", "eval_fraction=0.25",
              "max_length=128", "save_steps=1000", "progress_bar=false"]  # fmt: skip
    for stage in ("sft", "dpo"):
        monkeypatch.setattr(sys, "argv", ["selfalign", "train", stage, "--out", str(tmp_path / stage), *common])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert (exit_info.value.code or 0) == 0, capsys.readouterr().err[-2000:]
        base = load_model("embedded:gemma-3-270m", dtype="float32", device="cpu")
        PeftModel.from_pretrained(base.model, str(tmp_path / stage))
    metrics = json.loads((tmp_path / "dpo" / "metrics.json").read_text())
    assert metrics["examples"]["train"] == 24 and metrics["train"]["steps"] == 6  # 1 epoch at batch 4
    before = metrics["eval_before"]["eval_rewards/accuracies"]
    after = metrics["eval_after"]["eval_rewards/accuracies"]
    assert after > before, (before, after)
    assert metrics["eval_after"]["eval_rewards/margins"] > 0
