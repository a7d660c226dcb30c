"""Turn GGUF files into a safetensors cache that transformers reloads in seconds.

transformers de-quantizes a GGUF on every load (~40 s for the embedded model) and refuses to `save_pretrained` a
GGUF-loaded model. So we convert once: load the GGUF, copy its weights into a plain model built from the same
config, save that as safetensors into a temporary folder, and rename the folder into place. A conversion that is
interrupted leaves only a temporary folder, never a half-written cache.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from selfalign.errors import SelfAlignError
from selfalign.models.references import EMBEDDED_MODELS

logger = logging.getLogger(__name__)

CACHE_MARKER = "selfalign-source.json"


def selfalign_home() -> Path:
    """Root of selfalign's caches: $SELFALIGN_HOME, default ~/.cache/selfalign."""
    return Path(os.environ.get("SELFALIGN_HOME") or Path.home() / ".cache" / "selfalign").expanduser()


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_complete_cache(folder: Path) -> bool:
    return (folder / CACHE_MARKER).is_file() and (folder / "config.json").is_file()


def prepare_embedded_model(name: str) -> Path:
    """Return the safetensors folder of embedded model `name`, assembling and converting it on first use."""
    cache_folder = selfalign_home() / "models" / name
    if is_complete_cache(cache_folder):
        return cache_folder
    gguf_path = embedded_gguf_path(name)
    package = importlib.import_module(EMBEDDED_MODELS[name][0])
    return convert_gguf_to_safetensors(gguf_path, cache_folder, expected_sha256=package.EXPECTED_SHA256)


def embedded_gguf_path(name: str) -> Path:
    """The GGUF file of embedded model `name` (what llama.cpp serves), assembled from its PyPI package on first use."""
    package_name, _ = EMBEDDED_MODELS[name]
    package = importlib.import_module(package_name)
    gguf_path = selfalign_home() / "gguf" / package.MODEL_NAME
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    if gguf_path.exists() and sha256_of_file(gguf_path) != package.EXPECTED_SHA256:
        raise SelfAlignError(
            f"{gguf_path}: sha256 does not match the embedded model's checksum {package.EXPECTED_SHA256[:12]}...; "
            "delete the file and run `selfalign models prepare` again"
        )
    try:
        package.assemble(gguf_path)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        raise SelfAlignError(f"cannot assemble the embedded model {name} from {package_name}: {exc}") from None
    return gguf_path


def prepare_gguf_file(gguf_path: Path) -> Path:
    """Return the safetensors folder for a user's GGUF file, keyed by the file's content hash."""
    checksum = sha256_of_file(gguf_path)
    cache_folder = selfalign_home() / "models" / f"{gguf_path.stem}-{checksum[:16]}"
    if is_complete_cache(cache_folder):
        return cache_folder
    return convert_gguf_to_safetensors(gguf_path, cache_folder, expected_sha256=checksum)


def convert_gguf_to_safetensors(gguf_path: Path, cache_folder: Path, expected_sha256: str | None = None) -> Path:
    """Convert `gguf_path` into `cache_folder` (safetensors + tokenizer), atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if expected_sha256 is not None:
        actual = sha256_of_file(gguf_path)
        if actual != expected_sha256:
            raise SelfAlignError(
                f"{gguf_path}: sha256 {actual[:12]}... does not match the expected {expected_sha256[:12]}..."
            )
    logger.info("converting %s into a safetensors cache at %s (once)", gguf_path, cache_folder)
    cache_folder.parent.mkdir(parents=True, exist_ok=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many kinds on a corrupt or unsupported GGUF
        raise SelfAlignError(f"{gguf_path}: transformers cannot load this GGUF ({type(exc).__name__}: {exc})") from None
    config = copy.deepcopy(gguf_model.config)
    # The GGUF config carries a quantization_config that makes save_pretrained refuse; the weights are already
    # de-quantized to fp32, so a plain model with the same architecture takes them unchanged.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain_model.load_state_dict(gguf_model.state_dict(), strict=False)
    if missing or unexpected:
        raise SelfAlignError(
            f"{gguf_path}: converted weights do not match the architecture (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    del gguf_model

    temporary = Path(tempfile.mkdtemp(prefix=f".{cache_folder.name}.tmp-", dir=cache_folder.parent))
    try:
        plain_model.save_pretrained(temporary, safe_serialization=True)
        tokenizer.save_pretrained(temporary)
        source = {"gguf_file": str(gguf_path), "sha256": expected_sha256 or sha256_of_file(gguf_path)}
        (temporary / CACHE_MARKER).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        if cache_folder.exists():
            # A half-finished folder from an older version, or another process won the race: keep a complete one.
            if is_complete_cache(cache_folder):
                shutil.rmtree(temporary)
                return cache_folder
            shutil.rmtree(cache_folder)
        os.replace(temporary, cache_folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return cache_folder
