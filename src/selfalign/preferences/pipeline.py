"""The preference-data engine, wired: respond -> judge -> revise -> helpful mix -> build.

Each stage appends its finished items to its own file under OUT/stages as it goes, so a run stopped at any moment
and started again continues where it stopped; the dataset lands in OUT/dataset. OUT/preferences.json records what ran.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from selfalign import __version__
from selfalign.data.jsonl import write_text_atomic
from selfalign.hub import hub_token
from selfalign.preferences import build, helpful, judge_stage, respond, revise
from selfalign.preferences.card import judge_accuracy
from selfalign.preferences.config import PreferencesConfig
from selfalign.preferences.stage_files import JUDGMENTS, RESPONSES, Models, stage_path
from selfalign.preferences.templates import load_refusal_template

RUN_RECORD = "preferences.json"
# What a run folder holds besides its dataset: the stages' resumable files and the record of timings. `selfalign run`
# leaves them out of the preferences stage's output hash: a resumed run that ends with the same dataset is the same.
WORKING_FILES = ("stages/*", "*/stages/*", RUN_RECORD)


class RunRecord:
    """OUT/preferences.json: version, resolved config, per-stage seconds and the run's status, rewritten after each
    stage (`selfalign run`'s own record of a whole run is its run.json)."""

    def __init__(self, out: Path, config: PreferencesConfig) -> None:
        self.path = out / RUN_RECORD
        self.data: dict[str, Any] = {
            "selfalign": __version__,
            "python": platform.python_version(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "status": "running",
            "seed": config.seed,
            "stages": {},
            "config": config.model_dump(mode="json"),
        }

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        self.data["status"] = f"running {name}"
        self.write()
        try:
            yield
        except BaseException as exc:
            self.data["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            self.data["error"] = f"{name}: {type(exc).__name__}: {exc}".splitlines()[0]
            raise
        finally:
            self.data["stages"][name] = {"seconds": round(time.perf_counter() - started, 2)}
            self.write()

    def finish(self, **extra: Any) -> None:
        self.data.update(status="completed", **extra)
        self.write()

    def write(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=2) + "\n")


def prepare_out(config: PreferencesConfig, out_dir: str | Path | None) -> Path:
    """The output folder, with the resolved config written into it (no secret is ever part of a config)."""
    out = Path(out_dir or config.out_dir)
    header = "# The resolved config of this run: `selfalign preferences --config THIS_FILE` repeats it.\n"
    resolved = config.model_copy(update={"out_dir": str(out)}).model_dump(mode="json")
    write_text_atomic(out / "config.yaml", header + yaml.safe_dump(resolved, sort_keys=False))
    return out


def check_files(config: PreferencesConfig) -> None:
    """Templates, constitution and judge results are read now: a bad file fails before an hour of generation."""
    revise.strategy_files(config)
    load_refusal_template(config.refusal_template)
    judge_accuracy(config)


def run_preferences(
    config: PreferencesConfig,
    out_dir: str | Path | None = None,
    models: Models | None = None,
    push_to_hub: str | None = None,
) -> Path:
    """Run (or resume) every stage; returns the dataset folder. `models` lets tests pass a scripted policy."""
    check_files(config)
    if push_to_hub:
        hub_token()  # a missing token fails before the run, not after it
    out = prepare_out(config, out_dir)
    stages = out / "stages"
    owned, models = models is None, models or Models(config)
    record = RunRecord(out, config)
    try:
        with record.stage("respond"):
            responses = respond.run(config, respond.load_prompt_items(config), stages, models)
        with record.stage("judge"):
            judgments = judge_stage.run(config, responses, stages, models)
        with record.stage("revise"):
            revise.run(config, judgments, stages, models)
        with record.stage("helpful"):
            helpful.run(config, judgments, stages, models)
        with record.stage("build"):
            dataset = build.run(config, stages, out / "dataset")
        if push_to_hub:
            with record.stage("push_to_hub"):
                record.data["pushed_to"] = build.push_to_hub(dataset, push_to_hub)
        record.finish(pairs_kept=json.loads((dataset / "funnel.json").read_text(encoding="utf-8"))["kept"])
        return dataset
    finally:
        if owned:
            models.close()  # what it loaded: a server's registered adapter, a vLLM engine


def run_stage(config: PreferencesConfig, stage: str, out_dir: str | Path | None = None, models: Models | None = None
              ) -> Path:  # fmt: skip
    """One of respond, judge, revise on its own, reading the previous stage's file from OUT/stages."""
    check_files(config)
    stages = prepare_out(config, out_dir) / "stages"
    owned, models = models is None, models or Models(config)
    try:
        if stage == "respond":
            return respond.run(config, respond.load_prompt_items(config), stages, models)
        if stage == "judge":
            return judge_stage.run(config, stage_path(stages, RESPONSES), stages, models)
        if stage == "revise":
            return revise.run(config, stage_path(stages, JUDGMENTS), stages, models)
        raise ValueError(f"unknown stage {stage!r}")
    finally:
        if owned:
            models.close()
