"""A freshly trained LoRA adapter on OpenAI-compatible servers, registered at run time (`runtime_lora: vllm`).

vLLM's server started with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` and `--enable-lora` takes
`POST /v1/load_lora_adapter {"lora_name": NAME, "lora_path": PATH}` and `POST /v1/unload_lora_adapter
{"lora_name": NAME}`; a request with `"model": NAME` then answers through that adapter. The server reads the adapter
from PATH itself, so PATH must be where the server sees the folder: the local absolute path, or that path with a
prefix rewritten by `adapter_path_map` (a server in a container that mounts the runs folder elsewhere).

NAME is `selfalign-` and 16 hex digits of a hash of the adapter's weights and config: two different adapters never
share a name, and registering one that a server already has (an earlier run) is harmless. vLLM then answers 400
"... has already been loaded"; that adapter is used as it is and left loaded, since this object did not load it.
`unload` removes only what `load` loaded. The limit: two processes evaluating the same adapter on one server at the
same time share its name, and the one that loaded it unloads it when it finishes, so the other one's later requests
fail (404, final). Give such runs separate servers, or run them one after the other.

vLLM's replies (vllm/entrypoints/serve/lora/api_router.py and openai/models/serving.py):
- 200, plain text "Success: ...": loaded (or unloaded).
- 404 {"detail": "Not Found"}: no such route: runtime updating is off (the routes exist only with the variable set),
  or the server is not vLLM. llama.cpp's servers cannot load adapters at run time at all.
- 404 "Loading lora NAME failed: No adapter found for PATH": the server cannot read PATH.
- 500: the engine refused the adapter ("LoRA is not enabled." without --enable-lora, a rank above
  --max-lora-rank, unreadable weights): final, not retried, since retrying cannot change it.
- 408, 425, 429, other 5xx, connection errors and timeouts: retried with the backend's backoff, as requests are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from selfalign.backends.http import RETRYABLE_STATUS, Secret, error_text, retry_after_seconds
from selfalign.errors import SelfAlignError
from selfalign.models.adapter_files import ADAPTER_FILES, adapter_digest

if TYPE_CHECKING:
    from selfalign.backends.openai_backend import OpenAIOptions

logger = logging.getLogger(__name__)

START_VLLM_WITH = (
    "start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in its environment and --enable-lora (and --max-lora-rank "
    "at least the adapter's r)"
)


def adapter_name(folder: Path) -> str:
    """The name an adapter is served under: a hash of the files that make its output, not of its path."""
    return f"selfalign-{adapter_digest(folder)}"


def path_on_server(folder: Path, path_map: dict[str, str]) -> str:
    """`folder` as the server sees it: under the longest `path_map` key (a local folder), moved to its value."""
    roots = {Path(local).expanduser().resolve(): remote for local, remote in path_map.items()}
    for root in sorted(roots, key=lambda path: len(path.parts), reverse=True):
        if folder == root or root in folder.parents:
            return (PurePosixPath(roots[root]) / folder.relative_to(root).as_posix()).as_posix()
    return folder.as_posix()


def one_line(text: str) -> str:
    return " ".join(text.split())


class RuntimeLoRA:
    """One adapter folder, registered under its content name on every server of an openai backend."""

    def __init__(
        self, folder: str, options: OpenAIOptions, api_key: Secret, retry_delay: Callable[[int, float | None], float]
    ) -> None:
        self.folder = Path(folder).expanduser().resolve()
        for file_name in ADAPTER_FILES:
            if not (self.folder / file_name).is_file():
                raise SelfAlignError(
                    f"openai backend: adapter {folder}: no {file_name}; it must be a PEFT adapter folder saved "
                    f"with safetensors, as `selfalign train` writes"
                )
        self.name = adapter_name(self.folder)
        self.server_path = path_on_server(self.folder, options.adapter_path_map)
        self.options = options
        self._api_key = api_key
        self._retry_delay = retry_delay
        self.loaded_on: list[str] = []  # servers where `load` loaded it (not where it was loaded already)

    def load(self) -> None:
        """Register the adapter with every server; on an error, unregister what this call registered."""
        with self._client() as client:
            try:
                for base_url in self.options.base_urls:
                    if self._load_on(client, base_url):
                        self.loaded_on.append(base_url)
            except BaseException:
                self._unload_with(client)
                raise

    def unload(self) -> None:
        """Unregister from the servers where `load` registered it. One attempt each and never an exception: a name
        left registered costs the server nothing until used, and this runs while other errors may be on their way."""
        if self.loaded_on:
            with self._client() as client:
                self._unload_with(client)

    # ---- requests ---------------------------------------------------------------------------------------------

    def _client(self) -> Any:
        import httpx

        key = self._api_key.reveal()
        return httpx.Client(
            timeout=httpx.Timeout(self.options.timeout_s), headers={"Authorization": f"Bearer {key}"} if key else None
        )

    def _load_on(self, client: Any, base_url: str) -> bool:
        """True when this call loaded the adapter, False when the server had it already."""
        url = base_url + "/load_lora_adapter"
        response = self._post(client, url, {"lora_name": self.name, "lora_path": self.server_path})
        status = response.status_code
        if status < 300:
            logger.info("adapter %s registered as model '%s' on %s", self.folder, self.name, base_url)
            return True
        message = one_line(self._api_key.scrub(error_text(response)))
        if status == 400 and "already been loaded" in message:
            logger.info("adapter %s: %s already has model '%s'", self.folder, base_url, self.name)
            return False
        where = f"openai backend: adapter {self.folder}: {url}"
        if "No adapter found" in message:  # vLLM answers 404 here; matched by its message, whatever the status
            raise SelfAlignError(
                f"{where} cannot read {self.server_path} (HTTP {status}: {message}); the server must see the adapter "
                f"at that path: run it on this filesystem, or map the folder with options.adapter_path_map"
            )
        if status in (404, 405):
            raise SelfAlignError(
                f"{where} does not exist (HTTP {status}), so the server cannot load adapters at run time: "
                f"{START_VLLM_WITH}; other servers cannot: serve the adapter under a name of its own, set model: "
                f"NAME and no adapter, or options.runtime_lora: none"
            )
        if "LoRA is not enabled" in message:
            raise SelfAlignError(f"{where}: the server runs without LoRA (HTTP {status}: {message}); {START_VLLM_WITH}")
        raise SelfAlignError(f"{where} refused the adapter (HTTP {status}: {message})")

    def _unload_with(self, client: Any) -> None:
        import httpx

        for base_url in list(self.loaded_on):
            url = base_url + "/unload_lora_adapter"
            try:
                response = client.post(url, json={"lora_name": self.name})
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 300 or response.status_code == 404:  # 404: unloaded by someone else
                    self.loaded_on.remove(base_url)
                    logger.info("model '%s' unregistered from %s", self.name, base_url)
                    continue
                problem = f"HTTP {response.status_code}: {error_text(response)}"
            self.loaded_on.remove(base_url)  # one attempt only
            logger.warning(
                "could not unregister model '%s' (adapter %s) from %s: %s", self.name, self.folder, base_url,
                one_line(self._api_key.scrub(problem)),
            )  # fmt: skip

    def _post(self, client: Any, url: str, body: dict[str, Any]) -> Any:
        """POST with the backend's retries; the answer once it is not a passing fault (500 is final, see above)."""
        import httpx

        attempt = 0
        while True:
            attempt += 1
            retry_after = None
            try:
                response = client.post(url, json=body)
            except httpx.TimeoutException:
                problem = f"no answer within {self.options.timeout_s:g} s"
            except httpx.TransportError as exc:
                problem = f"connection error ({type(exc).__name__}: {exc})"
            else:
                status = response.status_code
                if status not in RETRYABLE_STATUS and status <= 500:
                    return response
                problem = f"HTTP {status}: {error_text(response)}"
                retry_after = retry_after_seconds(response.headers.get("retry-after"))
            problem = one_line(self._api_key.scrub(problem))
            if attempt > self.options.max_retries:
                raise SelfAlignError(
                    f"openai backend: adapter {self.folder}: {url} failed after {attempt} attempts; last error: "
                    f"{problem}"
                )
            delay = self._retry_delay(attempt, retry_after)
            logger.info("registering adapter: %s from %s; retry %d in %.2f s", problem, url, attempt, delay)
            time.sleep(delay)
