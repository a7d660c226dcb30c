"""`selfalign sweep`: one run config at every point of a grid (or list of points) and seed, in one run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from selfalign.errors import SelfAlignError


def sweep_command(
    sweep_file: Annotated[Path, typer.Argument(help="Sweep YAML, e.g. configs/sweeps/demo-dev.yaml.")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="key=value: the sweep's own keys (out, seeds, grid.KEY) or run-config settings for "
            "every run (evaluation.limit=20)."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check every point and print each run's command; run nothing.")
    ] = False,
) -> None:
    """Run the sweep file's base config at each point x seed; stages shared by points run once (one stage cache).

    Evaluates on the dev splits unless the sweep file names other sets, and writes OUT/sweep/: sweep.json,
    sweep.md (the table, Pareto set marked), tradeoff.png and, for several seeds, seeds.md. A sweep file with only
    `seeds:` runs the base config once per seed.
    """
    from selfalign.pipeline.sweep import load_sweep, plan_sweep, run_sweep

    sweep = load_sweep(sweep_file, overrides)
    if dry_run:
        for run in plan_sweep(sweep):
            typer.echo(f"{run.name}: {run.command(sweep.config)}")
        return
    result = run_sweep(sweep)
    for point in result.record["points"]:
        for run in point["runs"]:
            ran = ", ".join(name for name, stage in run.get("stages", {}).items() if stage["ran"]) or "all cached"
            typer.echo(f"{run['run']}: {ran if run['status'] == 'completed' else 'failed: ' + run['error']}")
    pareto = ", ".join(f"{item['point']} {item['variant']}" for item in result.pareto) or "none"
    typer.echo(f"Pareto set: {pareto}")
    typer.echo(f"results: {result.folder / 'sweep.md'}, sweep.json, tradeoff.png"
               + (", seeds.md" if (result.folder / "seeds.md").is_file() else ""))  # fmt: skip
    if result.failed:
        raise SelfAlignError(f"sweep: {len(result.failed)} run(s) failed ({', '.join(result.failed)}); see "
                             f"{result.folder / 'sweep.md'}; a rerun resumes them")  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep_command)
