import json

import pytest

from selfalign.errors import SelfAlignError
from selfalign.pipeline.engine import MARKER, Stage, run_stages


def make_stages(log, settings=None, fail=None):
    settings = settings or {}

    def body(name):
        def run(inputs, folder):
            log.append(name)
            if fail == name:
                (folder / "partial.txt").write_text("half")
                raise KeyboardInterrupt
            upstream = "".join((path / "out.txt").read_text() for path in inputs.values())
            (folder / "out.txt").write_text(f"{name}({upstream}){settings.get(name, '')}")

        return run

    return [
        Stage("a", "a", [], settings.get("a", {}), body("a")),
        Stage("b", "b", ["a"], settings.get("b", {}), body("b")),
        Stage("c", "c", ["a"], settings.get("c", {}), body("c")),
        Stage("d", "d", ["b", "c"], settings.get("d", {}), body("d")),
    ]


def test_a_rerun_skips_finished_stages(tmp_path):
    log = []
    run_stages(make_stages(log), tmp_path)
    assert log == ["a", "b", "c", "d"]
    plan, state = run_stages(make_stages(log), tmp_path)
    assert log == ["a", "b", "c", "d"] and not any(p.will_run for p in plan)
    assert (state.outputs["d"] / "out.txt").read_text() == "d(b(a())c(a()))"


def test_a_stage_that_reruns_with_the_same_output_keeps_downstream_cached(tmp_path):
    log = []
    run_stages(make_stages(log), tmp_path)
    log.clear()
    stages = make_stages(log)
    stages[1].settings = {"retries": 3}  # a setting that changes nothing in b's output
    stages[1].body = make_stages(log)[1].body
    run_stages(stages, tmp_path)
    assert log == ["b"]


def test_a_changed_setting_reruns_only_the_stages_it_affects(tmp_path):
    log = []
    run_stages(make_stages(log), tmp_path)
    log.clear()
    run_stages(make_stages(log, settings={"b": {"lr": 2}}), tmp_path)
    assert log == ["b", "d"]


def test_an_upstream_rerun_with_the_same_output_keeps_downstream_cached(tmp_path):
    log = []
    run_stages(make_stages(log), tmp_path)
    log.clear()
    run_stages(make_stages(log), tmp_path, from_stage="c")
    assert log == ["c", "d"]  # --from reruns c and everything after it
    log.clear()
    run_stages(make_stages(log), tmp_path)
    assert log == []


def test_only_and_dry_run(tmp_path):
    log = []
    plan, _ = run_stages(make_stages(log), tmp_path, dry_run=True)
    assert log == [] and [p.will_run for p in plan] == [True] * 4
    with pytest.raises(SelfAlignError, match="stage b needs a, which has not run; run without --only first"):
        run_stages(make_stages(log), tmp_path, only="b")
    run_stages(make_stages(log), tmp_path)
    log.clear()
    run_stages(make_stages(log, settings={"c": {"x": 1}, "b": {"x": 1}}), tmp_path, only="c")
    assert log == ["c"]
    plan, _ = run_stages(make_stages(log, settings={"c": {"x": 1}, "b": {"x": 1}}), tmp_path, dry_run=True)
    assert {p.stage.name: p.cached for p in plan} == {"a": True, "b": False, "c": True, "d": False}
    with pytest.raises(SelfAlignError, match="--from e: no such stage"):
        run_stages(make_stages(log), tmp_path, from_stage="e")


def test_a_killed_stage_is_not_finished_and_reruns(tmp_path):
    log = []
    with pytest.raises(KeyboardInterrupt):
        run_stages(make_stages(log, fail="c"), tmp_path)
    c_folder = next((tmp_path / "c").iterdir())
    assert not (c_folder / MARKER).exists() and (c_folder / "partial.txt").exists()
    log.clear()
    _, state = run_stages(make_stages(log), tmp_path)
    assert log == ["c", "d"]
    marker = json.loads((state.outputs["c"] / MARKER).read_text())
    assert marker["inputs"] == {"a": json.loads((state.outputs["a"] / MARKER).read_text())["output_hash"]}
