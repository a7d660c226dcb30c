"""A PEFT LoRA adapter as files: which files make its output, and a digest of their content (not of their path)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from selfalign.errors import SelfAlignError
from selfalign.models.gguf_cache import sha256_of_file

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what PEFT's save_pretrained writes
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # .bin: older PEFT, safe_serialization off


def adapter_digest(folder: str | Path) -> str:
    """16 hex digits over the SHA-256 of the adapter's config and weights (safetensors, or the pickle `.bin` of older
    PEFT): equal for copies of one adapter, different after a retraining that wrote to the same folder."""
    folder = Path(folder)
    weights = next((name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None or not (folder / ADAPTER_FILES[0]).is_file():
        missing = ADAPTER_FILES[0] if weights is not None else " or ".join(WEIGHT_FILES)
        raise SelfAlignError(f"{folder}: not a PEFT adapter folder ({missing} is missing)")
    digest = hashlib.sha256()
    for file_name in (ADAPTER_FILES[0], weights):
        digest.update(f"{file_name}:{sha256_of_file(folder / file_name)}\n".encode())
    return digest.hexdigest()[:16]
