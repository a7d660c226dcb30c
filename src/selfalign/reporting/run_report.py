"""The report of a whole `selfalign run`: the judge it chose, the data it made, what training did, the trade-off."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from selfalign.data.jsonl import write_text_atomic


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


TRAINING_COLUMNS = (  # (section of metrics.json, key, column): training/common.py writes the sections
    ("train", "steps", "steps"), ("train", "loss", "train loss"), ("train", "runtime_s", "seconds"),
    ("eval_before", "eval_loss", "eval loss before"), ("eval_after", "eval_loss", "eval loss after"),
    ("eval_before", "eval_rewards/accuracies", "reward accuracy before"),
    ("eval_after", "eval_rewards/accuracies", "reward accuracy after"),
    ("eval_before", "eval_rewards/margins", "reward margin before"),
    ("eval_after", "eval_rewards/margins", "reward margin after"),
)  # fmt: skip


def _training_table(stages: list[tuple[str, Path]]) -> list[str]:
    """One row per training stage: losses, and for DPO the held-out reward accuracy and margin before and after."""
    rows = {name: _read_json(path / "training" / "metrics.json") for name, path in stages}
    columns = [
        (section, key, label) for section, key, label in TRAINING_COLUMNS
        if any(isinstance((m or {}).get(section) or {}, dict) and key in ((m or {}).get(section) or {})
               for m in rows.values())
    ]  # fmt: skip
    lines = ["| stage | " + " | ".join(label for _, _, label in columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, metrics in rows.items():
        if metrics is None:
            lines.append(f"| {name} | " + " | ".join("no metrics.json" for _ in columns) + " |")
            continue
        cells = []
        for section, key, _ in columns:
            value = (metrics.get(section) or {}).get(key)
            cells.append("n/a" if not isinstance(value, (int, float)) else f"{value:.4g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def write_run_report(stage_folders: dict[str, Path], folder: Path) -> None:
    from selfalign.preferences.card import funnel_table
    from selfalign.reporting.report import (
        HEADERS,
        difference_lines,
        difficulty_lines,
        helpfulness_lines,
        quality_lines,
        refusal_class_lines,
        summary_rows,
    )

    lines = ["# selfalign run report", ""]
    evaluation = next((p for n, p in stage_folders.items() if n == "evaluate"), None)
    metrics = _read_json(evaluation / "metrics.json") if evaluation else None
    if metrics:
        lines += [
            "## Harmlessness, over-refusal and helpfulness",
            "",
            f"Judge: `{metrics['judge']}`; 95% Wilson intervals; judge abstentions counted apart. "
            f"Full evaluation: `{evaluation / 'report.md'}` and `report.html` beside this file.",
            "",
            "| " + " | ".join(HEADERS) + " |",
            "|" + "---|" * len(HEADERS),
            *("| " + " | ".join(row) + " |" for row in summary_rows(metrics)),
            "",
            *difference_lines(metrics),
            "",
            *quality_lines(metrics),  # the answers of every variant: loops, empty, token-limit hits, length
            *helpfulness_lines(metrics),
            *refusal_class_lines(metrics),
            *difficulty_lines(metrics),
        ]
    if "tune-judge" in stage_folders:
        table = (stage_folders["tune-judge"] / "results.md").read_text(encoding="utf-8")
        lines += ["## Judge tuning", "", table.split("\n", 1)[1].strip(), ""]
    for name, path in stage_folders.items():
        if name.startswith("preferences"):
            funnel = _read_json(path / "dataset" / "funnel.json")
            lines += [f"## Preference data ({name})", ""]
            if funnel:
                lines += [*funnel_table(funnel), ""]
            lines.append(f"Dataset card: `{path / 'dataset' / 'README.md'}`")
            lines.append("")
    training = [(n, p) for n, p in stage_folders.items() if n.startswith(("sft", "dpo"))]
    if training:
        lines += ["## Training", "", *_training_table(training), ""]
    write_text_atomic(folder / "report.md", "\n".join(lines) + "\n")
    if evaluation and (evaluation / "report.html").is_file():
        shutil.copyfile(evaluation / "report.html", folder / "report.html")
