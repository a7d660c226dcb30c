import json

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


def test_evaluate_through_an_openai_server_registers_each_adapter_at_run_time(monkeypatch, capsys, tmp_path):
    """`selfalign evaluate` with model.backend=openai and -a NAME=PATH: the adapter is registered with the server (a
    stand-in of vLLM's runtime-LoRA API), answers as its own model, and is unregistered when the variant is done."""
    from tests.backends.http_helpers import BackgroundLoop, FakeOpenAIServer
    from tests.backends.vllm_runtime_lora import BASE_MODEL, VLLMRuntimeLoRA, write_adapter

    adapter = write_adapter(tmp_path / "sft")
    vllm = VLLMRuntimeLoRA()
    with BackgroundLoop() as loop:
        server = loop.call(FakeOpenAIServer(vllm).start())
        try:
            code, _, err = run_cli(monkeypatch, capsys, "evaluate", "--out", str(tmp_path / "eval"),
                                   "-a", f"sft={adapter}", "--limit", "2", "model.backend=openai",
                                   f"model.model={BASE_MODEL}", f"model.options.base_url={server.url}",
                                   "model.options.show_progress=false", "model.prompt_format=plain",
                                   "capability_limit=2", "bootstrap_samples=100")  # fmt: skip
        finally:
            loop.call(server.stop())
    assert code == 0, err
    name = vllm.calls[0][1]
    assert vllm.calls == [("load_lora_adapter", name), ("unload_lora_adapter", name)] and vllm.loaded == {}
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    answered_by = {
        variant: {s["answer"].split()[0] for s in samples if s["variant"] == variant} for variant in ("base", "sft")
    }
    assert answered_by == {"base": {BASE_MODEL}, "sft": {name}}
    generated = [r.body["model"] for r in server.requests if r.path == "/v1/completions" and not r.body.get("echo")]
    assert generated.count(name) == sum(s["variant"] == "sft" for s in samples)  # each answer, by its adapter
