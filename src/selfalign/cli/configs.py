"""`selfalign configs list|show|copy`: the config files shipped in the package, as torchtune's `tune ls`/`tune cp`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

configs_app = typer.Typer(help="List, show and copy the shipped config files.", no_args_is_help=True)

Name = Annotated[str, typer.Argument(help="A shipped config, e.g. demo or training/embedded-cpu.")]


@configs_app.command("list")
def configs_list() -> None:
    """List the shipped configs: name and what it runs, from its header comment."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from selfalign.shipped_configs import describe_shipped

    table = Table("name", "description")
    table.columns[0].no_wrap = True  # names are meant to be copied whole
    for name, description in describe_shipped():
        table.add_row(name, escape(description))  # 'selfalign[deepspeed]' is not markup
    Console().print(table)  # stdout, so that `selfalign configs list | grep ...` works


@configs_app.command("show")
def configs_show(name: Name) -> None:
    """Print a shipped config."""
    from selfalign.shipped_configs import shipped_config

    typer.echo(shipped_config(name).read_text(encoding="utf-8"), nl=False)


@configs_app.command("copy")
def configs_copy(
    name: Name,
    dest: Annotated[
        Path | None, typer.Argument(help="File or folder to write (default configs/NAME.yaml here).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Write an editable copy of a shipped config; by default to configs/NAME.yaml, where its header's commands
    expect it."""
    from selfalign.shipped_configs import copy_shipped

    target = copy_shipped(name, dest, force=force)
    typer.echo(f"wrote {target}")
