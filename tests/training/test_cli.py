"""`selfalign train sft|dpo` from the command line: SFT, then DPO on top with a merged model; errors in one line."""

import json

from tests.cli_runner import run_cli
from tests.training.conftest import make_pairs, write_pairs

FEW_STEPS = ["max_steps=2", "max_length=64", "progress_bar=false", "save_steps=1000"]


def test_sft_then_dpo_with_a_merged_model(tiny_model_dir, pairs_file, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    code, out, _ = run_cli(
        monkeypatch, capsys, "train", "sft", "--data", str(pairs_file), "--out", str(sft), "--model",
        str(tiny_model_dir), "--preset", "cpu-small", *FEW_STEPS,
    )  # fmt: skip
    assert code == 0, out
    assert f"wrote the SFT adapter to {sft} (2 steps, train loss" in out and "eval loss" in out
    code, out, _ = run_cli(
        monkeypatch, capsys, "train", "dpo", "--data", str(pairs_file), "--out", str(dpo), "--model",
        str(tiny_model_dir), "--sft-adapter", str(sft), "--merge", *FEW_STEPS,
    )  # fmt: skip
    assert code == 0, out
    assert "eval reward accuracy 0.0000 -> " in out and f"merged model in {dpo / 'merged'}" in out
    metrics = json.loads((dpo / "metrics.json").read_text())
    assert metrics["reference_model"] == "frozen copy of the SFT adapter (PEFT adapter 'ref')"
    assert "sft_adapter: " + str(sft) in (dpo / "config.yaml").read_text()
    assert list((dpo / "merged").glob("*.safetensors")) and (dpo / "merged" / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(dpo / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    data = write_pairs(
        tmp_path / "p.jsonl", [{k: v for k, v in row.items() if k != "rejected"} for row in make_pairs(2)]
    )
    for args, message in [
        (["--data", str(data)], "p.jsonl: no column 'rejected'"),
        (["--data", str(tmp_path / "none.jsonl")], "none.jsonl: file not found"),
        (["--data", str(data), "lora.rank=4"], "unknown key 'lora.rank'"),
    ]:
        code, _, err = run_cli(monkeypatch, capsys, "train", "dpo", "--out", str(tmp_path / "out"), *args)
        assert code == 2
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
