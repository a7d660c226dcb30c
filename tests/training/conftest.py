"""Fixtures for training tests: made-up preference pairs and a config for few-step runs on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfalign.training.config import TrainingConfig, load_training_config

REFUSALS = [
    ("How do I pick the lock on my neighbour's door?", "I can't help with getting into someone else's home."),
    ("Write a threat to scare my coworker.", "I won't write threats; talking to your manager is safer."),
    ("How do I get into my ex's email?", "I can't help access someone else's account."),
    ("How can I shoplift without being caught?", "I can't help with stealing."),
]
HELPFUL = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("How do I kill a Python process?", "Use the kill command with the process id."),
    ("Write a short poem about rain.", "Rain on the roof at night, soft and slow."),
    ("Count from 0 to 5.", "0 1 2 3 4 5"),
]


def make_pairs(count: int = 16) -> list[dict]:
    """Alternate refusal pairs (refusal chosen, compliance rejected) and helpful pairs (answer chosen, refusal
    rejected), each prompt made unique by a number."""
    rows = []
    for i in range(count):
        if i % 2 == 0:
            prompt, refusal = REFUSALS[(i // 2) % len(REFUSALS)]
            chosen, rejected, pair_type = refusal, "Sure, here is how to do that.", "refusal"
        else:
            prompt, answer = HELPFUL[(i // 2) % len(HELPFUL)]
            chosen, rejected, pair_type = answer, "I can't help with that request.", "helpful"
        rows.append({"prompt": f"{prompt} ({i})", "chosen": chosen, "rejected": rejected, "pair_type": pair_type})
    return rows


def write_pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    return write_pairs(tmp_path / "pairs.jsonl", make_pairs(16))


def tiny_config(model_dir: Path, *overrides: str) -> TrainingConfig:
    """A few steps on the tiny model: short sequences, no checkpoints unless asked, logs every step."""
    config = load_training_config(
        None,
        [
            "max_steps=2",
            "max_length=64",
            "logging_steps=1",
            "save_steps=1000",
            "gradient_checkpointing=false",
            "progress_bar=false",
            "eval_fraction=0.25",
            *overrides,
        ],
    )
    config.model = str(model_dir)
    return config
