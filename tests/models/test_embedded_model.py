"""The embedded default model: assembling, converting once into a safetensors cache, and generating with it."""

import json
import sys

import pytest

from selfalign.errors import SelfAlignError
from selfalign.models import gguf_cache
from selfalign.models.gguf_cache import is_complete_cache, prepare_embedded_model


def test_a_gguf_whose_checksum_does_not_match_is_refused(selfalign_home):
    damaged = selfalign_home / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"GGUF but not the real one")
    with pytest.raises(SelfAlignError, match="sha256 does not match the embedded model's checksum"):
        prepare_embedded_model("gemma-3-270m")
    assert not (selfalign_home / "models" / "gemma-3-270m").exists()


def test_conversion_refuses_a_file_with_the_wrong_checksum(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(SelfAlignError, match="does not match the expected"):
        gguf_cache.convert_gguf_to_safetensors(gguf, tmp_path / "cache", expected_sha256="0" * 64)


@pytest.mark.slow
def test_interrupted_conversion_leaves_no_cache_and_a_rerun_completes(selfalign_home, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupted)
        with pytest.raises(KeyboardInterrupt):
            prepare_embedded_model("gemma-3-270m")
    models = selfalign_home / "models"
    assert not (models / "gemma-3-270m").exists()
    assert not any(path.name.startswith(".gemma-3-270m.tmp-") for path in models.iterdir())
    folder = prepare_embedded_model("gemma-3-270m")
    assert is_complete_cache(folder)
    assert any(folder.glob("*.safetensors"))


@pytest.mark.slow
def test_generate_with_the_embedded_model_from_the_cli(tmp_path, monkeypatch, capsys):
    from selfalign.cli.main import main

    prompts = ["What is the capital of France?", "Write one sentence about the sea.", "What is 2 + 2?"]
    source = tmp_path / "p.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "o.jsonl"
    monkeypatch.setattr(
        sys, "argv", ["selfalign", "generate", "--model", "embedded:gemma-3-270m", "--prompts", str(source),
                      "--out", str(out), "--max-new-tokens", "24"],
    )  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == prompts
    assert "Paris" in rows[0]["completion"]  # converted weights are the real model's, not noise
    assert all(row["completion"] and row["completion_tokens"] <= 24 for row in rows)
