"""`selfalign preferences` (the whole data engine) and `selfalign respond|judge|revise` (one stage each)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

ConfigFile = Annotated[
    Path, typer.Option("--config", help="YAML preferences config, e.g. configs/preferences-demo.yaml.")
]
Out = Annotated[
    Path | None, typer.Option("--out", help="Output folder (default: the config's out_dir); a rerun resumes it.")
]
Overrides = Annotated[
    list[str] | None, typer.Argument(help="key=value overrides, e.g. seed=1 revision.n_attempts=3 helpful_mix=0.3.")
]


def preferences(
    config: ConfigFile,
    out: Out = None,
    overrides: Overrides = None,
    push_to_hub: Annotated[
        str | None, typer.Option("--push-to-hub", help="Also upload to this Hub dataset repo (token: HF_TOKEN).")
    ] = None,
) -> None:
    """Build preference pairs from the model itself: respond, judge, revise, helpful mix, build.

    Writes OUT/stages/*.jsonl as it goes (a stopped run resumes where it stopped) and the dataset, its card and the
    templates used to OUT/dataset.
    """
    from selfalign.preferences.config import load_preferences_config
    from selfalign.preferences.pipeline import run_preferences

    dataset = run_preferences(load_preferences_config(config, overrides), out, push_to_hub=push_to_hub)
    kept = json.loads((dataset / "funnel.json").read_text(encoding="utf-8"))["kept"]
    typer.echo(
        f"wrote {sum(kept.values())} pairs ({kept['refusal']} refusal, {kept['helpful']} helpful) to {dataset}; "
        f"funnel in {dataset / 'README.md'}"
    )


def _one_stage(stage: str, config: Path, out: Path | None, overrides: list[str] | None) -> None:
    from selfalign.preferences.config import load_preferences_config
    from selfalign.preferences.pipeline import run_stage

    path = run_stage(load_preferences_config(config, overrides), stage, out)
    rows = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()) if path.exists() else 0
    typer.echo(f"{stage}: {rows} rows in {path}")


def respond(config: ConfigFile, out: Out = None, overrides: Overrides = None) -> None:
    """Stage 1: the policy answers the config's prompt sets (OUT/stages/responses.jsonl)."""
    _one_stage("respond", config, out, overrides)


def judge(config: ConfigFile, out: Out = None, overrides: Overrides = None) -> None:
    """Stage 2: the judge labels the answers in OUT/stages/responses.jsonl (OUT/stages/judgments.jsonl)."""
    _one_stage("judge", config, out, overrides)


def revise(config: ConfigFile, out: Out = None, overrides: Overrides = None) -> None:
    """Stage 3: the model revises the red-team answers judged harmful, each revision judged again
    (OUT/stages/revisions.jsonl)."""
    _one_stage("revise", config, out, overrides)


def register(app: typer.Typer) -> None:
    for command in (preferences, respond, judge, revise):
        app.command(command.__name__)(command)
