"""A stand-in of vLLM's OpenAI server with runtime LoRA updating, as a FakeOpenAIServer handler, and adapter folders.

It follows vLLM's serving code (vllm/entrypoints/serve/lora/api_router.py, openai/models/serving.py,
vllm/lora/worker_manager.py): the load/unload routes exist only with VLLM_ALLOW_RUNTIME_LORA_UPDATING (else FastAPI's
404 {"detail": "Not Found"}); a load answers 200 with plain text, 400 when the name is loaded already, 404 when the
path holds no adapter, 500 when the engine refuses it (no --enable-lora, a rank above --max-lora-rank); a request
for a model that is neither the base nor a loaded adapter answers 404. Completions name the model that answered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.backends.http_helpers import HttpRequest, Reply, default_answer

BASE_MODEL = "served-model"


def vllm_error(message: str, kind: str, code: int) -> dict[str, Any]:
    """vLLM's ErrorResponse body."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def write_adapter(folder: Path, rank: int = 8, weights: bytes = b"weights") -> Path:
    """A PEFT adapter folder as the training stages write it (the weights file's bytes are what the name hashes)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


class VLLMRuntimeLoRA:
    """vLLM's server, as far as runtime LoRA goes; `loaded` maps each registered name to its path."""

    def __init__(self, runtime_updating: bool = True, enable_lora: bool = True, max_lora_rank: int = 16) -> None:
        self.runtime_updating = runtime_updating
        self.enable_lora = enable_lora
        self.max_lora_rank = max_lora_rank
        self.loaded: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []  # (route, lora_name) of every load and unload

    def __call__(self, request: HttpRequest, attempt: int) -> Reply:
        body = request.body
        if request.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            if not self.runtime_updating:
                return Reply(404, {"detail": "Not Found"})
            self.calls.append((request.path.rsplit("/", 1)[-1], body.get("lora_name", "")))
            return self._load(body) if request.path == "/v1/load_lora_adapter" else self._unload(body)
        model = body.get("model")
        if model != BASE_MODEL and model not in self.loaded:
            return Reply(404, vllm_error(f"The model `{model}` does not exist.", "NotFoundError", 404))
        if body.get("echo"):
            return Reply()  # scoring: default_answer's log-probabilities
        answer = default_answer(request)
        answer["choices"][0]["text"] = f" {model} answers {body['prompt'][-40:]!r}"
        return Reply(payload=answer)

    def _load(self, body: dict[str, Any]) -> Reply:
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return Reply(400, vllm_error("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400))
        if name in self.loaded and not body.get("load_inplace"):
            message = (f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
                       "set 'load_inplace' to True.")  # fmt: skip
            return Reply(400, vllm_error(message, "InvalidUserInput", 400))
        if not self.enable_lora:
            return Reply(500, vllm_error("LoRA is not enabled.", "InternalServerError", 500))
        config = Path(path) / "adapter_config.json"
        if not config.is_file():
            message = f"Loading lora {name} failed: No adapter found for {path}"
            return Reply(404, vllm_error(message, "NotFoundError", 404))
        rank = json.loads(config.read_text(encoding="utf-8"))["r"]
        if rank > self.max_lora_rank:
            message = f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}."
            return Reply(500, vllm_error(message, "InternalServerError", 500))
        self.loaded[name] = path
        return Reply(payload=f"Success: LoRA adapter '{name}' added successfully.".encode())

    def _unload(self, body: dict[str, Any]) -> Reply:
        name = body.get("lora_name")
        if name not in self.loaded:
            return Reply(404, vllm_error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404))
        del self.loaded[name]
        return Reply(payload=f"Success: LoRA adapter '{name}' removed successfully.".encode())
