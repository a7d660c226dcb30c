"""`selfalign push`: upload a run's trained adapters to the Hugging Face Hub with model cards (selfalign.push)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def push_command(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (with run.json) or one adapter folder.")],
    repo: Annotated[str, typer.Option("--repo", help="Hub model repo ORG/NAME.")],
    variant: Annotated[
        str | None, typer.Option("--variant", help="Push only this adapter (sft, dpo, ...), to --repo itself.")
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
) -> None:
    """Upload trained LoRA adapters with a model card of the run's measured numbers (token: HF_TOKEN).

    One adapter (or --variant) goes to --repo; a run with several pushes each to REPO-VARIANT, e.g. me/x-sft and
    me/x-dpo. Nothing is uploaded unless every adapter, repo id and the token check out first.
    """
    from selfalign.push import push

    for name, url in push(run_dir, repo, variant=variant, private=private):
        typer.echo(f"pushed {name} to {url}")


def register(app: typer.Typer) -> None:
    app.command("push")(push_command)
