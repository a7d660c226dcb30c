"""JSON Lines files: strict reading with line numbers in every error, atomic writing, and appends for resuming."""

from __future__ import annotations

import glob
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from selfalign.errors import SelfAlignError


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; any problem names the file and the line."""
    path = Path(path)
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise SelfAlignError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise SelfAlignError(f"{path}: is a folder, expected a .jsonl file") from None
    except OSError as exc:
        raise SelfAlignError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SelfAlignError(f"{path}:{number}: not valid UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SelfAlignError(f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise SelfAlignError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [row for _, row in iter_jsonl(path)]


def dumps_row(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False)


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write all rows to a temporary file beside `path`, then rename it over `path`: readers never see half."""
    write_text_atomic(path, "".join(dumps_row(row) + "\n" for row in rows))


def is_atomic_write_leftover(name: str) -> bool:
    """A temporary file of `write_text_atomic` (".NAME.RANDOM.tmp"), left behind by a process killed mid-write."""
    return name.startswith(".") and name.endswith(".tmp")


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    # A process killed (kill -9) between writing and renaming leaves its temporary file behind; the rerun that
    # writes the same file removes it, so a resumed stage's folder equals an uninterrupted one.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            stale.unlink(missing_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # a read-only or full disk: say which file, not a traceback
        raise _cannot_write(path, exc) from None
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as exc:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _cannot_write(path, exc) from None
        raise


def _cannot_write(path: Path, exc: OSError) -> SelfAlignError:
    return SelfAlignError(f"{path}: cannot write ({exc.strerror or exc}); files written before are kept")
