"""`adapter:` with the openai backend: registered with vLLM-like servers at run time (a stand-in of vLLM's API on
127.0.0.1), named by its content, used as the requests' model, unregistered at close; and the errors of servers that
cannot, or fail on the way."""

from __future__ import annotations

import logging
import re

import pytest

from selfalign.backends.base import GenerationParams
from selfalign.backends.language_model import ModelConfig, load_language_model
from selfalign.errors import SelfAlignError
from tests.backends.http_helpers import FakeOpenAIServer, Reply
from tests.backends.vllm_runtime_lora import BASE_MODEL, VLLMRuntimeLoRA, write_adapter

NAME_PATTERN = r"selfalign-[0-9a-f]{16}"


def adapter_model(urls: list[str], adapter, **options) -> ModelConfig:
    return ModelConfig(
        model=BASE_MODEL,
        backend="openai",
        adapter=str(adapter),
        prompt_format="plain",
        options={"base_urls": urls, "show_progress": False, "backoff_s": 0.01, "max_retries": 2, **options},
    )


def lora_requests(server: FakeOpenAIServer) -> list:
    return [request for request in server.requests if "lora_adapter" in request.path]


def test_the_adapter_is_registered_on_every_server_used_as_the_model_and_unregistered_at_close(serve, tmp_path):
    adapter = write_adapter(tmp_path / "runs" / "sft" / "training")
    vllms = [VLLMRuntimeLoRA(), VLLMRuntimeLoRA()]
    servers = [serve(vllm) for vllm in vllms]
    model = load_language_model(adapter_model([s.url for s in servers], adapter))
    name = model.backend.model
    assert re.fullmatch(NAME_PATTERN, name)
    for vllm in vllms:
        assert vllm.loaded == {name: str(adapter.resolve())}  # the absolute path: the server reads it itself

    completions = model.answer([f"question {i}" for i in range(6)], GenerationParams(max_new_tokens=4))
    assert all(c.text.startswith(f"{name} answers") for c in completions)
    model.score(["question"], [" yes"])
    generated = [r for s in servers for r in s.requests if r.path == "/v1/completions"]
    assert len(generated) == 7 and all(r.body["model"] == name for r in generated)

    model.close()
    assert [vllm.loaded for vllm in vllms] == [{}, {}]
    assert [vllm.calls for vllm in vllms] == [[("load_lora_adapter", name), ("unload_lora_adapter", name)]] * 2
    model.close()  # a second close sends nothing
    assert sum(len(lora_requests(s)) for s in servers) == 4


def test_the_name_follows_the_adapters_content_not_its_path(serve, tmp_path):
    vllm = VLLMRuntimeLoRA()
    server = serve(vllm)

    def name_of(folder):
        model = load_language_model(adapter_model([server.url], folder))
        model.close()
        return model.backend.model

    first = name_of(write_adapter(tmp_path / "a"))
    assert name_of(write_adapter(tmp_path / "copy-of-a")) == first
    assert name_of(write_adapter(tmp_path / "b", weights=b"other weights")) != first
    assert name_of(write_adapter(tmp_path / "c", rank=4)) != first  # adapter_config.json counts too


def test_an_adapter_the_server_already_has_is_used_and_left_loaded(serve, tmp_path):
    adapter = write_adapter(tmp_path / "adapter")
    vllm = VLLMRuntimeLoRA()
    server = serve(vllm)
    earlier = load_language_model(adapter_model([server.url], adapter))  # e.g. a run that was killed: never closed
    name = earlier.backend.model

    model = load_language_model(adapter_model([server.url], adapter))
    assert model.backend.model == name
    assert lora_requests(server)[-1].body == {"lora_name": name, "lora_path": str(adapter.resolve())}  # answered 400
    assert model.answer(["hello"], GenerationParams(max_new_tokens=2))[0].text.startswith(name)
    model.close()
    assert vllm.loaded == {name: str(adapter.resolve())}  # not ours to unload
    assert [route for route, _ in vllm.calls] == ["load_lora_adapter", "load_lora_adapter"]
    earlier.close()
    assert vllm.loaded == {}


@pytest.mark.parametrize(
    "reply",
    [
        Reply(404, {"detail": "Not Found"}),  # vLLM without VLLM_ALLOW_RUNTIME_LORA_UPDATING: no such route
        Reply(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}),  # llama.cpp
        Reply(405, {"detail": "Method Not Allowed"}),
    ],
)
def test_a_server_without_runtime_loading_is_a_one_line_error_naming_what_to_start_it_with(serve, tmp_path, reply):
    server = serve(lambda request, attempt: reply)
    with pytest.raises(SelfAlignError) as error:
        load_language_model(adapter_model([server.url], write_adapter(tmp_path / "adapter")))
    message = str(error.value)
    assert "\n" not in message
    assert "/v1/load_lora_adapter does not exist" in message
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in message and "--enable-lora" in message
    assert "runtime_lora: none" in message
    assert len(server.requests) == 1  # not retried


def test_vllm_with_runtime_updating_off_is_the_same_error(serve, tmp_path):
    server = serve(VLLMRuntimeLoRA(runtime_updating=False))
    with pytest.raises(SelfAlignError, match=r"does not exist \(HTTP 404\).*VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
        load_language_model(adapter_model([server.url], write_adapter(tmp_path / "adapter")))


def test_a_server_started_without_enable_lora_is_a_one_line_error_and_not_retried(serve, tmp_path):
    vllm = VLLMRuntimeLoRA(enable_lora=False)
    server = serve(vllm)
    with pytest.raises(SelfAlignError) as error:
        load_language_model(adapter_model([server.url], write_adapter(tmp_path / "adapter")))
    message = str(error.value)
    assert "\n" not in message
    assert "the server runs without LoRA (HTTP 500: LoRA is not enabled.)" in message and "--enable-lora" in message
    assert len(server.requests) == 1


def test_a_rank_above_the_servers_limit_is_vllms_message(serve, tmp_path):
    server = serve(VLLMRuntimeLoRA(max_lora_rank=16))
    with pytest.raises(SelfAlignError, match=r"refused the adapter \(HTTP 500: LoRA rank 32 is greater than "):
        load_language_model(adapter_model([server.url], write_adapter(tmp_path / "adapter", rank=32)))
    assert len(server.requests) == 1


def test_the_path_sent_is_mapped_and_a_path_the_server_cannot_read_is_a_clear_error(serve, tmp_path):
    adapter = write_adapter(tmp_path / "runs" / "dpo" / "training")
    server = serve(VLLMRuntimeLoRA())  # it reads the path it is sent: /mnt/runs/... does not exist here
    with pytest.raises(SelfAlignError) as error:
        load_language_model(
            adapter_model([server.url], adapter, adapter_path_map={str(tmp_path / "runs"): "/mnt/runs"})
        )
    assert lora_requests(server)[0].body["lora_path"] == "/mnt/runs/dpo/training"
    message = str(error.value)
    assert "cannot read /mnt/runs/dpo/training" in message and "adapter_path_map" in message and "\n" not in message


def test_a_folder_that_is_not_a_safetensors_peft_adapter_is_refused_before_any_request(serve, tmp_path):
    server = serve(VLLMRuntimeLoRA())
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(SelfAlignError, match="no adapter_model.safetensors; it must be a PEFT adapter folder"):
        load_language_model(adapter_model([server.url], folder))
    with pytest.raises(SelfAlignError, match="no adapter_config.json"):
        load_language_model(adapter_model([server.url], tmp_path / "missing"))
    assert server.requests == []


def test_runtime_lora_none_refuses_an_adapter_and_says_how_to_serve_one():
    config = adapter_model(["http://127.0.0.1:9/v1"], "runs/sft/training", runtime_lora="none")
    with pytest.raises(SelfAlignError, match=r"runtime_lora is none.*--lora-modules NAME=PATH\) and set model: NAME"):
        load_language_model(config)


# ---- servers that fail on the way ------------------------------------------------------------------------------


def test_passing_faults_while_registering_and_generating_are_retried(serve, tmp_path):
    vllm = VLLMRuntimeLoRA()
    faults = {("load_lora_adapter", 1): Reply(drop=True), ("load_lora_adapter", 2): Reply(503, {"error": {}}),
              ("question 1", 1): Reply(500, {"error": {"message": "engine hiccup"}})}  # fmt: skip

    def flaky(request, attempt):
        if "lora_adapter" in request.path:
            key = request.path.rsplit("/", 1)[-1]
        else:  # the request as the plain format rendered it: "Question: ...\nAnswer:"
            key = request.key.split("\n")[0].removeprefix("Question: ")
        return faults.get((key, attempt)) or vllm(request, attempt)

    server = serve(flaky)
    model = load_language_model(adapter_model([server.url], write_adapter(tmp_path / "adapter")))
    name = model.backend.model
    assert vllm.loaded == {name: str((tmp_path / "adapter").resolve())}
    assert len(lora_requests(server)) == 3  # dropped, 503, loaded
    completions = model.answer(["question 0", "question 1", "question 2"], GenerationParams(max_new_tokens=3))
    assert all(c.text.startswith(f"{name} answers") for c in completions)
    assert model.backend.last_run.retries == 1
    model.close()
    assert vllm.loaded == {}


def test_a_server_that_keeps_failing_to_register_ends_after_the_retries(serve, tmp_path):
    server = serve(lambda request, attempt: Reply(503, {"error": {"message": "overloaded"}}))
    with pytest.raises(SelfAlignError, match=r"load_lora_adapter failed after 3 attempts; last error: HTTP 503: over"):
        load_language_model(adapter_model([server.url], write_adapter(tmp_path / "adapter")))
    assert len(server.requests) == 3


def test_a_replica_that_refuses_leaves_no_replica_registered(serve, tmp_path):
    willing, unwilling = VLLMRuntimeLoRA(), VLLMRuntimeLoRA(enable_lora=False)
    servers = [serve(willing), serve(unwilling)]
    with pytest.raises(SelfAlignError, match="runs without LoRA"):
        load_language_model(adapter_model([s.url for s in servers], write_adapter(tmp_path / "adapter")))
    assert [route for route, _ in willing.calls] == ["load_lora_adapter", "unload_lora_adapter"]
    assert willing.loaded == {}


def test_a_server_gone_at_close_costs_a_warning_not_an_error(serve, loop, tmp_path, caplog):
    vllm = VLLMRuntimeLoRA()
    server = serve(vllm)
    model = load_language_model(adapter_model([server.url], write_adapter(tmp_path / "adapter")))
    loop.call(server.stop())
    caplog.set_level(logging.WARNING)
    model.close()
    assert f"could not unregister model '{model.backend.model}'" in caplog.text


def test_registration_carries_the_api_key_and_never_shows_it(serve, tmp_path, monkeypatch, caplog):
    secret = "sk-test-runtime-lora-SECRET"
    monkeypatch.setenv("SELFALIGN_TEST_KEY", secret)

    def careless(request, attempt):  # repeats the credentials in its errors
        auth = request.headers.get("authorization", "")
        if attempt == 1:
            return Reply(503, {"error": {"message": f"busy for {auth}"}})
        return Reply(500, {"error": {"message": f"no LoRA for {auth}"}})

    server = serve(careless)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SelfAlignError) as error:
        load_language_model(
            adapter_model([server.url], write_adapter(tmp_path / "adapter"), api_key_env="SELFALIGN_TEST_KEY")
        )
    assert all(request.headers["authorization"] == f"Bearer {secret}" for request in server.requests)
    assert "no LoRA for Bearer ***" in str(error.value) and "busy for Bearer ***" in caplog.text
    assert secret not in str(error.value) and secret not in caplog.text


def test_where_the_server_reads_adapters_stays_out_of_cache_keys(tmp_path):
    plain = adapter_model(["http://127.0.0.1:9/v1"], tmp_path)
    mapped = adapter_model(["http://127.0.0.1:9/v1"], tmp_path, adapter_path_map={"runs": "/mnt/runs"})
    key = {"cache_key": True}
    assert plain.model_dump(context=key) == mapped.model_dump(context=key)
    assert plain.model_dump() != mapped.model_dump()
