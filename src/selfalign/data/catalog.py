"""What `selfalign data list` shows about the built-in sets."""

from __future__ import annotations

from importlib import resources

from selfalign.data.jsonl import read_jsonl
from selfalign.data.loading import builtin_sets


def describe_builtin_sets() -> list[dict[str, str]]:
    entries = []
    folder = resources.files("selfalign.data").joinpath("builtin")
    for name, builtin in builtin_sets().items():
        counts = []
        for split, file_name in builtin.splits.items():
            with resources.as_file(folder.joinpath(file_name)) as path:
                counts.append(f"{split} {len(read_jsonl(path))}")
        entries.append(
            {
                "reference": f"builtin:{name}",
                "rows": ", ".join(counts),
                "columns": ", ".join(builtin.columns),
                "description": builtin.description,
            }
        )
    return entries
