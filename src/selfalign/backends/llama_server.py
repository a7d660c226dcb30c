"""Start llama.cpp's OpenAI-compatible server (llama-cpp-python's `python -m llama_cpp.server`) on a local port.

The tests of the openai backend and `benchmarks/generation.py --openai` both serve the embedded GGUF this way:
127.0.0.1 only, a free port, ready when `/v1/models` answers, stopped by the process id it was started with.
`pip install "llama-cpp-python[server]"` compiles llama.cpp; on CPUs with AVX-512/AMX build it with the
`CMAKE_ARGS` in `.ci/run`, since default builds crash there.

llama-cpp-python's server answers one request at a time: every request waits on one lock around its single model
context, and it has no parallel slots (llama.cpp's C++ `llama-server --parallel N` has them). Requests sent
concurrently queue on the server; they overlap only their HTTP and tokenization work.
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from selfalign.errors import SelfAlignError

HOST = "127.0.0.1"
SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
STARTUP_LIMIT_S = 180.0
STOP_LIMIT_S = 20.0


def server_missing() -> str | None:
    """Why the server cannot start here, or None when llama-cpp-python[server] is installed."""
    missing = [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        return f"llama-cpp-python[server] is not installed ({', '.join(missing)} missing); .ci/run installs it"
    return None


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class RunningServer:
    url: str  # ends in /v1: what `base_url` takes
    port: int
    pid: int
    startup_s: float


@contextlib.contextmanager
def llama_server(
    gguf: str | Path,
    log_path: str | Path,
    extra_args: Sequence[str] = (),
    startup_limit_s: float = STARTUP_LIMIT_S,
) -> Iterator[RunningServer]:
    """Serve `gguf` on 127.0.0.1 and a free port while the block runs; the server's output goes to `log_path`.

    `extra_args` are the server's own flags, e.g. ["--n_ctx", "2048", "--logits_all", "true"].
    """
    import httpx

    log_path = Path(log_path)
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", HOST, "--port", str(port),
               *extra_args]  # fmt: skip
    with log_path.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://{HOST}:{port}/v1"
    try:
        started = time.monotonic()
        while True:
            if process.poll() is not None:
                raise SelfAlignError(f"llama.cpp server exited with {process.returncode}:\n{_log_tail(log_path)}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - started > startup_limit_s:
                raise SelfAlignError(
                    f"llama.cpp server did not answer /v1/models within {startup_limit_s:g} s:\n{_log_tail(log_path)}"
                )
            time.sleep(0.5)
        yield RunningServer(url, port, process.pid, time.monotonic() - started)
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """Stop the server this module started (by its own handle, never by name)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_LIMIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _log_tail(log_path: Path, characters: int = 3000) -> str:
    try:
        return log_path.read_text(errors="replace")[-characters:]
    except OSError:
        return "(no server log)"
