"""Whether earlier work answers the current settings: one JSON form of a stage's settings, its key, what changed.

`selfalign run` names each stage's folder by the key of its settings and inputs, so that changed settings get a new
folder and the old one stays cached (pipeline/engine.py). The preference sub-stages resume files inside one folder
item by item: each keeps its settings beside its rows and refuses to add to rows made with other ones
(preferences/stage_files.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from selfalign.data.jsonl import write_text_atomic
from selfalign.errors import SelfAlignError


def settings_json(settings: Any, indent: int | None = None) -> str:
    """Settings as JSON with sorted keys; a value JSON has no type for (a path, a date) is written as its text."""
    return json.dumps(settings, indent=indent, sort_keys=True, default=str)


def settings_key(settings: Any) -> str:
    """16 hex digits of the SHA-256 of the settings' JSON: what names a stage's folder."""
    return hashlib.sha256(settings_json(settings).encode()).hexdigest()[:16]


def changed_settings(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The top-level settings whose values differ, compared as JSON (so a tuple equals the list it is written as)."""
    stored, current = json.loads(settings_json(stored)), json.loads(settings_json(current))
    return sorted(key for key in stored.keys() | current.keys() if stored.get(key) != current.get(key))


def check_settings(output: Path, settings: dict[str, Any], record: Path, remedy: str) -> None:
    """Refuse to add to `output` when `record` says it was made with other settings, naming those that changed.
    Otherwise `record` is (re)written with `settings`: where `output` does not exist yet, and where it exists with no
    record (a file from before records were kept), which then adopts the current settings unchecked."""
    if output.exists() and record.exists():
        changed = changed_settings(json.loads(record.read_text(encoding="utf-8")), settings)
        if changed:
            raise SelfAlignError(f"{output} was made with other settings (changed: {', '.join(changed)}); {remedy}")
    else:
        write_text_atomic(record, settings_json(settings, indent=2) + "\n")
