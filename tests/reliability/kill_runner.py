"""The child side of the kill -9 trials: `selfalign` run through its real CLI entry point, killing itself with
SIGKILL at the n-th "event" of one stage.

Events are the points where a stage does work that a kill can interrupt: a model call, an append of finished rows
(optionally torn: half the bytes written, then the kill), an atomic file replace, a file copy, a training step, a
checkpoint save and the middle of one (after the weights and optimizer, before the trainer state). The child counts
the events of every stage and writes the counts to a file when it exits normally, so the uninterrupted reference
run tells the trials how many kill points each stage has.

Children are forked from a forkserver that has already imported torch, transformers and TRL: a fresh interpreter
spends ~10 s importing them, which 24 trials x 2 runs cannot afford on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path

PRELOAD = [
    "tests.reliability.kill_runner",
    "selfalign.cli.main",
    "selfalign.pipeline.stages",
    "selfalign.preferences.pipeline",
    "selfalign.judging.tuning",
    "selfalign.evaluation.run",
    "selfalign.reporting.report",
    "selfalign.training.sft",
    "selfalign.training.dpo",
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
]


class KillSwitch:
    def __init__(self, stage: str | None, kill_at: int | None, torn: bool) -> None:
        self.stage, self.kill_at, self.torn = stage, kill_at, torn
        self.current: str | None = None  # the kind of the stage executing (it stays set after, for the manifest)
        self.counts: Counter[str] = Counter()

    def tick(self) -> bool:
        """Count an event; True when it is the one to kill at (the caller decides how to die)."""
        if self.current is None:
            return False
        self.counts[self.current] += 1
        return self.current == self.stage and self.counts[self.current] == self.kill_at

    def check(self) -> None:
        if self.tick():
            die()


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(switch: KillSwitch) -> None:
    """Wrap the event points; each wrapper counts, maybe kills, then does the real work."""
    import shutil

    import transformers

    from selfalign.backends.scripted import ScriptedBackend
    from selfalign.data.jsonl import dumps_row
    from selfalign.data.resumable import ResumableJsonl
    from selfalign.pipeline import engine

    def wrap(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            switch.check()
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    execute = engine.execute

    def execute_stage(stage, *args, **kwargs):
        switch.current = stage.kind
        return execute(stage, *args, **kwargs)

    engine.execute = execute_stage

    for owner, name in [
        (ScriptedBackend, "generate"),
        (ScriptedBackend, "score"),
        (os, "replace"),
        (shutil, "copyfile"),
        (transformers.Trainer, "training_step"),
        (transformers.Trainer, "_save_checkpoint"),
        (transformers.Trainer, "_save_rng_state"),
    ]:
        wrap(owner, name)

    append = ResumableJsonl.append

    def append_or_die(self, rows):
        rows = list(rows)
        if switch.tick():
            if switch.torn and rows:
                # killed in the middle of writing the chunk: a partial last line is left on disk
                text = "".join(dumps_row(row) + "\n" for row in rows).encode()
                with self.path.open("ab") as handle:
                    handle.write(text[: len(text) // 2])
                    handle.flush()
                    os.fsync(handle.fileno())
            die()
        return append(self, rows)

    ResumableJsonl.append = append_or_die


def run_selfalign(
    argv: list[str], cwd: str, log: str, env: dict[str, str], kill: tuple[str, int, bool] | None, counts: str | None
) -> None:
    """The forked child: `selfalign ARGV` in `cwd`, output to `log`, killed as `kill` = (stage, n-th event, torn)."""
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.chdir(cwd)
    os.environ.update(env)
    switch = KillSwitch(*(kill or (None, None, False)))
    install(switch)
    from selfalign.cli.main import main

    sys.argv = ["selfalign", *argv]
    try:
        main()
    finally:
        if counts is not None:
            Path(counts).write_text(json.dumps(dict(switch.counts)))
