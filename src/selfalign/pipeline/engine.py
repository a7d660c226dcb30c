"""`selfalign run`: tune-judge -> preferences (respond, judge, revise, build) -> SFT -> DPO -> evaluate -> report.

The pipeline only wires stages: each returns its outputs, which the engine hands to the stages that read them (a
cached stage's are read back from its folder). Each stage's folder is named by a hash of what changes its output:
its settings and the content hashes of its inputs. A rerun skips a stage whose folder is complete (`stage.json` is
written last), reruns a stage whose folder was left unfinished (a generation stage resumes from its last finished
chunk, training from its last checkpoint, tune-judge starts again), and a changed setting gives the stages it affects
new folders while the others stay cached.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from selfalign.allocator import release_free_memory
from selfalign.data.jsonl import is_atomic_write_leftover, write_text_atomic
from selfalign.errors import SelfAlignError
from selfalign.pipeline.config import RunConfig
from selfalign.pipeline.memory import lifetime_peak_kb, measure_peak_memory
from selfalign.stage_settings import settings_key

logger = logging.getLogger(__name__)

STAGE_ORDER = ["tune-judge", "preferences", "sft", "dpo", "evaluate", "report"]
MARKER = "stage.json"


@dataclass
class Stage:
    name: str  # unique within a run, e.g. "dpo" or "dpo-round2"
    kind: str  # one of STAGE_ORDER, for --from/--only
    inputs: list[str]  # names of the stages whose outputs it reads
    settings: dict[str, Any]  # everything else that changes its output
    # (its inputs' outputs by stage name, its own folder) -> its outputs, written into its own folder
    run: Callable[[dict[str, Any], Path], Any]
    # its finished folder -> the outputs `run` returned, for the stages after a cached one; by default the folder
    read: Callable[[Path], Any] = Path
    # own folder -> tokens it generated or trained on, read from the files the body wrote (not part of the key)
    count_tokens: Callable[[Path], dict[str, Any]] | None = None
    # its working files, not outputs (fnmatch patterns of paths in its folder): left out of its output hash
    unhashed: tuple[str, ...] = ()


@dataclass
class PlannedStage:
    stage: Stage
    key: str
    folder: Path | None  # None in a dry run while an input does not exist yet: its hash, so the key, is unknown
    cached: bool
    will_run: bool
    blocked_by: list[str] = field(default_factory=list)  # inputs that neither exist nor run before it (--only)


@dataclass
class RunState:
    folders: dict[str, Path] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)  # what each stage returned, or read from its folder
    hashes: dict[str, str] = field(default_factory=dict)
    records: dict[str, dict] = field(default_factory=dict)
    plan: list[PlannedStage] = field(default_factory=list)  # as far as the run got
    failed: str | None = None  # the stage that raised, if one did


def folder_hash(folder: Path, unhashed: tuple[str, ...] = ()) -> str:
    """Content hash of a stage's outputs: every file's relative path and bytes, except the marker, the stage's own
    working files (`unhashed` patterns: checkpoints, resumable progress) and the temporary file of an atomic write
    that a kill -9 interrupted (e.g. of the marker itself)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if not path.is_file() or relative == MARKER or any(fnmatch.fnmatch(relative, p) for p in unhashed):
            continue
        if is_atomic_write_leftover(path.name):
            continue
        digest.update(relative.encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def stage_key(stage: Stage, input_hashes: dict[str, str]) -> str:
    return settings_key({"stage": stage.kind, "settings": stage.settings, "inputs": input_hashes})


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_stages(
    stages: list[Stage], out: Path, from_stage: str | None = None, only: str | None = None, dry_run: bool = False,
    state: RunState | None = None,
) -> tuple[list[PlannedStage], RunState]:  # fmt: skip
    """Run (or plan) the stages in order; returns the plan and what each stage produced. A caller that passes
    `state` keeps what finished, and which stage failed, when a stage raises."""
    kinds = [s.kind for s in stages]
    for option, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in kinds:
            raise SelfAlignError(
                f"{option} {value}: no such stage in this run; stages: {', '.join(dict.fromkeys(kinds))}"
            )
    forced = set()
    if from_stage is not None:
        start = kinds.index(from_stage)
        forced = {s.name for s in stages[start:]}
    state = state if state is not None else RunState()
    plan = state.plan
    planned_to_run: set[str] = set()  # dry run: stages that would run, so their outputs would exist after them
    for stage in stages:
        missing = [name for name in stage.inputs if name not in state.hashes]
        input_hashes = {name: state.hashes.get(name, f"pending:{name}") for name in stage.inputs}
        key = stage_key(stage, input_hashes)
        folder = out / stage.kind / f"{stage.name}-{key}"
        marker = read_marker(folder)
        cached = marker is not None and not missing
        selected = only is None or stage.kind == only
        will_run = selected and (not cached or stage.name in forced)
        if dry_run:
            # what the run would do: a stage whose input neither exists nor runs before it stops the run there
            blocked = [name for name in missing if name not in planned_to_run] if will_run else []
            plan.append(PlannedStage(stage, key, None if missing else folder, cached, will_run, blocked))
            if will_run and not blocked:
                planned_to_run.add(stage.name)
            if marker is not None and not missing:
                state.hashes[stage.name], state.folders[stage.name] = marker["output_hash"], folder
            continue
        plan.append(PlannedStage(stage, key, folder, cached, will_run))
        if not will_run:
            if marker is not None:
                state.folders[stage.name], state.hashes[stage.name] = folder, marker["output_hash"]
                state.outputs[stage.name] = stage.read(folder)
                state.records[stage.name] = marker
                logger.info("stage %s: cached (%s)", stage.name, folder)
            continue
        if missing:
            hint = "; run without --only first" if only else ""
            raise SelfAlignError(f"stage {stage.name} needs {', '.join(missing)}, which has not run{hint}")
        try:
            state.outputs[stage.name], state.records[stage.name] = execute(
                stage, folder, key, {n: state.outputs[n] for n in stage.inputs}, input_hashes
            )
        except BaseException:
            state.failed = stage.name
            raise
        state.folders[stage.name], state.hashes[stage.name] = folder, state.records[stage.name]["output_hash"]
    return plan, state


def execute(
    stage: Stage, folder: Path, key: str, inputs: dict[str, Any], input_hashes: dict[str, str]
) -> tuple[Any, dict]:
    """Run one stage into its folder; returns its outputs and its record (stage.json, written last)."""
    logger.info("stage %s: running into %s", stage.name, folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).unlink(missing_ok=True)  # a forced rerun must not look finished if it is killed
    started = time.perf_counter()
    with measure_peak_memory() as memory:
        outputs = stage.run(inputs, folder)
    release_free_memory()  # the next stage starts from what this one kept, not from what it once held
    seconds = time.perf_counter() - started
    # Memory and tokens describe this execution, like `seconds`: they live in stage.json only, which neither the
    # output hash nor any stage key reads, so a rerun with other timings or memory still matches the cache.
    record = {
        "stage": stage.name,
        "kind": stage.kind,
        "key": key,
        "settings": stage.settings,
        "inputs": input_hashes,
        "output_hash": folder_hash(folder, stage.unhashed),
        "seconds": round(seconds, 2),
        **memory.record,
        "tokens": stage.count_tokens(folder) if stage.count_tokens else None,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_text_atomic(folder / MARKER, json.dumps(record, indent=2, default=str) + "\n")
    return outputs, record


def print_plan(plan: list[PlannedStage]) -> str:
    """One line per stage: run, cached or skip, and its folder (or why it is not known yet)."""
    lines = []
    for item in plan:
        if item.blocked_by:
            lines.append(f"{item.stage.name:<16} blocked needs {', '.join(item.blocked_by)}, which has not run; run "
                         "without --only first")  # fmt: skip
            continue
        status = "run" if item.will_run else ("cached" if item.cached else "skip")
        where = item.folder if item.folder is not None else "(folder named once its inputs exist)"
        lines.append(f"{item.stage.name:<16} {status:<7} {where}")
    return "\n".join(lines)


def format_gb(kilobytes: int | None) -> str:
    """Resident memory for people: the kernel's kB (KiB) as GB (10^9 bytes), the unit of the README's targets."""
    return "" if kilobytes is None else f"{kilobytes * 1024 / 1e9:.2f} GB"


def format_tokens(tokens: dict[str, Any] | None) -> str:
    if not tokens:
        return ""
    return ", ".join(f"{count} {what}" for what, count in tokens.items() if isinstance(count, int))


def build_manifest(
    config: RunConfig, plan: list[PlannedStage], state: RunState, out: Path, seconds: float, error: str | None = None
) -> dict:
    """run.json: what ran, with what, how long; a failed run records which stage failed and its one-line error."""
    import importlib.metadata as metadata
    import platform

    from selfalign.models.loading import machine_facts

    packages = {}
    for name in ("selfalign", "torch", "transformers", "trl", "peft", "datasets", "accelerate"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    status = "completed" if error is None else "failed"
    return {
        "status": status,
        **({"failed_stage": state.failed, "error": error} if error is not None else {}),
        "python": platform.python_version(),
        "packages": packages,
        "machine": machine_facts(),
        "seed": config.seed,
        "config": config.model_dump(mode="json"),
        "seconds": round(seconds, 2),
        # The whole process's, model loading included. The kernel's high-water mark can miss a peak that memory
        # handed back with madvise (release_free_memory) brought down again, so the peaks of the stages this
        # process ran count too.
        "peak_rss_kb": max(
            [lifetime_peak_kb()]
            + [state.records.get(item.stage.name, {}).get("peak_rss_kb") or 0 for item in plan if item.will_run]
        ),
        "stages": {
            item.stage.name: {
                "folder": str(item.folder),
                "ran": item.will_run,
                **{k: v for k, v in state.records.get(item.stage.name, {}).items() if k not in ("settings", "stage")},
            }
            for item in plan
        },
        "outputs": {name: str(path) for name, path in state.folders.items()},
    }


def write_manifest(out: Path, manifest: dict) -> None:
    write_text_atomic(out / "run.json", json.dumps(manifest, indent=2, default=str) + "\n")
