"""The OpenAI-compatible backend against a fake server on 127.0.0.1: order, concurrency, retries, timeouts, keys."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from pydantic import ValidationError

from selfalign.backends.base import BACKENDS, GenerationParams
from selfalign.backends.language_model import ModelConfig, load_language_model
from selfalign.backends.openai_backend import continuation_logprob
from selfalign.data.resumable import ResumableJsonl, process_resumably
from selfalign.errors import SelfAlignError
from tests.backends.http_helpers import FakeOpenAIServer, FaultProxy, Reply

PROMPTS = [f"prompt number {i}" for i in range(12)]


def model_config(urls: list[str], **options) -> ModelConfig:
    return ModelConfig(
        model="served-model",
        backend="openai",
        options={"base_urls": urls, "show_progress": False, "backoff_s": 0.01, **options},
    )


def backend_for(urls: list[str], **options):
    return BACKENDS.create("openai", model_config(urls, **options))


def index_of(request) -> int:
    return int(request.key.split()[-1])


# ---- generation -----------------------------------------------------------------------------------------------


def test_results_come_back_in_input_order_with_usage(serve):
    # later items answer first
    server = serve(lambda request, attempt: Reply(delay=0.02 * (len(PROMPTS) - index_of(request))))
    completions = backend_for([server.url], concurrency=12).generate(PROMPTS, GenerationParams(max_new_tokens=5))
    assert [c.text for c in completions] == [f"echo:{p}" for p in PROMPTS]
    assert all(c.prompt_tokens == 3 and c.completion_tokens == 2 and c.finish_reason == "stop" for c in completions)
    assert len(server.requests) == len(PROMPTS)
    assert all(request.path == "/v1/completions" for request in server.requests)


def test_requests_carry_the_sampling_settings(serve):
    server = serve()
    backend = backend_for([server.url], extra_body={"top_k": 40}, repetition_penalty_field="repeat_penalty")
    params = GenerationParams(max_new_tokens=7, temperature=0.7, top_p=0.9, seed=3, stop=["\n"], repetition_penalty=1.2)
    backend.generate(["hello"], params)
    backend.generate(["plain"], GenerationParams())
    penalised, plain = (request.body for request in server.requests)
    assert penalised == {"model": "served-model", "prompt": "hello", "max_tokens": 7, "temperature": 0.7,
                         "top_p": 0.9, "seed": 3, "stop": ["\n"], "repeat_penalty": 1.2, "top_k": 40}  # fmt: skip
    assert "stop" not in plain and plain["repeat_penalty"] == 1.0  # sent even when off: llama.cpp's default is 1.1
    openai = backend_for([server.url], repetition_penalty_field=None)
    openai.generate(["for openai"], GenerationParams())
    assert "repetition_penalty" not in server.requests[-1].body
    with pytest.raises(SelfAlignError, match="repetition_penalty needs options.repetition_penalty_field"):
        openai.generate(["x"], GenerationParams(repetition_penalty=1.2))
    with pytest.raises(SelfAlignError, match=r"no_repeat_ngram_size is transformers-only; send .* options\.extra_body"):
        openai.generate(["x"], GenerationParams(no_repeat_ngram_size=4))


def test_stop_strings_are_cut_even_where_the_server_keeps_them(serve):
    server = serve(
        lambda request, attempt: Reply(
            payload={"choices": [{"text": " Paris.\nQuestion: next", "finish_reason": "length"}]}
        )
    )
    completion = backend_for([server.url]).generate(["q"], GenerationParams(stop=["\nQuestion:"]))[0]
    assert completion.text == "Paris."
    assert completion.finish_reason == "stop"
    assert completion.prompt_tokens == completion.completion_tokens == 0  # no usage in the answer


def test_concurrency_is_bounded_per_server_and_the_load_is_spread(serve):
    servers = [serve(lambda request, attempt: Reply(delay=0.05)) for _ in range(2)]
    backend = backend_for([s.url for s in servers], concurrency=3)
    prompts = [f"item {i}" for i in range(24)]
    completions = backend.generate(prompts, GenerationParams())
    assert [c.text for c in completions] == [f"echo:{p}" for p in prompts]
    assert [s.max_in_flight for s in servers] == [3, 3]
    assert sum(len(s.requests) for s in servers) == 24
    assert all(len(s.requests) >= 6 for s in servers)
    assert sum(backend.last_run.requests.values()) == 24 and backend.last_run.retries == 0


def test_called_from_inside_a_running_event_loop(serve):
    server = serve()
    backend = backend_for([server.url])

    async def stage():
        return backend.generate(["inside"], GenerationParams())

    assert asyncio.run(stage())[0].text == "echo:inside"


# ---- retries, backoff, timeouts -----------------------------------------------------------------------------


def test_dropped_connections_and_5xx_are_retried_with_growing_backoff(serve):
    def flaky(request, attempt):
        return {1: Reply(drop=True), 2: Reply(status=503), 3: Reply(status=500)}.get(attempt, Reply())

    server = serve(flaky)
    times: dict[str, list[float]] = {}
    original = server.handler

    def timed(request, attempt):
        times.setdefault(request.key, []).append(time.monotonic())
        return original(request, attempt)

    server.handler = timed
    backend = backend_for([server.url], backoff_s=0.2, concurrency=2)
    completions = backend.generate(["a", "b"], GenerationParams())
    assert [c.text for c in completions] == ["echo:a", "echo:b"]
    assert server.attempts == {"a": 4, "b": 4}
    assert backend.last_run.retries == 6
    for stamps in times.values():
        gaps = [later - earlier for earlier, later in zip(stamps, stamps[1:])]
        # delays are jittered within [half, all] of 0.2, 0.4, 0.8 s (upper bounds loose: a busy CPU adds time)
        assert 0.1 <= gaps[0] < 1.2 and 0.2 <= gaps[1] < 1.4 and 0.4 <= gaps[2] < 1.8


def test_429_waits_as_long_as_retry_after_says(serve):
    server = serve(
        lambda request, attempt: Reply(status=429, headers={"Retry-After": "1"}) if attempt == 1 else Reply()
    )
    started = time.monotonic()
    completion = backend_for([server.url], backoff_s=0.01).generate(["x"], GenerationParams())[0]
    assert completion.text == "echo:x"
    assert time.monotonic() - started >= 0.95


def test_a_request_past_its_timeout_is_abandoned_and_retried(serve):
    server = serve(lambda request, attempt: Reply(delay=5.0) if attempt == 1 else Reply())
    started = time.monotonic()
    completion = backend_for([server.url], timeout_s=0.3).generate(["slow"], GenerationParams())[0]
    assert completion.text == "echo:slow"
    assert time.monotonic() - started < 3.0
    assert server.attempts["slow"] == 2


def test_an_item_that_keeps_failing_ends_the_call_naming_it_and_the_last_error(serve):
    def broken_item(request, attempt):
        if request.key == "prompt number 2":
            return Reply(status=500, payload={"error": {"message": "model crashed"}})
        return Reply()

    server = serve(broken_item)
    with pytest.raises(SelfAlignError, match=r"item 2 failed after 3 attempts; .*HTTP 500: model crashed"):
        backend_for([server.url], max_retries=2).generate(PROMPTS[:4], GenerationParams())
    assert server.attempts["prompt number 2"] == 3


def test_client_errors_are_not_retried(serve):
    server = serve(lambda request, attempt: Reply(status=404, payload={"error": {"message": "no model 'x'"}}))
    with pytest.raises(SelfAlignError, match=r"item 0 failed at .*/v1/completions: HTTP 404: no model 'x'"):
        backend_for([server.url]).generate(["q"], GenerationParams())
    assert len(server.requests) == 1


def test_an_unreachable_server_fails_after_the_retries(loop):
    server = loop.call(FakeOpenAIServer().start())
    loop.call(server.stop())  # the port is now closed
    with pytest.raises(SelfAlignError, match=r"item 0 failed after 2 attempts; .*connection error"):
        backend_for([server.url], max_retries=1).generate(["q"], GenerationParams())


def test_the_fault_proxy_passes_each_item_on_exactly_once(loop, serve):
    server = serve()
    schedule = {1: "drop", 2: "500", 3: "429", 4: "drop_after", 5: "delay", 6: "stall"}

    def faults(key, attempt):
        return schedule.get(int(key.split()[-1]) % 7) if attempt == 1 else None

    proxy = loop.call(FaultProxy(server.port, faults, delay_s=0.1, stall_s=1.5).start())
    try:
        backend = backend_for([proxy.url], timeout_s=0.5, concurrency=4)
        completions = backend.generate(PROMPTS, GenerationParams())
        loop.call(proxy.settle())  # the stalled request ends too, so a late answer would be counted
    finally:
        loop.call(proxy.stop())
    assert [c.text for c in completions] == [f"echo:{p}" for p in PROMPTS]
    assert all(proxy.delivered[p] == 1 for p in PROMPTS)
    assert set(proxy.injected) == {"drop", "500", "429", "drop_after", "delay", "stall"}
    assert server.attempts["prompt number 4"] == 2  # drop_after: the server did that item's work twice
    assert proxy.abandoned == 1  # the client had given up on the stalled request: nothing was delivered twice


# ---- the API key --------------------------------------------------------------------------------------------

SECRET = "sk-test-0123456789-SECRET"


def test_the_api_key_comes_from_the_environment_and_is_never_shown(serve, monkeypatch, caplog):
    monkeypatch.setenv("SELFALIGN_TEST_KEY", SECRET)

    def echo_authorization(request, attempt):
        if attempt == 1:  # a careless server that repeats the credentials in its error
            return Reply(
                status=503, payload={"error": {"message": f"overloaded for {request.headers['authorization']}"}}
            )
        if request.key == "refused":
            return Reply(status=401, payload={"error": {"message": f"bad key {request.headers['authorization']}"}})
        return Reply()

    server = serve(echo_authorization)
    config = model_config([server.url], api_key_env="SELFALIGN_TEST_KEY")
    caplog.set_level(logging.DEBUG)
    backend = BACKENDS.create("openai", config)
    assert backend.generate(["fine"], GenerationParams())[0].text == "echo:fine"
    with pytest.raises(SelfAlignError) as error:
        backend.generate(["refused"], GenerationParams())
    assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"
    assert "bad key Bearer ***" in str(error.value)
    assert "overloaded for Bearer ***" in caplog.text  # the retry was logged, scrubbed
    shown = [caplog.text, str(error.value), repr(backend), repr(vars(backend)), str(vars(backend)),
             config.model_dump_json(), repr(config)]  # fmt: skip
    assert not any(SECRET in text for text in shown)


def test_a_named_api_key_variable_that_is_not_set_is_an_error(monkeypatch):
    monkeypatch.delenv("SELFALIGN_TEST_KEY", raising=False)
    with pytest.raises(SelfAlignError, match="environment variable SELFALIGN_TEST_KEY is not set"):
        backend_for(["http://127.0.0.1:9/v1"], api_key_env="SELFALIGN_TEST_KEY")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"base_urls": ["http://127.0.0.1:9/v1"], "concurency": 4}, "concurency: unknown option"),
        ({}, "needs base_url"),
        ({"base_urls": ["127.0.0.1:9"]}, "not an http"),
        ({"base_url": "http://a/v1", "base_urls": ["http://b/v1"]}, "not both"),
        ({"base_url": "http://a/v1", "endpoint": "responses"}, "endpoint"),
    ],
)
def test_options_are_validated_when_the_config_loads(options, message):
    with pytest.raises(ValidationError, match=message):
        ModelConfig(backend="openai", options=options)


def test_settings_that_belong_to_the_server_are_refused():
    options = {"base_url": "http://127.0.0.1:9/v1"}
    with pytest.raises(SelfAlignError, match="--lora-modules"):
        BACKENDS.create(
            "openai", ModelConfig(backend="openai", adapter="a", options={**options, "runtime_lora": "none"})
        )
    with pytest.raises(SelfAlignError, match="prompt_format must be raw"):
        BACKENDS.create(
            "openai", ModelConfig(backend="openai", prompt_format="plain", options={**options, "endpoint": "chat"})
        )


# ---- prompt formats through LanguageModel ---------------------------------------------------------------------


def test_completions_endpoint_sends_the_prompt_rendered_in_the_named_format(serve):
    server = serve()
    model = load_language_model(model_config([server.url]))
    assert model.prompt_format.name == "plain"
    model.answer(["What is 2 + 2?"], GenerationParams(max_new_tokens=4))
    body = server.requests[0].body
    assert body["prompt"] == "Question: What is 2 + 2?\nAnswer:"
    assert body["stop"] == ["\nQuestion:", "\nAnswer:"]


def test_chat_endpoint_sends_the_request_as_a_user_message_after_the_system_prompt(serve):
    server = serve()
    config = model_config([server.url], endpoint="chat").model_copy(update={"system_prompt": "Be brief."})
    model = load_language_model(config)
    assert model.prompt_format.name == "raw"
    completion = model.answer(["What is 2 + 2?"], GenerationParams(max_new_tokens=4))[0]
    assert server.requests[0].path == "/v1/chat/completions"
    assert server.requests[0].body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
    ]
    assert "stop" not in server.requests[0].body
    assert completion.text == "chat:system=Be brief. | user=What is 2 + 2?"
    with pytest.raises(SelfAlignError, match="score needs endpoint: completions"):
        model.score(["q"], [" a"])


# ---- scoring ------------------------------------------------------------------------------------------------


def test_score_sums_the_echoed_log_probabilities_of_the_continuation(serve):
    server = serve()  # one token per character; the token at position k has log-probability -k/100
    scores = backend_for([server.url]).score(["abc", "Question: x\nAnswer:"], [" de", " 1"])
    assert scores[0] == pytest.approx(-(3 + 4 + 5) / 100)
    assert scores[1] == pytest.approx(-(19 + 20) / 100)
    body = server.requests[0].body
    assert body["echo"] is True and body["logprobs"] == 1 and body["max_tokens"] == 1


def test_a_token_that_spans_the_boundary_counts_as_the_continuations():
    logprobs = {"text_offset": [0, 7, 9, 11], "token_logprobs": [None, -1.0, -2.0, -4.0]}  # "Answer:", " 1", ...
    answer = {"choices": [{"logprobs": logprobs}]}
    assert continuation_logprob(answer, start=8, end=11) == -3.0  # the token at 7..9 straddles the boundary 8
    assert continuation_logprob(answer, start=9, end=11) == -2.0  # the generated token (offset 11) is left out


@pytest.mark.parametrize(
    "logprobs",
    [
        None,  # no logprobs at all
        {"text_offset": [14], "token_logprobs": [-0.5], "tokens": ["!"]},  # only the generated token: no echo
        {"text_offset": [0, 8], "token_logprobs": [None, None], "tokens": ["abc", " de"]},  # echo without values
    ],
)
def test_a_server_without_prompt_log_probabilities_gives_a_clear_error(serve, logprobs):
    server = serve(lambda request, attempt: Reply(payload={"choices": [{"text": "!", "logprobs": logprobs}]}))
    with pytest.raises(SelfAlignError, match="no log-probabilities for the prompt's tokens.*--logits_all true"):
        backend_for([server.url]).score(["Question: x"], [" de"])


# ---- resume ---------------------------------------------------------------------------------------------------


def test_a_stage_resumes_after_a_failed_chunk_without_redoing_finished_items(serve, tmp_path):
    outage = {"on": True}

    def handler(request, attempt):
        return Reply(status=503) if outage["on"] and index_of(request) >= 6 else Reply()

    server = serve(handler)
    backend = backend_for([server.url], max_retries=1)
    items = [{"key": i, "prompt": p} for i, p in enumerate(PROMPTS)]

    def work(chunk):
        completions = backend.generate([item["prompt"] for item in chunk], GenerationParams())
        return [{**item, "completion": c.text} for item, c in zip(chunk, completions)]

    store = ResumableJsonl(tmp_path / "answers.jsonl")
    with pytest.raises(SelfAlignError, match=r"item \d failed after 2 attempts"):
        process_resumably(items, store, work, chunk_size=3)
    assert len(store) == 6  # two chunks finished before the outage
    outage["on"] = False
    rows = process_resumably(items, ResumableJsonl(tmp_path / "answers.jsonl"), work, chunk_size=3)
    assert [row["completion"] for row in rows] == [f"echo:{p}" for p in PROMPTS]
    assert all(server.attempts[p] == 1 for p in PROMPTS[:6])  # finished items were not sent again
