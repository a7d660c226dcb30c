"""One `selfalign run` per run folder: real processes contend for `<out>/.lock`."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import selfalign
from selfalign import pipeline as pipeline_module
from selfalign.pipeline import lock as lock_module
from selfalign.pipeline import run_pipeline
from selfalign.pipeline.config import RunConfig
from selfalign.pipeline.engine import Stage
from selfalign.pipeline.lock import RunFolderLocked, hold_run_folder

# a process that takes the lock, says so, and holds it until its standard input closes (or it is killed)
HOLDER = """
import sys
from pathlib import Path
from selfalign.pipeline.lock import hold_run_folder
with hold_run_folder(Path(sys.argv[1]), wait=len(sys.argv) > 2):
    print("held", flush=True)
    sys.stdin.readline()
"""
# processes that start together when a file appears and each try once; a winner holds on until its input closes,
# so that a slow starter cannot win after it
RACER = """
import sys, time
from pathlib import Path
from selfalign.pipeline.lock import RunFolderLocked, hold_run_folder
print("ready", flush=True)
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
try:
    with hold_run_folder(Path(sys.argv[1])):
        print("won", flush=True)
        sys.stdin.readline()
except RunFolderLocked:
    print("lost", flush=True)
"""


def _child_env() -> dict[str, str]:
    """The children import the selfalign under test, whatever the installed one is."""
    source = str(Path(selfalign.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}


def _start_holder(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out), *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env(),
    )  # fmt: skip


def _wait_until_held(holder: subprocess.Popen) -> None:
    assert holder.stdout.readline().strip() == "held"


def _release(holder: subprocess.Popen) -> None:
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0


@pytest.fixture
def ran(monkeypatch):
    """Two stand-in stages instead of the real ones, recording that they ran."""
    calls: list[str] = []

    def body(name: str):
        def run(inputs: dict, folder: Path) -> None:
            calls.append(name)
            (folder / "out.txt").write_text(name)

        return run

    stages = [Stage("a", "a", [], {}, body("a")), Stage("b", "b", ["a"], {}, body("b"))]
    monkeypatch.setattr(pipeline_module, "plan_stages", lambda config: stages)
    monkeypatch.setattr(pipeline_module, "preflight", lambda config, running=None: None)
    return calls


def test_a_second_run_stops_before_any_stage_naming_the_holder(tmp_path, ran):
    out = tmp_path / "run"
    holder = _start_holder(out)
    try:
        _wait_until_held(holder)
        record = json.loads((out / ".lock").read_text())
        with pytest.raises(RunFolderLocked) as error:
            run_pipeline(RunConfig(out=str(out)))
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"{out} is in use by another selfalign run: ")
        assert f"pid {holder.pid} on host {socket.gethostname()}, started {record['started']}" in message
        assert ran == [] and not (out / "a").exists()
        plan, manifest = run_pipeline(RunConfig(out=str(out)), dry_run=True)  # a dry run takes no lock
        assert manifest is None and [item.stage.name for item in plan] == ["a", "b"]
    finally:
        _release(holder)
    run_pipeline(RunConfig(out=str(out)))
    assert ran == ["a", "b"]


def test_the_run_command_prints_one_line_and_exits_2(tmp_path, ran, monkeypatch, capsys):
    from selfalign.cli.main import main

    out = tmp_path / "run"
    holder = _start_holder(out)
    try:
        _wait_until_held(holder)
        monkeypatch.setattr(sys, "argv", ["selfalign", "run", f"out={out}"])
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        _release(holder)
    error = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and ran == []
    assert error[-1].startswith(f"error: {out} is in use by another selfalign run: pid {holder.pid} on host ")
    assert error[-1].endswith("wait for it to finish, or pass --wait")


def test_processes_racing_for_one_folder_have_one_winner(tmp_path):
    out, go = tmp_path / "run", tmp_path / "go"
    command = [sys.executable, "-c", RACER, str(out), str(go)]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True, "env": _child_env()}
    racers = [subprocess.Popen(command, **pipes) for _ in range(4)]
    assert all(racer.stdout.readline().strip() == "ready" for racer in racers)
    go.touch()
    results = [racer.stdout.readline().strip() for racer in racers]  # every one has tried before any lets go
    for racer in racers:
        racer.communicate(timeout=60)
    assert sorted(results) == ["lost", "lost", "lost", "won"]


def test_wait_takes_the_folder_when_the_holder_finishes(tmp_path):
    out = tmp_path / "run"
    holder = _start_holder(out)
    _wait_until_held(holder)
    waiter = _start_holder(out, "--wait")
    # its warning, on its standard error: it found the folder held and waits
    warning = waiter.stderr.readline()
    assert f"{out} is in use by pid {holder.pid} on host" in warning and "waiting for it to finish" in warning
    _release(holder)
    _wait_until_held(waiter)
    _release(waiter)
    assert not (out / ".lock").exists()


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "run"
    holder = _start_holder(out)
    _wait_until_held(holder)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (out / ".lock").exists()  # kill -9 ran no cleanup; the OS let go of the lock
    with caplog.at_level(logging.WARNING), hold_run_folder(out) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock of pid {holder.pid} on host {socket.gethostname()}" in caplog.text
    assert not (out / ".lock").exists()


def test_a_record_with_a_dead_pid_is_stale_even_without_flock(tmp_path, monkeypatch, caplog):
    """Where the OS cannot lock, the pid decides: a dead one on this host is stale, a live one holds the folder."""
    monkeypatch.setattr(lock_module, "fcntl", None)
    out = tmp_path / "run"
    out.mkdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    record = {"pid": dead, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00", "command": "x"}
    (out / ".lock").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING), hold_run_folder(out):
        pass
    assert f"taking over the stale lock of pid {dead}" in caplog.text
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()"], stdin=subprocess.PIPE)
    try:
        (out / ".lock").write_text(json.dumps({**record, "pid": live.pid}))
        with pytest.raises(RunFolderLocked, match=f"pid {live.pid} on host"):
            with hold_run_folder(out):
                pass
        (out / ".lock").write_text(json.dumps({**record, "pid": live.pid, "host": "another-host"}))
        with pytest.raises(RunFolderLocked, match="on host another-host"):  # cannot be checked from here
            with hold_run_folder(out):
                pass
    finally:
        live.stdin.close()
        live.wait(timeout=30)


def test_the_lock_is_released_after_a_run_and_after_a_failed_or_interrupted_one(tmp_path, ran, monkeypatch):
    out = tmp_path / "run"
    run_pipeline(RunConfig(out=str(out)))
    assert not (out / ".lock").exists()
    for raised in (RuntimeError("stage broke"), KeyboardInterrupt()):

        def failing(inputs: dict, folder: Path, raised: BaseException = raised) -> None:
            raise raised

        stages = [Stage("a", "a", [], {"attempt": repr(raised)}, failing)]
        monkeypatch.setattr(pipeline_module, "plan_stages", lambda config, stages=stages: stages)
        with pytest.raises(type(raised)):
            run_pipeline(RunConfig(out=str(out)))
        assert not (out / ".lock").exists()
        with hold_run_folder(out):  # free: no other holder, no stale record
            pass
