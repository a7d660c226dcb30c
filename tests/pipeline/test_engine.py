import json
import time
from pathlib import Path

import pytest

from selfalign.errors import SelfAlignError
from selfalign.pipeline.engine import MARKER, Stage, run_stages
from selfalign.pipeline.memory import measure_peak_memory


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
            return folder  # a Stage's outputs are its folder unless it says otherwise (Stage.read)

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
    stages[1].run = make_stages(log)[1].run
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


def stages_that_use_memory(megabytes, tokens):
    """a holds `megabytes` of memory for a moment and reports `tokens`; b reads a. Same outputs whatever the sizes."""

    def a_body(inputs, folder):
        held = b"x" * (megabytes * 1_000_000)  # written, so resident
        time.sleep(0.35)  # several sampler ticks, in case the process peaked higher before
        (folder / "out.txt").write_text(f"a{len(held) > 0}")
        return folder

    def b_body(inputs, folder):
        (folder / "out.txt").write_text("b" + (inputs["a"] / "out.txt").read_text())
        return folder

    return [
        Stage("a", "a", [], {}, a_body, count_tokens=lambda folder: {"generated": tokens}),
        Stage("b", "b", ["a"], {}, b_body),
    ]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="per-stage peaks are sampled from /proc")
def test_each_stage_records_its_peak_memory_and_tokens(tmp_path):
    _, state = run_stages(stages_that_use_memory(200, tokens=42), tmp_path)
    a = json.loads((state.outputs["a"] / MARKER).read_text())
    assert a["peak_rss_kb"] - a["rss_start_kb"] >= 180_000  # 200 MB held, in kB
    assert a["peak_rss_measured"] in ("high-water mark", "sampled every 0.1 s")
    assert a["tokens"] == {"generated": 42}
    b = json.loads((state.outputs["b"] / MARKER).read_text())
    assert b["tokens"] is None and b["peak_rss_kb"] >= b["rss_start_kb"] > 0


def test_memory_and_tokens_stay_out_of_keys_and_hashes(tmp_path):
    _, first = run_stages(stages_that_use_memory(50, tokens=1), tmp_path)
    plan, _ = run_stages(stages_that_use_memory(5, tokens=2), tmp_path)
    assert not any(p.will_run for p in plan)  # other memory and tokens: still cached
    plan, second = run_stages(stages_that_use_memory(5, tokens=2), tmp_path, from_stage="a")
    assert [p.will_run for p in plan] == [True, True]
    assert second.hashes == first.hashes and second.records["a"]["tokens"] == {"generated": 2}


def test_peak_memory_is_measured_where_the_block_raises():
    with pytest.raises(KeyboardInterrupt), measure_peak_memory() as memory:
        raise KeyboardInterrupt
    assert memory.record["peak_rss_kb"] > 0


def test_a_cached_stage_hands_the_next_one_its_outputs_read_from_its_folder(tmp_path):
    received = []

    def a_run(inputs, folder):
        (folder / "n.txt").write_text("7")
        return 7

    def b_run(inputs, folder):
        received.append(inputs["a"])
        (folder / "out.txt").write_text(str(inputs["a"] * 2))
        return folder

    def stages(b_settings):
        read_a = lambda folder: int((folder / "n.txt").read_text())  # noqa: E731
        return [Stage("a", "a", [], {}, a_run, read_a), Stage("b", "b", ["a"], b_settings, b_run)]

    _, first = run_stages(stages({}), tmp_path)
    _, second = run_stages(stages({"x": 1}), tmp_path)  # a is cached, b reruns
    assert received == [7, 7] and first.outputs["a"] == second.outputs["a"] == 7
    assert second.folders["a"] == first.folders["a"] and (second.outputs["b"] / "out.txt").read_text() == "14"
