"""Item-level resume for long loops: finished items are appended to a JSON Lines file as they complete.

A stage stopped at any moment (Ctrl-C, kill -9) and started again reads what is already there, skips those items
and continues, so no item is lost and none is done twice. A kill in the middle of a write leaves at most one
partial last line; it is cut off on open, since the item it held was not finished.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from selfalign.data.jsonl import dumps_row
from selfalign.errors import SelfAlignError


class ResumableJsonl:
    """Rows keyed by `key` (a field every row has), appended durably, read back in the order written."""

    def __init__(self, path: str | Path, key: str = "key") -> None:
        self.path = Path(path)
        self.key = key
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SelfAlignError(f"{self.path.parent}: cannot create the folder ({exc.strerror or exc})") from None
        self._rows: dict[Any, dict[str, Any]] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        complete = data if data.endswith(b"\n") or not data else data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            # the process died while writing this line: drop it so the item is done again
            with self.path.open("r+b") as handle:
                handle.truncate(len(complete))
        try:
            text = complete.decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            raise SelfAlignError(f"{self.path}: damaged progress file (not UTF-8 text); delete it to redo") from None
        for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): rows may hold U+2028
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SelfAlignError(
                    f"{self.path}:{number}: damaged progress file ({exc.msg}); delete it to redo"
                ) from None
            if not isinstance(row, dict) or not isinstance(row.get(self.key), (str, int)):
                raise SelfAlignError(f"{self.path}:{number}: progress row without '{self.key}'; delete it to redo")
            self._rows[row[self.key]] = row

    def __contains__(self, key: Any) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: Any) -> dict[str, Any] | None:
        return self._rows.get(key)

    def rows(self) -> Iterator[dict[str, Any]]:
        return iter(self._rows.values())

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Write finished rows and make them durable before returning; rows already present are refused."""
        rows = list(rows)
        for row in rows:
            if row[self.key] in self._rows:
                raise SelfAlignError(f"{self.path}: item {row[self.key]!r} was already done")
        if not rows:
            return
        text = "".join(dumps_row(row) + "\n" for row in rows)
        try:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise SelfAlignError(
                f"{self.path}: cannot write progress ({exc.strerror}); {len(self)} finished items are kept"
            ) from None
        for row in rows:
            self._rows[row[self.key]] = row


def process_resumably(
    items: list[dict[str, Any]],
    store: ResumableJsonl,
    work: Any,  # Callable[[list[dict]], list[dict]]: finished rows for a chunk of items, each with store.key
    chunk_size: int = 32,
) -> list[dict[str, Any]]:
    """Run `work` on the items not yet in `store`, a chunk at a time, saving each chunk as soon as it is done.

    Chunks are fixed by position in `items`, not by what is left to do, so that a resumed run batches every item
    with the same neighbours as an uninterrupted one (a batched model's output can depend on its batch through
    padding). Returns the finished row of every item, in the order of `items`.
    """
    for start in range(0, len(items), chunk_size):
        pending = [item for item in items[start : start + chunk_size] if item[store.key] not in store]
        if not pending:
            continue
        finished = work(pending)
        if sorted(str(row[store.key]) for row in finished) != sorted(str(item[store.key]) for item in pending):
            raise SelfAlignError(f"{store.path}: a chunk's results do not match its items")
        store.append(finished)
    return [store.get(item[store.key]) for item in items]  # type: ignore[misc]
