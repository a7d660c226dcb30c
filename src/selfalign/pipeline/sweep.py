"""`selfalign sweep`: one base run config at many settings (a grid or a list of points) and seeds.

Each run is exactly `selfalign run CONFIG key=value...` with the point's settings as overrides, and every run shares
one run folder, so the stage cache reuses whatever two runs have in common (tune-judge and preferences when only a
DPO setting differs). Runs evaluate on the dev splits unless the sweep file names other sets: settings are chosen on
dev, so that the test splits are still unseen when the chosen setting is reported. Every point and seed is loaded and
checked before the first stage runs. Results go to OUT/sweep/ (reporting/sweep_report.py), or to the folder the
sweep file names in `results:`, so that two sweeps sharing OUT (a dev sweep and its test run) keep both reports.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import Field, NonNegativeInt, PrivateAttr, ValidationError, ValidationInfo, model_validator

from selfalign.config import StrictModel, parse_override, read_yaml_mapping
from selfalign.errors import SelfAlignError
from selfalign.pipeline.config import RunConfig, load_run_config
from selfalign.pipeline.engine import STAGE_ORDER

logger = logging.getLogger(__name__)
T = TypeVar("T")

# The evaluation sets of a sweep unless its file sets them (in fixed, grid or points); helpful and capability only
# where the base config measures them.
DEV_EVALUATION = {
    "evaluation.harmful": "builtin:redteam:dev",
    "evaluation.benign": "builtin:benign-sensitive:dev",
    "evaluation.helpful": "builtin:helpful:dev",
    "evaluation.capability": "builtin:capability:dev",
}
RESULTS_FOLDER = "sweep"  # under the shared run folder, beside the stage folders; a sweep file may name another
RESULTS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
DOTTED_KEY = re.compile(r"[A-Za-z_][\w-]*(\.[\w-]+)*")


class SweepSettings(StrictModel):
    config: str = Field(description="The base run config, e.g. configs/demo.yaml (a path from the current folder).")
    out: str = Field(description="The run folder every run shares (one stage cache); results go to OUT/RESULTS/.")
    results: str = Field(
        RESULTS_FOLDER,
        description="The folder under OUT for this sweep's results (sweep.json, sweep.md, tradeoff.png, seeds.md, "
        "runs/). Sweeps that share OUT, and so its stage cache, need one each: a sweep refuses to replace the results "
        "of another sweep file.",
    )
    grid: dict[str, list[Any]] | None = Field(
        None, description="Dotted run-config key -> values; every combination of them is one point."
    )
    points: list[dict[str, Any]] | None = Field(
        None, description="The points, each a mapping of dotted run-config keys -> value ({} is the base config)."
    )
    seeds: list[NonNegativeInt] | None = Field(
        None, description="Run every point once per seed (the run config's `seed`); none: the base config's seed."
    )
    fixed: dict[str, Any] = Field(
        default_factory=dict, description="Dotted run-config key -> value for every run, e.g. evaluation.limit: 20."
    )

    _source: str = PrivateAttr("sweep settings")  # the sweep file, for error messages
    _lines: dict[tuple, int] = PrivateAttr(default_factory=dict)  # key path in the file -> its line

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> SweepSettings:
        if info.context:
            self._source, self._lines = info.context["source"], info.context["lines"]
        check_sweep(self)
        return self

    @property
    def source(self) -> str:
        return self._source

    def where(self, *path: str | int) -> str:
        """`file:line` of the longest prefix of `path` the file spells out (`file` alone when none)."""
        for end in range(len(path), 0, -1):
            if path[:end] in self._lines:
                return f"{self._source}:{self._lines[path[:end]]}"
        return self._source


# ---- the sweep file --------------------------------------------------------------------------------------------


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepSettings:
    """Read and check a sweep file; `key=value` overrides set its own keys (out, seeds, grid.KEY, ...) and any
    other key is a run-config setting for every run (into `fixed`)."""
    path = Path(path)
    if not path.is_file():
        raise SelfAlignError(f"{path}: sweep file not found")
    data = read_yaml_mapping(path)  # invalid YAML, duplicate keys and a top level that is no mapping name the line
    data, replaced = apply_sweep_overrides(data, overrides or [])
    # a value given on the command line has no line in the file: its errors name the enclosing key's line, or none
    lines = {key: line for key, line in key_lines(path.read_text(encoding="utf-8")).items()
             if not any(key[: len(prefix)] == prefix for prefix in replaced)}  # fmt: skip
    try:
        return SweepSettings.model_validate(data, context={"source": str(path), "lines": lines})
    except ValidationError as exc:
        raise SelfAlignError(_validation_message(exc, str(path), lines)) from None


def key_lines(text: str) -> dict[tuple, int]:
    """Every key and list item of a YAML text -> its 1-based line, e.g. ("grid", "seed") -> 4, ("points", 0) -> 7."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        children: list[tuple[Any, yaml.Node, yaml.Node]] = []
        if isinstance(node, yaml.MappingNode):
            children = [(key.value, key, value) for key, value in node.value]
        elif isinstance(node, yaml.SequenceNode):
            children = [(index, item, item) for index, item in enumerate(node.value)]
        for name, marked, value in children:
            lines[(*path, name)] = marked.start_mark.line + 1
            walk(value, (*path, name))

    if root is not None:
        walk(root, ())
    return lines


def apply_sweep_overrides(data: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], list[tuple]]:
    """The sweep file's data with the overrides set, and the key paths they replaced."""
    result, replaced = dict(data), []
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) == 1 and keys[0] in SweepSettings.model_fields:
            result[keys[0]] = value
            replaced.append((keys[0],))
            continue
        # grid and fixed hold dotted run-config keys: `grid.training.settings.max_steps=[20, 40]` is one key of grid
        section, dotted = (keys[0], keys[1:]) if keys[0] in ("grid", "fixed") and len(keys) > 1 else ("fixed", keys)
        mapping = result.get(section) or {}
        if not isinstance(mapping, dict):
            raise SelfAlignError(f"override '{text}': the sweep file's {section} is not a mapping")
        result[section] = {**mapping, ".".join(dotted): value}
        replaced.append((section, ".".join(dotted)))
    return result, replaced


def _validation_message(exc: ValidationError, source: str, lines: dict[tuple, int]) -> str:
    problems = []
    for error in exc.errors():
        loc = error["loc"]
        known = [loc[:end] for end in range(len(loc), 0, -1) if loc[:end] in lines]
        where = f"{source}:{lines[known[0]]}" if known else source
        key = ".".join(str(part) for part in loc) or "(top level)"
        if error["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown key '{key}'; a sweep file has {', '.join(SweepSettings.model_fields)}")
        elif error["type"] == "missing":
            problems.append(f"{where}: missing required key '{key}'")
        else:
            problems.append(f"{where}: invalid value for '{key}': {error['msg']}")
    return "; ".join(problems)


def check_sweep(sweep: SweepSettings) -> None:
    """The rules the field types cannot say, each a one-line error naming the file and line."""
    if sweep.grid is not None and sweep.points is not None:
        raise SelfAlignError(f"{sweep.where('points')}: give grid or points, not both")
    if sweep.grid is None and sweep.points is None and sweep.seeds is None:
        raise SelfAlignError(f"{sweep.where()}: nothing to sweep: give grid, points or seeds")
    if sweep.grid is not None and not sweep.grid:
        raise SelfAlignError(f"{sweep.where('grid')}: grid is empty: give dotted run-config keys and their values")
    for key, values in (sweep.grid or {}).items():
        _check_key(sweep, key, ("grid", key))
        if not values:
            raise SelfAlignError(f"{sweep.where('grid', key)}: grid key '{key}' has an empty list of values")
        if (repeated := _first_repeat(values)) is not None:
            raise SelfAlignError(f"{sweep.where('grid', key)}: grid key '{key}' lists {repeated} twice")
    if sweep.points is not None and not sweep.points:
        raise SelfAlignError(f"{sweep.where('points')}: points is empty: give at least one mapping of settings")
    for index, point in enumerate(sweep.points or []):
        for key in point:
            _check_key(sweep, key, ("points", index, key))
    if sweep.points and (repeated := _first_repeat(sweep.points, index=True)) is not None:
        raise SelfAlignError(f"{sweep.where('points', repeated)}: point p{repeated + 1} repeats an earlier point")
    if sweep.seeds is not None and not sweep.seeds:
        raise SelfAlignError(f"{sweep.where('seeds')}: seeds is empty: give the seeds, e.g. [0, 1, 2]")
    if sweep.seeds and (repeated := _first_repeat(sweep.seeds)) is not None:
        raise SelfAlignError(f"{sweep.where('seeds')}: seeds lists {repeated} twice")
    for key in sweep.fixed:
        _check_key(sweep, key, ("fixed", key))
    if not RESULTS_NAME.fullmatch(sweep.results) or sweep.results in STAGE_ORDER:
        raise SelfAlignError(f"{sweep.where('results')}: results '{sweep.results}' is not a folder name for OUT: "
                             "letters, digits, _ and -, and none of the stages' folders")  # fmt: skip


def results_folder(sweep: SweepSettings, out: Path) -> Path:
    """OUT/RESULTS, once it is known not to hold another sweep file's results (sweeps that share OUT share its stage
    cache, not their reports)."""
    folder = out / sweep.results
    try:
        earlier = json.loads((folder / "sweep.json").read_text(encoding="utf-8")).get("sweep")
    except (OSError, ValueError, AttributeError):
        return folder  # nothing there yet, or nothing readable as a sweep's record
    if isinstance(earlier, str) and Path(earlier).name != Path(sweep.source).name:
        raise SelfAlignError(f"{sweep.where('results')}: {folder} holds the results of {earlier}, which this sweep "
                             f"would replace; name another folder (results: NAME in the file, or results=NAME), or "
                             "remove that one")  # fmt: skip
    return folder


def _check_key(sweep: SweepSettings, key: str, path: tuple) -> None:
    if not DOTTED_KEY.fullmatch(key):
        raise SelfAlignError(f"{sweep.where(*path)}: '{key}' is not a dotted run-config key, e.g. preferences.seed")
    if key == "out":
        raise SelfAlignError(f"{sweep.where(*path)}: out is the sweep's own (one run folder for every run); set it "
                             "at the top level of the sweep file")  # fmt: skip
    if key == "seed" and sweep.seeds is not None:
        raise SelfAlignError(f"{sweep.where(*path)}: seed is set for every run by seeds; leave one of them out")


def _first_repeat(values: list[Any], index: bool = False) -> Any:
    """The first value (or its index) equal to an earlier one; values may be lists or mappings."""
    seen = set()
    for position, value in enumerate(values):
        text = json.dumps(value, sort_keys=True, default=str)
        if text in seen:
            return position if index else text
        seen.add(text)
    return None


# ---- points and runs -------------------------------------------------------------------------------------------


@dataclass
class SweepPoint:
    name: str  # p1, p2, ... in the sweep file's order
    settings: dict[str, Any]  # dotted run-config key -> value
    where: dict[str, tuple] = field(default_factory=dict)  # key -> its path in the sweep file, for error lines
    path: tuple = ()  # the point's own path in the sweep file


def expand_points(sweep: SweepSettings) -> list[SweepPoint]:
    """The grid's combinations (its first key varies slowest), or the listed points, or the base config alone."""
    if sweep.grid is not None:
        keys = list(sweep.grid)
        combinations = itertools.product(*(sweep.grid[key] for key in keys))
        return [SweepPoint(f"p{number}", dict(zip(keys, values)), {key: ("grid", key) for key in keys}, ("grid",))
                for number, values in enumerate(combinations, start=1)]  # fmt: skip
    if sweep.points is not None:
        return [SweepPoint(f"p{index + 1}", dict(point), {key: ("points", index, key) for key in point},
                           ("points", index)) for index, point in enumerate(sweep.points)]  # fmt: skip
    return [SweepPoint("p1", {}, {}, ("seeds",))]


def override_text(key: str, value: Any) -> str:
    """`key=value` as `selfalign run` reads it back (YAML flow style), so the value keeps its type."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True).strip()
    return f"{key}={text.removesuffix('...').strip()}"  # a bare scalar's document-end marker


@dataclass
class SweepRun:
    point: SweepPoint
    config: RunConfig
    overrides: list[str]  # what `selfalign run` is given after the base config

    @property
    def name(self) -> str:
        return f"{self.point.name}-seed{self.config.seed}"

    def command(self, base: str) -> str:
        return shlex.join(["selfalign", "run", base, *self.overrides])


def plan_sweep(sweep: SweepSettings, out: str | Path | None = None) -> list[SweepRun]:
    """Every point x seed as a loaded, checked run config, before any stage runs: an unknown key, a bad value or a
    missing data column is a one-line error naming the sweep file, the line, the point and the key."""
    from selfalign.pipeline import preflight

    base_path = Path(sweep.config)
    if not base_path.is_file():
        raise SelfAlignError(f"{sweep.where('config')}: run config {base_path} not found (paths are from the current "
                             "folder)")  # fmt: skip
    out = Path(out if out is not None else sweep.out)
    results_folder(sweep, out)
    out_setting = override_text("out", str(out))
    base = _load(sweep, [out_setting], {}, ("config",), "the base config")
    common = [out_setting, *dev_evaluation(base, sweep.fixed),
              *(override_text(key, value) for key, value in sweep.fixed.items())]  # fmt: skip
    _load(sweep, common, {key: ("fixed", key) for key in sweep.fixed}, ("fixed",), "fixed")
    runs, checked = [], set()
    for point in expand_points(sweep):
        for seed in sweep.seeds or [None]:
            seed_setting = [] if seed is None else [override_text("seed", seed)]
            overrides = [*common, *(override_text(key, value) for key, value in point.settings.items()), *seed_setting]
            label = f"point {point.name} ({describe(point.settings)}{'' if seed is None else f', seed {seed}'})"
            config = _load(sweep, overrides, point.where, point.path, label)
            identity = config.model_dump_json(exclude={"seed"})  # the data a run reads does not change with its seed
            if identity not in checked:
                checked.add(identity)
                _blame(sweep, point.where, point.path, label, lambda config=config: preflight(config))
            runs.append(SweepRun(point, config, overrides))
    return runs


def dev_evaluation(base: RunConfig, fixed: dict[str, Any]) -> list[str]:
    """DEV_EVALUATION as overrides, less the sets the base config does not measure (helpful or capability null) and
    the sets `fixed` names itself (a grid or points that name one replace it later, as later overrides do)."""
    unmeasured = {f"evaluation.{name}" for name in ("helpful", "capability") if getattr(base.evaluation, name) is None}
    return [override_text(key, value) for key, value in DEV_EVALUATION.items() if key not in unmeasured | set(fixed)]


def describe(settings: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in settings.items()) or "the base config"


def _load(sweep: SweepSettings, overrides: list[str], where: dict[str, tuple], path: tuple, label: str) -> RunConfig:
    return _blame(sweep, where, path, label, lambda: load_run_config(sweep.config, overrides))


def _blame(sweep: SweepSettings, where: dict[str, tuple], path: tuple, label: str, check: Callable[[], T]) -> T:
    """Run `check`; its error gets the line of the setting it names (the longest key it mentions), else of `path`."""
    try:
        return check()
    except SelfAlignError as exc:
        culprit = max((key for key in where if key in str(exc)), key=len, default=None)
        line = sweep.where(*where[culprit]) if culprit else sweep.where(*path)
        raise SelfAlignError(f"{line}: {label}: {exc}") from None


# ---- running ---------------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    folder: Path  # OUT/RESULTS: sweep.json, sweep.md, tradeoff.png, seeds.md, runs/
    record: dict  # what sweep.json holds
    failed: list[str]  # names of the runs that stopped with an error

    @property
    def pareto(self) -> list[dict]:
        return self.record["pareto"]


def run_sweep(sweep: SweepSettings, out: str | Path | None = None) -> SweepResult:
    """Run every point x seed in OUT (default: the sweep's `out`), then write OUT/RESULTS/ (default OUT/sweep/). A
    run that fails is recorded and the others still run; its finished stages stay cached for the rerun."""
    from selfalign.reporting.sweep_report import write_sweep_report

    out = Path(out if out is not None else sweep.out)
    runs = plan_sweep(sweep, out)
    folder = out / sweep.results  # plan_sweep checked that it holds no other sweep file's results
    records: list[dict] = []
    record: dict = {}
    for number, run in enumerate(runs, start=1):
        logger.info("sweep: run %d of %d, %s: %s", number, len(runs), run.name, describe(run.point.settings))
        records.append(_run_one(run, sweep.config, folder))
        # the results so far after every run: a long sweep can be read while it runs, or after it was stopped
        summary = {"sweep": sweep.source, "config": sweep.config, "out": str(out), "seeds": sweep.seeds,
                   "runs_planned": len(runs), "points": _by_point(records)}  # fmt: skip
        record = write_sweep_report(summary, folder)
    failed = [record["run"] for record in records if record["status"] != "completed"]
    return SweepResult(folder, record, failed)


def _by_point(records: list[dict]) -> list[dict]:
    points: dict[str, dict] = {}
    for record in records:
        entry = points.setdefault(record["point"], {"point": record["point"], "settings": record["settings"]})
        entry.setdefault("runs", []).append(record)
    return list(points.values())


def _run_one(run: SweepRun, base: str, folder: Path) -> dict:
    """One `selfalign run`; its manifest is kept as sweep/runs/NAME.json (the shared run.json holds the last run's)."""
    from selfalign.data.jsonl import write_text_atomic
    from selfalign.pipeline import run_pipeline
    from selfalign.reporting.sweep_report import headline_metrics

    evaluation = run.config.evaluation
    record: dict[str, Any] = {
        "run": run.name, "point": run.point.name, "seed": run.config.seed, "settings": run.point.settings,
        "command": run.command(base),
        "evaluated_on": {"harmful": evaluation.harmful, "benign": evaluation.benign, "helpful": evaluation.helpful,
                         "capability": evaluation.capability},
    }  # fmt: skip
    try:
        _, manifest = run_pipeline(run.config)
    except Exception as exc:  # noqa: BLE001 - one failed setting must not cost the rest of the sweep
        logger.exception("sweep: run %s failed", run.name)
        return {**record, "status": "failed", "error": (str(exc).splitlines() or [type(exc).__name__])[0]}
    assert manifest is not None  # not a dry run
    write_text_atomic(folder / "runs" / f"{run.name}.json", json.dumps(manifest, indent=2, default=str) + "\n")
    metrics = json.loads((Path(manifest["outputs"]["evaluate"]) / "metrics.json").read_text(encoding="utf-8"))
    return {
        **record,
        "status": "completed",
        "stages": {
            name: {"folder": stage["folder"], "ran": stage["ran"]} for name, stage in manifest["stages"].items()
        },
        "manifest": str(folder / "runs" / f"{run.name}.json"),
        "metrics": {variant: headline_metrics(metrics["models"][variant]) for variant in metrics["variants"]},
    }
