"""`selfalign run` with model.backend=openai: the evaluate stage (real) registers each freshly trained adapter with
the server at run time; the other stages are stand-ins, the training stages writing adapter folders."""

import json

import pytest

from selfalign.pipeline import run_pipeline
from selfalign.pipeline import stages as stages_module
from selfalign.pipeline.config import load_run_config
from selfalign.pipeline.outputs import TrainedAdapter
from tests.backends.http_helpers import BackgroundLoop, FakeOpenAIServer
from tests.backends.vllm_runtime_lora import BASE_MODEL, VLLMRuntimeLoRA, write_adapter
from tests.pipeline.stand_ins import replace_stages


@pytest.fixture
def trained(monkeypatch):
    """Every stage but evaluate replaced; sft and dpo write adapters that differ in their weights."""
    replace_stages(monkeypatch, [], keep=("run_evaluation",))

    def training(settings, inputs, out):
        method = out.parent.name  # run/<sft|dpo>/<name>-<key>
        write_adapter(out / stages_module.ADAPTER, weights=method.encode())
        (out / stages_module.ADAPTER / "metrics.json").write_text(json.dumps({"stage": method}))
        return TrainedAdapter.from_folder(out)

    monkeypatch.setattr(stages_module, "run_sft", training)
    monkeypatch.setattr(stages_module, "run_dpo", training)


def test_the_evaluate_stage_serves_each_trained_adapter_through_the_server(tmp_path, trained):
    vllm = VLLMRuntimeLoRA()
    with BackgroundLoop() as loop:
        server = loop.call(FakeOpenAIServer(vllm).start())
        try:
            served = ["model.backend=openai", f"model.model={BASE_MODEL}", "model.prompt_format=plain",
                      f"model.options.base_url={server.url}", "model.options.show_progress=false"]  # fmt: skip
            small = ["evaluation.limit=2", "evaluation.capability_limit=2", "evaluation.bootstrap_samples=100"]
            config = load_run_config(None, [f"out={tmp_path / 'run'}", "use_tuned_judge=false", *served, *small])
            run_pipeline(config)
        finally:
            loop.call(server.stop())
    loads = [name for route, name in vllm.calls if route == "load_lora_adapter"]
    assert len(set(loads)) == 2  # sft and dpo, under names of their own
    assert vllm.calls == [(route, name) for name in loads for route in ("load_lora_adapter", "unload_lora_adapter")]
    assert vllm.loaded == {}
    evaluation = next((tmp_path / "run" / "evaluate").glob("evaluate-*"))
    samples = [json.loads(line) for line in (evaluation / "samples.jsonl").read_text().splitlines()]
    answered_by = {s["variant"]: s["answer"].split()[0] for s in samples}
    assert answered_by == {"base": BASE_MODEL, "sft": loads[0], "dpo": loads[1]}
