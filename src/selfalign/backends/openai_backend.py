"""Generation and scoring through OpenAI-compatible inference servers: vLLM, TGI, llama.cpp, Ollama, OpenAI.

selfalign does not imitate these engines, it sends them requests: `/v1/completions` for prompts already rendered by
our prompt format (`endpoint: completions`), or `/v1/chat/completions` with the request as one user message for
chat models (`endpoint: chat`, prompt format `raw`, the server applies the model's chat template). `score` reads
the log-probabilities of the continuation's own tokens from `/v1/completions` with `echo`, which servers offer only
for completions (llama.cpp's server only when started with `--logits_all true`).

Requests run asynchronously, at most `concurrency` at a time per server. Each server in `base_urls` is one replica
of the same engine; workers per server take items from one queue, so a faster replica takes more. Connection
errors, timeouts, 408, 429 and 5xx are retried with exponential backoff and jitter (a `Retry-After` header is
honoured); other 4xx answers fail at once. Results come back in input order. A request that still fails after its
retries ends the call with a SelfAlignError naming the item; the backend is stateless, so stages get item-level
resume by sending items in chunks through `selfalign.data.resumable.process_resumably`, which keeps every finished
chunk.

Sampling settings map to request fields: max_new_tokens -> max_tokens, temperature, top_p, seed, stop (all stop
strings are sent; OpenAI's own API accepts at most 4), and repetition_penalty, always (llama.cpp's server applies
1.1 when it is not sent), under the name in `repetition_penalty_field`: `repetition_penalty` for vLLM's and TGI's
servers, `repeat_penalty` for llama.cpp's, null for APIs that refuse the field (OpenAI's). Token counts come from
the answer's `usage`; a server that reports none gives 0.

`adapter:` (a local PEFT folder) is registered with the servers at run time and requests then name it as their
`model` (`runtime_lora: vllm`, see selfalign.backends.runtime_lora); `close` unregisters it.

The API key is read from the environment variable that `api_key_env` names, so configs never hold it; it is sent
only in the Authorization header and replaced by *** in every message this module writes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from selfalign.backends.base import Completion, GenerationParams, check_score_inputs, truncate_at_stop
from selfalign.backends.http import RETRYABLE_STATUS, Secret, error_text, retry_after_seconds
from selfalign.backends.runtime_lora import RuntimeLoRA
from selfalign.config import StrictModel, format_validation_error
from selfalign.errors import SelfAlignError
from selfalign.progress import progress_bar

logger = logging.getLogger(__name__)

NO_PROMPT_LOGPROBS = (
    "the server returned no log-probabilities for the prompt's tokens, which `score` needs (it sends echo=true, "
    "logprobs=1 to /v1/completions); llama.cpp's server gives them only when started with --logits_all true, "
    "and chat-only APIs such as OpenAI's current models do not give them at all"
)


class OpenAIOptions(StrictModel):
    """`options:` of `backend: openai`. The served model's name is ModelConfig.model."""

    # Where and how requests go, not what comes back: left out of stage cache keys.
    OUTPUT_NEUTRAL: ClassVar[frozenset[str]] = frozenset(
        {"base_url", "base_urls", "api_key_env", "concurrency", "timeout_s", "max_retries", "backoff_s",
         "backoff_max_s", "show_progress", "runtime_lora", "adapter_path_map"}
    )  # fmt: skip

    base_url: str | None = Field(None, description="The server, e.g. http://127.0.0.1:8000/v1 (or use base_urls).")
    base_urls: list[str] = Field(
        default_factory=list, description="Several replicas of one engine (one URL each); the load is spread."
    )
    api_key_env: str | None = Field(None, description="Name of the environment variable that holds the API key.")
    endpoint: Literal["completions", "chat"] = Field(
        "completions", description="completions: raw prompts in our format; chat: the server's chat template."
    )
    concurrency: int = Field(8, ge=1, description="Most requests in flight at once, per server.")
    timeout_s: float = Field(120.0, gt=0, description="Time limit of one request, after which it is retried.")
    max_retries: int = Field(6, ge=0, description="Retries of one item after connection errors, timeouts, 429, 5xx.")
    backoff_s: float = Field(0.5, gt=0, description="Delay before the first retry; doubled at each retry, jittered.")
    backoff_max_s: float = Field(30.0, gt=0, description="Longest delay between retries (Retry-After included).")
    repetition_penalty_field: str | None = Field(
        "repetition_penalty",
        description="Request field for repetition_penalty: repeat_penalty on llama.cpp; null: not sent (OpenAI).",
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="Fields added to every request as they are (e.g. top_k)."
    )
    show_progress: bool = Field(True, description="Show a progress bar on stderr.")
    runtime_lora: Literal["vllm", "none"] = Field(
        "vllm",
        description="How `adapter:` reaches the server. vllm: registered at run time (/v1/load_lora_adapter; vLLM "
        "started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora); none: the server cannot load "
        "adapters (llama.cpp, hosted APIs), so `adapter:` is an error: serve it under its own name and set model.",
    )
    adapter_path_map: dict[str, str] = Field(
        default_factory=dict,
        description="Local folder -> the same folder as the server sees it, for adapter paths sent to a server "
        "on another filesystem view (e.g. {runs: /mnt/runs} for a container that mounts ./runs at /mnt/runs).",
    )

    @field_validator("base_urls")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"'{url}' is not an http:// or https:// URL")
        return [url.rstrip("/") for url in urls]

    @model_validator(mode="before")
    @classmethod
    def _one_list_of_servers(cls, data: Any) -> Any:
        """`base_url: U` is short for `base_urls: [U]`."""
        if isinstance(data, dict) and data.get("base_url") is not None:
            if data.get("base_urls"):
                raise ValueError("give base_url or base_urls, not both")
            data = {**data, "base_urls": [data["base_url"]], "base_url": None}
        return data

    @model_validator(mode="after")
    def _some_server(self) -> OpenAIOptions:
        if not self.base_urls:
            raise ValueError("the openai backend needs base_url (or base_urls), e.g. http://127.0.0.1:8000/v1")
        return self


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Fatal(Exception):
    pass


@dataclass
class RunStats:
    """What the last call did: requests sent per server and retries, for logs and tests."""

    requests: dict[str, int]
    retries: int = 0


class OpenAIBackend:
    name = "openai"
    tokenizer = None  # the server tokenizes; prompt formats that need a local tokenizer are not available

    def __init__(
        self, model: str, options: OpenAIOptions, api_key: str | None = None, system_prompt: str | None = None
    ) -> None:
        self.model = model
        self.options = options
        self.system_prompt = system_prompt  # sent as the system message on the chat endpoint
        self._api_key = Secret(api_key)
        self._adapter: Any = None  # a RuntimeLoRA once `serve_adapter` registered one
        self.last_run = RunStats({})
        # With the chat endpoint the server applies the chat template, so the request goes through unchanged.
        self.default_prompt_format = "raw" if options.endpoint == "chat" else "auto"

    def __repr__(self) -> str:
        return (
            f"OpenAIBackend(model={self.model!r}, base_urls={self.options.base_urls}, endpoint={self.options.endpoint})"
        )

    def serve_adapter(self, adapter: str) -> None:
        """Register the PEFT adapter folder `adapter` with every server; requests then name it as their model."""
        registration = RuntimeLoRA(adapter, self.options, self._api_key, self._retry_delay)
        registration.load()
        self._adapter, self.model = registration, registration.name

    def close(self) -> None:
        """Unregister the adapter from the servers where `serve_adapter` registered it."""
        if self._adapter is not None:
            self._adapter.unload()

    # ---- the Backend interface --------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[Completion]:
        bodies = [self._generation_body(prompt, params) for prompt in prompts]
        path = "/chat/completions" if self.options.endpoint == "chat" else "/completions"
        answers = self._run(path, bodies, "generating", count_tokens=True)
        return [self._completion(answer, params, index) for index, answer in enumerate(answers)]

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """log P(continuation | prompt) from the server's log-probabilities of prompt + continuation (echo).

        The server tokenizes the joined text; tokens that end after the prompt's last character count as the
        continuation's (a token that spans the boundary, as " 1" after "Answer:" does not but "1" after "Answer: "
        may, counts whole).
        """
        check_score_inputs(prompts, continuations)
        if self.options.endpoint == "chat":
            raise SelfAlignError(
                "openai backend: score needs endpoint: completions (chat endpoints give no log-probabilities of "
                "given text); serve the judge model behind /v1/completions"
            )
        # max_tokens 1, not 0: llama.cpp reads 0 as "until the context is full"
        fields = {"echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0.0}
        bodies = [
            {**self.options.extra_body, "model": self.model, "prompt": prompt + continuation, **fields}
            for prompt, continuation in zip(prompts, continuations)
        ]
        answers = self._run("/completions", bodies, "scoring", count_tokens=False)
        return [
            continuation_logprob(answer, len(prompt), len(prompt) + len(continuation), index)
            for index, (answer, prompt, continuation) in enumerate(zip(answers, prompts, continuations))
        ]

    # ---- requests ---------------------------------------------------------------------------------------------

    def _generation_body(self, prompt: str, params: GenerationParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            **self.options.extra_body,
            "model": self.model,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": params.seed,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.no_repeat_ngram_size:
            raise SelfAlignError(
                "openai backend: no_repeat_ngram_size is transformers-only; send an output-only penalty in "
                "options.extra_body instead (frequency_penalty, or llama.cpp's dry_multiplier)"
            )
        if self.options.repetition_penalty_field:
            body[self.options.repetition_penalty_field] = params.repetition_penalty
        elif params.repetition_penalty != 1.0:
            raise SelfAlignError(
                "openai backend: repetition_penalty needs options.repetition_penalty_field (the server's name for it)"
            )
        if self.options.endpoint == "chat":
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            body["messages"] = [*messages, {"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    def _completion(self, answer: dict[str, Any], params: GenerationParams, index: int) -> Completion:
        choice = answer["choices"][0]
        if self.options.endpoint == "chat":
            text = (choice.get("message") or {}).get("content") or ""
        else:
            text = choice.get("text") or ""
        if not isinstance(text, str):
            raise SelfAlignError(f"openai backend: item {index}: the answer's text is not a string")
        # Servers cut at stop strings themselves; cutting again also covers those that keep the stop string.
        text, stopped = truncate_at_stop(text, params.stop)
        finish = "length" if choice.get("finish_reason") == "length" and not stopped else "stop"
        usage = answer.get("usage") or {}
        return Completion(
            text=text.strip(),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=finish,
        )

    def _run(self, path: str, bodies: list[dict[str, Any]], description: str, count_tokens: bool) -> list[dict]:
        """Send every body, concurrently, and return the answers in input order (from sync code)."""
        if not bodies:
            return []

        def run() -> list[dict]:
            return asyncio.run(self._send_all(path, bodies, description, count_tokens))

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return run()
        # Called from inside an event loop (a notebook, an async stage): run ours on a thread of its own.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(run).result()

    async def _send_all(
        self, path: str, bodies: list[dict[str, Any]], description: str, count_tokens: bool
    ) -> list[dict]:
        import httpx

        options = self.options
        results: list[dict | None] = [None] * len(bodies)
        attempts = [0] * len(bodies)
        queue: asyncio.PriorityQueue[tuple[int, int]] = asyncio.PriorityQueue()
        for index in range(len(bodies)):
            queue.put_nowait((1, index))  # retries are queued with priority 0, ahead of fresh items
        remaining = len(bodies)
        finished = asyncio.Event()
        failures: list[BaseException] = []
        self.last_run = stats = RunStats({url: 0 for url in options.base_urls})
        connections = options.concurrency * len(options.base_urls)
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(options.timeout_s),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            headers={"Authorization": f"Bearer {self._api_key.reveal()}"} if self._api_key.reveal() else None,
        )

        async def worker(base_url: str, bar: Any) -> None:
            nonlocal remaining
            while True:
                _, index = await queue.get()
                url = base_url + path
                stats.requests[base_url] += 1
                try:
                    answer = await self._post(client, url, bodies[index])
                except _Retryable as exc:
                    attempts[index] += 1
                    message = self._api_key.scrub(str(exc))
                    if attempts[index] > options.max_retries:
                        failures.append(
                            SelfAlignError(
                                f"openai backend: item {index} failed after {attempts[index]} attempts; last error "
                                f"from {url}: {message}"
                            )
                        )
                        finished.set()
                        return
                    delay = self._retry_delay(attempts[index], exc.retry_after)
                    stats.retries += 1
                    logger.info("item %d: %s from %s; retry %d in %.2f s", index, message, url, attempts[index], delay)
                    # This worker waits too: a server that errs or throttles gets less traffic from us.
                    await asyncio.sleep(delay)
                    queue.put_nowait((0, index))
                    continue
                except _Fatal as exc:
                    message = self._api_key.scrub(str(exc))
                    failures.append(SelfAlignError(f"openai backend: item {index} failed at {url}: {message}"))
                    finished.set()
                    return
                results[index] = answer
                remaining -= 1
                usage = answer.get("usage") or {}
                bar.advance(1, tokens=int(usage.get("completion_tokens") or 0) if count_tokens else 0)
                if remaining == 0:
                    finished.set()

        async def guarded(base_url: str, bar: Any) -> None:
            try:
                await worker(base_url, bar)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # a bug must end the call, not leave it waiting for ever
                failures.append(exc)
                finished.set()

        async with client:
            with progress_bar(description, total=len(bodies), enabled=options.show_progress, unit="tok") as bar:
                workers = [
                    asyncio.create_task(guarded(url, bar))
                    for url in options.base_urls
                    for _ in range(options.concurrency)
                ]
                try:
                    await finished.wait()
                finally:
                    for task in workers:
                        task.cancel()
                    await asyncio.gather(*workers, return_exceptions=True)
        if failures:
            raise failures[0]
        return results  # type: ignore[return-value]

    async def _post(self, client: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        timeout = self.options.timeout_s
        try:
            # wait_for bounds the whole request; httpx's own timeout bounds each read, so a server that trickles
            # bytes could otherwise hold a request for ever.
            response = await asyncio.wait_for(client.post(url, json=body), timeout=timeout)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise _Retryable(f"no answer within {timeout:g} s") from None
        except httpx.TransportError as exc:
            raise _Retryable(f"connection error ({type(exc).__name__}: {exc})") from None
        status = response.status_code
        if status >= 400:
            detail = f"HTTP {status}: {error_text(response)}"
            if status in RETRYABLE_STATUS or status >= 500:
                raise _Retryable(detail, retry_after=retry_after_seconds(response.headers.get("retry-after")))
            raise _Fatal(detail)
        try:
            answer = response.json()
        except ValueError:
            raise _Retryable(f"HTTP {status} but the answer is not JSON: {response.text[:200]!r}") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list) or not answer["choices"]:
            raise _Fatal(f"the answer has no choices: {str(answer)[:200]}")
        return answer

    def _retry_delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter: half the doubled delay fixed, half random, so clients spread out."""
        if retry_after is not None:
            return min(retry_after, self.options.backoff_max_s)
        ceiling = min(self.options.backoff_max_s, self.options.backoff_s * 2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def continuation_logprob(answer: dict[str, Any], start: int, end: int, index: int = 0) -> float:
    """Sum the log-probabilities of the echoed tokens that end in text[start:end] (the continuation).

    `text_offset` gives each token's first character in the echoed text; tokens from `end` on were generated.
    """
    logprobs = answer["choices"][0].get("logprobs") or {}
    offsets, values = logprobs.get("text_offset"), logprobs.get("token_logprobs")
    if not offsets or not values or offsets[0] >= end:
        raise SelfAlignError(f"openai backend: item {index}: {NO_PROMPT_LOGPROBS}")
    if len(offsets) != len(values):
        raise SelfAlignError(f"openai backend: item {index}: text_offset and token_logprobs differ in length")
    total, counted = 0.0, 0
    for position, (offset, value) in enumerate(zip(offsets, values)):
        if offset >= end:
            break
        token_end = offsets[position + 1] if position + 1 < len(offsets) else end
        if token_end <= start:
            continue
        if value is None:
            raise SelfAlignError(f"openai backend: item {index}: {NO_PROMPT_LOGPROBS}")
        total += float(value)
        counted += 1
    if counted == 0:
        raise SelfAlignError(f"openai backend: item {index}: no echoed token falls in the continuation")
    return total


def create_openai_backend(config: Any) -> OpenAIBackend:
    """`backend: openai`, `model:` the served model's name, `options:` see OpenAIOptions."""
    try:
        options = OpenAIOptions.model_validate(config.options)
    except ValidationError as exc:
        raise SelfAlignError(format_validation_error(exc, "openai backend options")) from None
    if config.adapter and options.runtime_lora == "none":
        raise SelfAlignError(
            "openai backend: runtime_lora is none, so the server cannot load adapter "
            f"{config.adapter}; serve it under a name of its own (vLLM: --lora-modules NAME=PATH) and set model: NAME"
        )
    if config.load_in_4bit or config.dtype != "auto":
        raise SelfAlignError("openai backend: dtype and load_in_4bit are the server's settings, not selfalign's")
    if options.endpoint == "chat" and config.prompt_format not in ("auto", "raw"):
        raise SelfAlignError(
            f"openai backend: endpoint chat applies the server's chat template, so prompt_format must be raw "
            f"(or auto), not '{config.prompt_format}'"
        )
    api_key = None
    if options.api_key_env:
        api_key = os.environ.get(options.api_key_env)
        if not api_key:
            raise SelfAlignError(f"openai backend: the environment variable {options.api_key_env} is not set")
    backend = OpenAIBackend(config.model, options, api_key=api_key, system_prompt=config.system_prompt)
    if config.adapter:
        backend.serve_adapter(config.adapter)
    return backend
