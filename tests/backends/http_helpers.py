"""Test helpers for HTTP backends: a fake OpenAI-compatible server and a fault-injecting proxy, both on 127.0.0.1.

Both are small asyncio servers speaking just enough HTTP/1.1 (one request per connection, `Connection: close`),
run on an event loop in a background thread so that the backend under test can run its own loop in the test's
thread. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

HOST = "127.0.0.1"
READ_LIMIT_S = 30.0


class BackgroundLoop:
    """An asyncio loop on a daemon thread; `call` runs a coroutine there and waits for it (bounded)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> BackgroundLoop:
        self.thread.start()
        return self

    def call(self, coroutine: Any, timeout: float = 90.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def __exit__(self, *exc: object) -> None:
        async def cancel_the_rest() -> None:  # connections still being served (a stalled reply, say)
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.call(cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@dataclass
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]
    raw_body: bytes

    @property
    def body(self) -> dict[str, Any]:
        return json.loads(self.raw_body) if self.raw_body else {}

    @property
    def key(self) -> str:
        """What identifies the item: the prompt, or the last message of a chat request."""
        body = self.body
        if isinstance(body.get("prompt"), str):
            return body["prompt"]
        messages = body.get("messages") or [{}]
        return str(messages[-1].get("content", ""))


async def read_request(reader: asyncio.StreamReader) -> HttpRequest | None:
    """One HTTP/1.1 request with a Content-Length body, or None when the peer closed first."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_LIMIT_S)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, asyncio.TimeoutError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), READ_LIMIT_S) if length else b""
    return HttpRequest(method, path, headers, body)


def http_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> bytes:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Connection: close"]  # fmt: skip
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 5)
    except (ConnectionError, asyncio.TimeoutError):
        pass


# ---- a fake OpenAI-compatible server ------------------------------------------------------------------------


@dataclass
class Reply:
    """What the fake server does with one request: answer (after `delay`), or drop the connection."""

    status: int = 200
    payload: Any = None  # None: the default answer for the request
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False


def default_answer(request: HttpRequest) -> dict[str, Any]:
    """A completion that says what it was asked, with usage; for echo+logprobs, one token per character."""
    body = request.body
    if "messages" in body:
        content = "chat:" + " | ".join(f"{m['role']}={m['content']}" for m in body["messages"])
        return {"choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2}}  # fmt: skip
    prompt = body["prompt"]
    if body.get("echo"):
        text = prompt + "!"
        # one token per character, log-probability -(position / 100); the first has none; "!" is generated
        values = [None] + [-(position / 100) for position in range(1, len(text))]
        logprobs = {"tokens": list(text), "token_logprobs": values, "text_offset": list(range(len(text)))}
        return {"choices": [{"text": text, "logprobs": logprobs, "finish_reason": "length"}]}
    return {"choices": [{"text": f" echo:{prompt}", "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 2}}  # fmt: skip


class FakeOpenAIServer:
    """Answers /v1/completions and /v1/chat/completions; `handler(request, attempt)` may change the reply.

    `attempt` counts the requests seen for the same item (1 for the first). Records every request and the most
    requests it had in flight at once.
    """

    def __init__(self, handler: Callable[[HttpRequest, int], Reply] | None = None) -> None:
        self.handler = handler or (lambda request, attempt: Reply())
        self.requests: list[HttpRequest] = []
        self.attempts: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    async def start(self) -> FakeOpenAIServer:
        self.server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        if request is None:
            await close(writer)
            return
        self.requests.append(request)
        self.attempts[request.key] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            reply = self.handler(request, self.attempts[request.key])
            if reply.delay:
                await asyncio.sleep(reply.delay)
            if reply.drop:
                writer.transport.abort()
                return
            payload = default_answer(request) if reply.payload is None else reply.payload
            writer.write(http_response(reply.status, payload, reply.headers))
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):  # cancelled: the test is over
            pass
        finally:
            self.in_flight -= 1
            await close(writer)


# ---- a fault-injecting proxy --------------------------------------------------------------------------------

FAULTS = ("drop", "drop_after", "500", "429", "delay", "stall")


class FaultProxy:
    """Forwards requests to an upstream server, except where `faults(key, attempt)` names a fault:

    drop: close the connection without an answer, before the server sees the request;
    drop_after: let the server do the work, then close without passing its answer on;
    500 / 429: answer that status itself (429 with `Retry-After: 0`);
    delay: wait `delay_s`, then forward; stall: wait `stall_s` (past the client's timeout), then forward only if
    the client is still there.

    `delivered[key]` counts the successful answers passed on to the client for each item: exactly one each is
    what "every item completes exactly once" means on the wire.
    """

    def __init__(
        self,
        upstream_port: int,
        faults: Callable[[str, int], str | None],
        delay_s: float = 0.3,
        stall_s: float = 3.0,
    ) -> None:
        self.upstream_port = upstream_port
        self.faults = faults
        self.delay_s = delay_s
        self.stall_s = stall_s
        self.attempts: Counter[str] = Counter()
        self.delivered: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self.abandoned = 0
        self.active = 0  # connections being handled
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    async def settle(self, limit_s: float = 60.0) -> None:
        """Wait until every connection is handled (a stalled one included), so late answers are counted too."""
        deadline = asyncio.get_running_loop().time() + limit_s
        while self.active and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    async def start(self) -> FaultProxy:
        self.server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.active += 1
        try:
            request = await read_request(reader)
            if request is None:
                return
            key = request.key
            self.attempts[key] += 1
            fault = self.faults(key, self.attempts[key])
            if fault is not None:
                self.injected[fault] += 1
            if fault == "drop":
                writer.transport.abort()
                return
            if fault in ("500", "429"):
                headers = {"Retry-After": "0"} if fault == "429" else {}
                writer.write(http_response(int(fault), {"error": {"message": f"injected {fault}"}}, headers))
                await writer.drain()
                return
            if fault == "delay":
                await asyncio.sleep(self.delay_s)
            if fault == "stall":
                await asyncio.sleep(self.stall_s)
                if reader.at_eof():  # the client gave up (timed out) and closed the connection
                    self.abandoned += 1
                    return
            answer = await asyncio.wait_for(self._forward(request), 120)
            if fault == "drop_after":
                writer.transport.abort()
                return
            writer.write(answer)
            await writer.drain()
            if answer.startswith(b"HTTP/1.1 200"):
                self.delivered[key] += 1
        except (ConnectionError, asyncio.TimeoutError, asyncio.CancelledError):  # cancelled: the test is over
            pass
        finally:
            self.active -= 1
            await close(writer)

    async def _forward(self, request: HttpRequest) -> bytes:
        upstream_reader, upstream_writer = await asyncio.open_connection(HOST, self.upstream_port)
        headers = {name: value for name, value in request.headers.items() if name not in ("connection", "host")}
        lines = [f"{request.method} {request.path} HTTP/1.1", f"Host: {HOST}:{self.upstream_port}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        upstream_writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.raw_body)
        await upstream_writer.drain()
        answer = await upstream_reader.read()  # the upstream closes after its answer (Connection: close)
        await close(upstream_writer)
        return answer
