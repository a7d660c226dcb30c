"""One function from a data reference to a validated `datasets.Dataset`.

References:
- `builtin:NAME[:split]` — a set shipped with selfalign (`selfalign data list`); `builtin:redteam-test` is the same
  as `builtin:redteam:test`;
- a local `.jsonl`, `.json`, `.csv` or `.parquet` file;
- `hf:ORG/NAME[:split]` (or `hf:/a/local/dataset/folder[:split]`) through `datasets.load_dataset`.
A column mapping renames source columns to the names a stage asks for (`{"prompt": "init_prompt"}`).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from selfalign.data.jsonl import read_jsonl
from selfalign.errors import SelfAlignError

logger = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ACCEPTED_REFERENCES = (
    "builtin:NAME[:split] (see `selfalign data list`), a .jsonl/.json/.csv/.parquet file, "
    "or hf:ORG/NAME[:split] for a Hugging Face dataset"
)
_PLAIN_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")


@dataclass(frozen=True)
class BuiltinSet:
    name: str
    description: str
    datasheet: str
    splits: dict[str, str]  # split name -> file name in selfalign/data/builtin
    columns: list[str]
    label_column: str = ""  # the column whose values each have at least 10 rows in every split
    values: dict[str, str] = field(default_factory=dict)  # label_column value -> what it means


@functools.cache
def builtin_sets() -> dict[str, BuiltinSet]:
    catalog = yaml.safe_load(_builtin_folder().joinpath("catalog.yaml").read_text(encoding="utf-8"))
    return {name: BuiltinSet(name=name, **spec) for name, spec in catalog.items()}


def _builtin_folder() -> Any:
    return resources.files("selfalign.data").joinpath("builtin")


def parse_builtin_name(text: str) -> tuple[BuiltinSet, list[str]]:
    """`redteam:test` or `redteam-test` -> (the redteam set, ['test']); `redteam` -> all its splits."""
    sets = builtin_sets()
    name, _, split = text.partition(":")
    if name not in sets:
        base, _, suffix = name.rpartition("-")
        if base in sets and suffix in sets[base].splits and not split:
            name, split = base, suffix
        else:
            raise SelfAlignError(f"unknown builtin data set '{text}'; available: {', '.join(sorted(sets))}")
    builtin = sets[name]
    if split and split not in builtin.splits:
        raise SelfAlignError(f"builtin:{name} has no split '{split}'; splits: {', '.join(builtin.splits)}")
    return builtin, [split] if split else list(builtin.splits)


def read_reference_rows(reference: str) -> list[dict[str, Any]]:
    """Every row of a reference as dicts, before column selection and cleaning."""
    if reference.startswith("builtin:"):
        builtin, splits = parse_builtin_name(reference.removeprefix("builtin:"))
        rows = []
        for split in splits:
            with resources.as_file(_builtin_folder().joinpath(builtin.splits[split])) as path:
                rows.extend({**row, "split": split} for row in read_jsonl(path))
        return rows
    if reference.startswith("hf:"):
        return _read_hub_rows(reference.removeprefix("hf:"))
    path = Path(reference).expanduser()
    if path.suffix.lower() in FILE_SUFFIXES:
        return _read_file_rows(path)
    raise SelfAlignError(f"cannot read data reference '{reference}'; accepted: {ACCEPTED_REFERENCES}")


def _read_file_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if not path.is_file():
        raise SelfAlignError(f"{path}: file not found")
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise SelfAlignError(f"{path}: not valid UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise SelfAlignError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise SelfAlignError(f'{path}: expected a JSON list of objects (or {{"data": [...]}})')
        return data
    if suffix == ".csv":
        import csv

        try:
            with path.open(encoding="utf-8", newline="") as handle:
                return _integer_columns([dict(row) for row in csv.DictReader(handle)])
        except UnicodeDecodeError:
            raise SelfAlignError(f"{path}: not valid UTF-8 text") from None
        except csv.Error as exc:
            raise SelfAlignError(f"{path}: malformed CSV ({exc})") from None
    import pyarrow.parquet as parquet

    try:
        return parquet.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... on a damaged file
        raise SelfAlignError(f"{path}: cannot read as Parquet ({exc})") from None


def _integer_columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CSV cells are text: a column whose every cell is a plain integer ("0", "1", "-2") becomes int, so 0/1 labels
    in a CSV file read as the numbers they are in a JSON one."""
    for column in {key for row in rows for key in row if key is not None}:
        cells = [row.get(column) for row in rows]
        if all(isinstance(cell, str) and _PLAIN_INTEGER.fullmatch(cell) for cell in cells):
            for row in rows:
                row[column] = int(row[column])
    return rows


def _read_hub_rows(name: str) -> list[dict[str, Any]]:
    import datasets

    path_or_id, _, split = name.partition(":")
    split = split or "train"
    try:
        dataset = datasets.load_dataset(path_or_id, split=split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise SelfAlignError(f"hf:{path_or_id} has no split '{split}' ({exc})") from None
        raise SelfAlignError(f"cannot load hf:{path_or_id}: {exc}") from None
    except Exception as exc:  # offline hub, missing repo, network errors arrive as many types
        hint = " (HF_HUB_OFFLINE is set, so only local or cached data sets load)" if _offline() else ""
        raise SelfAlignError(f"cannot load hf:{path_or_id}{hint}: {_first_line(exc)}") from None
    return dataset.to_list()


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def load_rows(
    reference: str,
    columns: list[str],
    column_map: dict[str, str] | None = None,
    keep_other_columns: bool = True,
    clean: bool = True,
) -> Any:
    """Load `reference` as a `datasets.Dataset` that has `columns` (after renaming by `column_map`).

    With `clean`, rows whose `prompt` is empty or whitespace are dropped and exact duplicates (on `columns`)
    removed, each with a count in the log; without it every row is kept, in order.
    """
    import datasets

    rows = read_reference_rows(reference)
    column_map = column_map or {}
    if not rows:
        raise SelfAlignError(f"{reference}: no rows")
    present = sorted({key for row in rows for key in row})
    renamed = []
    for number, row in enumerate(rows, start=1):
        out = dict(row) if keep_other_columns else {}
        for wanted in columns:
            source = column_map.get(wanted, wanted)
            if source not in row:
                if any(source in r for r in rows):
                    raise SelfAlignError(f"{reference}: row {number} has no '{source}' field")
                raise SelfAlignError(
                    f"{reference}: no column '{source}'"
                    + (f" (for '{wanted}')" if source != wanted else "")
                    + f"; columns present: {', '.join(present)}"
                )
            if source != wanted:
                out.pop(source, None)
            out[wanted] = row[source]
        renamed.append(out)
    cleaned = _drop_empty_and_duplicates(renamed, columns, reference) if clean else renamed
    if not cleaned:
        raise SelfAlignError(f"{reference}: no usable rows left (all empty or duplicates)")
    try:
        return datasets.Dataset.from_list(cleaned)
    except Exception as exc:  # pyarrow cannot build a column whose rows disagree on type
        raise SelfAlignError(f"{reference}: rows disagree on a column's type ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _drop_empty_and_duplicates(rows: list[dict[str, Any]], columns: list[str], reference: str) -> list[dict]:
    kept, seen, empty, duplicates = [], set(), 0, 0
    for row in rows:
        if "prompt" in columns and not str(row["prompt"] or "").strip():
            empty += 1
            continue
        key = json.dumps([row[c] for c in columns], ensure_ascii=False, default=str)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        kept.append(row)
    if empty or duplicates:
        logger.warning("%s: dropped %d empty prompts and %d exact duplicates", reference, empty, duplicates)
    return kept


def validate_rows(reference: str, columns: list[str]) -> str:
    """Check a data reference for the CLI: it parses, has `columns`, labels (if asked for) are 0/1."""
    dataset = load_rows(reference, columns, clean=False)
    if "label" in columns:
        for number, label in enumerate(dataset["label"], start=1):
            if label not in (0, 1) or isinstance(label, bool):
                raise SelfAlignError(f"{reference}: row {number}: label must be 0 or 1, got {label!r}")
    return f"{reference}: {len(dataset)} rows, columns: {', '.join(dataset.column_names)}"
