
import pytest

from tests.cli_runner import run_cli


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A freshly initialised LoRA adapter on the tiny model (its B matrices are zero: answers equal the base's)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    folder = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(folder)
    return folder


def test_compare_prints_base_and_adapter_side_by_side(tiny_model_dir, adapter_dir, monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "compare", "How do I bake bread?", "--model", str(tiny_model_dir),
                           "--adapter", f"dpo={adapter_dir}", "--max-new-tokens", "4")  # fmt: skip
    assert code == 0 and "base" in out and "dpo" in out


def test_chat_answers_each_line_until_an_empty_one(tiny_model_dir, monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "chat", "--model", str(tiny_model_dir), "--max-new-tokens", "3",
                           stdin="hello\nand again\n\n")  # fmt: skip
    assert code == 0 and out.count("model>") == 2


@pytest.mark.parametrize("value", ["dpo", "=x", "dpo="])
def test_bad_adapter_option_is_a_one_line_error(monkeypatch, capsys, tmp_path, value):
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", "--out", str(tmp_path), "--adapter", value)
    assert code == 2 and "expected NAME=PATH" in err and err.count("\n") == 1
