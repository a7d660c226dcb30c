"""Shared fixtures: a tiny random Gemma 3 model with a locally built tokenizer, so unit tests never touch a hub."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.tiny_model import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Gemma 3 model (random weights) and a byte-level BPE tokenizer that adds BOS, as a local folder."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model whose tokenizer has a chat template that writes BOS itself (as most chat models do)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gemma3-chat"), chat_template=True)


@pytest.fixture
def selfalign_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "selfalign-home"
    monkeypatch.setenv("SELFALIGN_HOME", str(home))
    return home
