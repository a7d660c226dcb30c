"""The openai backend against a real OpenAI-compatible server: llama.cpp's, through llama-cpp-python, serving the
embedded GGUF on 127.0.0.1; then behind fault-injecting proxies that drop connections, answer 500 and 429, and
delay or stall requests, to show that every item completes exactly once and in order.

Needs `llama-cpp-python[server]` built with the flags in .ci/run (shared/NOTES.md: default builds crash on these
CPUs); skips with the reason where it is not installed.
"""

from __future__ import annotations

import time

import pytest

from selfalign.backends.base import BACKENDS, GenerationParams
from selfalign.backends.language_model import ModelConfig, load_language_model
from selfalign.backends.llama_server import llama_server as serve_gguf
from selfalign.backends.llama_server import server_missing
from selfalign.models.gguf_cache import embedded_gguf_path
from tests.backends.http_helpers import FAULTS, BackgroundLoop, FaultProxy

QUESTIONS = [
    "What is the capital of France?", "Name three primary colours.", "How many legs does a spider have?",
    "Write one sentence about the sea.", "What is 12 times 12?", "Who wrote Hamlet?", "What is photosynthesis?",
    "Give me a tip for sleeping better.",
]  # fmt: skip

pytestmark = [pytest.mark.slow, pytest.mark.skipif(server_missing() is not None, reason=server_missing() or "")]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """`python -m llama_cpp.server` on the embedded GGUF, 127.0.0.1 and a free port; stopped by its PID."""
    gguf = embedded_gguf_path("gemma-3-270m")  # under $SELFALIGN_HOME (default ~/.cache/selfalign)
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with serve_gguf(gguf, log, extra_args=["--n_ctx", "2048", "--logits_all", "true"]) as server:
        print(f"\nllama.cpp server {server.pid} serving on {server.url} after {server.startup_s:.1f} s")
        yield server.url, server.port


def server_model(urls: str | list[str], **options) -> ModelConfig:
    return ModelConfig(
        backend="openai",
        model="gemma-3-270m",
        prompt_format="plain",  # the embedded model is a base model
        options={
            "base_urls": [urls] if isinstance(urls, str) else urls,
            "repetition_penalty_field": "repeat_penalty",
            "show_progress": False,
            **options,
        },
    )


GREEDY = GenerationParams(max_new_tokens=32, temperature=0.0)


def test_generate_and_score_through_the_server(llama_server, record_property, capsys):
    url, _ = llama_server
    model = load_language_model(server_model(url, concurrency=2))
    started = time.perf_counter()
    first = model.answer(QUESTIONS, GREEDY)
    seconds = time.perf_counter() - started
    tokens = sum(c.completion_tokens for c in first)
    assert all(c.prompt_tokens > 5 and 0 < c.completion_tokens <= 32 for c in first)
    assert sum(bool(c.text) for c in first) >= len(QUESTIONS) // 2  # a base model may stop at once ("\nQuestion:")
    assert any(c.finish_reason == "length" for c in first) and any(c.finish_reason == "stop" for c in first)
    assert not any("\nQuestion:" in c.text for c in first)  # the plain format's stop strings reached the server
    assert [c.text for c in model.answer(QUESTIONS, GREEDY)] == [c.text for c in first]  # greedy repeats

    prompts = [QUESTIONS[0]] * 3
    paris, berlin, paris_is = model.score(prompts, [" Paris", " Berlin", " Paris is"])
    assert paris > berlin
    is_after_paris = model.backend.score([model.render(QUESTIONS[0]) + " Paris"], [" is"])[0]
    assert paris_is == pytest.approx(paris + is_after_paris, abs=1e-3)  # the chain rule, token for token

    record_property("llama_server_tokens_per_s", round(tokens / seconds, 1))
    with capsys.disabled():
        print(f"\nllama.cpp server: {len(QUESTIONS)} answers, {tokens} tokens in {seconds:.1f} s "
              f"({tokens / seconds:.1f} tok/s, concurrency 2); log P(' Paris') = {paris:.3f}, "
              f"log P(' Berlin') = {berlin:.3f}")  # fmt: skip


def test_every_item_completes_exactly_once_through_faulty_proxies(llama_server, capsys):
    url, port = llama_server
    prompts = [f"Question: {q}\nAnswer:" for q in QUESTIONS]
    params = GenerationParams(max_new_tokens=16, temperature=0.0)
    direct = BACKENDS.create("openai", server_model(url)).generate(prompts, params)

    def faults(key: str, attempt: int) -> str | None:
        index = prompts.index(key)
        if attempt == 1:
            return FAULTS[index % len(FAULTS)]
        return "500" if attempt == 2 and index % 3 == 0 else None

    with BackgroundLoop() as loop:
        proxies = [loop.call(FaultProxy(port, faults, delay_s=0.5, stall_s=12.0).start()) for _ in range(2)]
        try:
            urls = [proxy.url for proxy in proxies]  # two "replicas" of the same engine
            backend = BACKENDS.create(
                "openai", server_model(urls, concurrency=2, timeout_s=10.0, max_retries=4, backoff_s=0.2)
            )
            started = time.perf_counter()
            completions = backend.generate(prompts, params)
            seconds = time.perf_counter() - started
            for proxy in proxies:
                loop.call(proxy.settle())  # stalled requests end too, so a late answer would be counted
        finally:
            for proxy in proxies:
                loop.call(proxy.stop())
    assert [c.text for c in completions] == [c.text for c in direct]
    delivered = {key: sum(proxy.delivered[key] for proxy in proxies) for key in prompts}
    assert delivered == {key: 1 for key in prompts}
    injected = sum((proxy.injected for proxy in proxies), start=type(proxies[0].injected)())
    assert set(injected) == set(FAULTS)
    assert sum(proxy.abandoned for proxy in proxies) == injected["stall"]  # the client had given up on those
    assert all(count > 0 for count in backend.last_run.requests.values())  # both proxies took work
    with capsys.disabled():
        print(f"\nthrough faulty proxies: {len(prompts)} items in {seconds:.1f} s, faults injected {dict(injected)}, "
              f"retries {backend.last_run.retries}, requests per proxy {list(backend.last_run.requests.values())}, "
              f"stalled requests abandoned by the client {sum(p.abandoned for p in proxies)}")  # fmt: skip


def test_chat_endpoint_sends_the_request_through_the_servers_chat_template(llama_server):
    url, _ = llama_server
    chat = load_language_model(server_model(url, endpoint="chat").model_copy(update={"prompt_format": "auto"}))
    assert chat.prompt_format.name == "raw"
    raw = load_language_model(server_model(url).model_copy(update={"prompt_format": "raw"}))
    question, params = ["What is the capital of France?"], GenerationParams(max_new_tokens=8)
    chat_answer, raw_answer = chat.answer(question, params)[0], raw.answer(question, params)[0]
    # the base model often ends its turn at once in the chat template, so only the template itself is checked
    assert isinstance(chat_answer.text, str)
    assert chat_answer.prompt_tokens > raw_answer.prompt_tokens  # the server wrapped the message in its template


def test_an_adapter_needs_runtime_loading_which_llama_cpps_server_lacks(llama_server, tmp_path):
    """llama-cpp-python's server applies a GGUF LoRA only from its start (--lora_path) and has no route to load one:
    an adapter with the default runtime_lora: vllm is refused in one line, naming what to do instead."""
    from selfalign.errors import SelfAlignError
    from tests.backends.vllm_runtime_lora import write_adapter

    url, _ = llama_server
    config = server_model(url).model_copy(update={"adapter": str(write_adapter(tmp_path / "adapter"))})
    with pytest.raises(SelfAlignError) as error:
        load_language_model(config)
    message = str(error.value)
    assert "/v1/load_lora_adapter does not exist (HTTP 404)" in message and "runtime_lora: none" in message
    assert "\n" not in message


def test_compare_with_the_transformers_backend_for_information_only(llama_server, capsys):
    """The server runs the Q4_K_M weights; transformers runs them de-quantized: answers may differ, so no assert."""
    url, _ = llama_server
    served = load_language_model(server_model(url))
    local = load_language_model(ModelConfig(prompt_format="plain"))
    local.backend.show_progress = False
    questions, params = QUESTIONS[:4], GenerationParams(max_new_tokens=16, temperature=0.0)
    served_answers = served.answer(questions, params)
    local_answers = local.answer(questions, params)
    continuations = [" Paris", " Red", " Eight", " The"]
    served_scores = served.score(questions, continuations)
    local_scores = local.score(questions, continuations)
    same = sum(s.text == t.text for s, t in zip(served_answers, local_answers))
    gaps = [abs(s - t) for s, t in zip(served_scores, local_scores)]
    with capsys.disabled():
        print(
            f"\nllama.cpp (Q4_K_M) vs transformers (de-quantized GGUF, dtype auto): {same}/{len(questions)} greedy "
            f"answers identical; score differences mean {sum(gaps) / len(gaps):.3f}, max {max(gaps):.3f} nats"
        )
        for question, s, t in zip(questions, served_answers, local_answers):
            print(f"  {question!r}\n    llama.cpp:    {s.text!r}\n    transformers: {t.text!r}")
