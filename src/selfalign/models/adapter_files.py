"""A PEFT LoRA adapter as files: which files make its output, and a digest of their content (not of their path)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from selfalign.errors import SelfAlignError
from selfalign.models.gguf_cache import sha256_of_file

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what PEFT's save_pretrained writes


def adapter_digest(folder: str | Path) -> str:
    """16 hex digits over the SHA-256 of each adapter file: equal for copies of one adapter, different after a
    retraining that wrote to the same folder."""
    digest = hashlib.sha256()
    for file_name in ADAPTER_FILES:
        path = Path(folder) / file_name
        if not path.is_file():
            raise SelfAlignError(f"{folder}: not a PEFT adapter folder ({file_name} is missing)")
        digest.update(f"{file_name}:{sha256_of_file(path)}\n".encode())
    return digest.hexdigest()[:16]
