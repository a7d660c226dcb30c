"""Run the `selfalign` command in the test process, as a user would from a shell."""

from __future__ import annotations

import io
import sys

import pytest

from selfalign.cli.main import main


def run_cli(monkeypatch, capsys, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `selfalign ARGS...`, with `stdin` as standard input when given."""
    monkeypatch.setattr(sys, "argv", ["selfalign", *args])
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err
