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


def _training_lines(name: str, folder: Path) -> list[str]:
    metrics = _read_json(folder / "training" / "metrics.json")
    if metrics is None:
        return [f"- {name}: no metrics.json"]
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    keys = [k for k in shown if any(w in k for w in ("loss", "accuracies", "margins", "steps", "runtime"))][:10]
    return [f"- {name}: " + ", ".join(f"{k} {shown[k]:.4g}" for k in keys)]


def write_run_report(stage_folders: dict[str, Path], folder: Path) -> None:
    from selfalign.reporting.report import HEADERS, summary_rows

    lines = ["# selfalign run report", ""]
    evaluation = next((p for n, p in stage_folders.items() if n == "evaluate"), None)
    metrics = _read_json(evaluation / "metrics.json") if evaluation else None
    if metrics:
        lines += [
            "## Harmlessness, over-refusal and helpfulness",
            "",
            f"Judge: `{metrics['judge']}`; 95% bootstrap intervals; judge abstentions counted apart. "
            f"Full evaluation: `{evaluation / 'report.md'}` and `report.html` beside this file.",
            "",
            "| " + " | ".join(HEADERS) + " |",
            "|" + "---|" * len(HEADERS),
            *("| " + " | ".join(row) + " |" for row in summary_rows(metrics)),
            "",
        ]
    if "tune-judge" in stage_folders:
        table = (stage_folders["tune-judge"] / "results.md").read_text(encoding="utf-8")
        lines += ["## Judge tuning", "", table.split("\n", 1)[1].strip(), ""]
    for name, path in stage_folders.items():
        if name.startswith("preferences"):
            funnel = _read_json(path / "dataset" / "funnel.json")
            lines += [f"## Preference data ({name})", ""]
            if funnel:
                lines += ["```json", json.dumps(funnel, indent=2), "```", ""]
            lines.append(f"Dataset card: `{path / 'dataset' / 'README.md'}`")
            lines.append("")
    training = [(n, p) for n, p in stage_folders.items() if n.startswith(("sft", "dpo"))]
    if training:
        lines += ["## Training", ""]
        for name, path in training:
            lines += _training_lines(name, path)
        lines.append("")
    write_text_atomic(folder / "report.md", "\n".join(lines) + "\n")
    if evaluation and (evaluation / "report.html").is_file():
        shutil.copyfile(evaluation / "report.html", folder / "report.html")
