"""Fixtures of the HTTP backend tests: stand-in OpenAI-compatible servers on 127.0.0.1, on one background loop."""

import pytest

from tests.backends.http_helpers import BackgroundLoop, FakeOpenAIServer


@pytest.fixture(scope="module")
def loop():
    with BackgroundLoop() as background:
        yield background


@pytest.fixture
def serve(loop):
    """Start stand-in servers (a handler such as VLLMRuntimeLoRA, or None for the default answers); all are stopped
    after the test."""
    started = []

    def start(handler=None) -> FakeOpenAIServer:
        server = loop.call(FakeOpenAIServer(handler).start())
        started.append(server)
        return server

    yield start
    for server in started:
        loop.call(server.stop())
