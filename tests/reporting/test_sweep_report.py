"""The sweep's numbers: Pareto selection, the spread over seeds, and the tables and plot written from run records."""

import json
import math

import pytest

from selfalign.reporting.sweep_report import format_spread, pareto_set, seed_spread, write_sweep_report
from selfalign.statistics import count_rate


def test_the_pareto_set_keeps_what_no_other_beats_on_both_refusal_and_over_refusal():
    scores = {  # (refusal of red-team prompts, over-refusal of benign-sensitive ones)
        "a": (0.50, 0.10),
        "b": (0.60, 0.20),
        "c": (0.40, 0.30),  # a refuses more and over-refuses less
        "d": (0.60, 0.25),  # b refuses as much and over-refuses less
        "e": (0.50, 0.10),  # the same as a: neither beats the other
        "f": (0.20, 0.00),  # the least over-refusal
        "g": (0.20, 0.05),  # f over-refuses less at the same refusal
    }
    assert pareto_set(scores) == ["a", "b", "e", "f"]
    assert pareto_set({"only": (0.0, 1.0)}) == ["only"]
    assert pareto_set({}) == []


def test_the_spread_over_seeds_is_the_mean_range_and_sample_standard_deviation():
    rates = {0: count_rate(4, 40), 1: count_rate(8, 40), 2: count_rate(24, 40), 3: None}  # 10%, 20%, 60%; no seed 3
    spread = seed_spread(rates)
    assert spread["mean"] == pytest.approx(0.3)
    assert (spread["min"], spread["max"], spread["n"]) == (0.1, 0.6, 3)
    assert spread["std"] == pytest.approx(math.sqrt((0.2**2 + 0.1**2 + 0.3**2) / 2))  # n - 1 in the denominator
    assert spread["per_seed"] == {"0": 0.1, "1": 0.2, "2": 0.6}
    assert spread["low"] == rates[0]["low"] and spread["high"] == rates[2]["high"]  # the widest of the intervals
    assert format_spread(spread) == "30.0% (10.0-60.0, sd 26.5)"
    one = seed_spread({5: count_rate(10, 40)})
    assert one["std"] is None and one["mean"] == 0.25
    assert format_spread(one) == f"25.0% [{100 * one['low']:.1f}, {100 * one['high']:.1f}]"
    assert seed_spread({0: None, 1: count_rate(0, 0)}) is None  # nothing measured: no rate at all


def _run(name: str, seed: int, refused: int, over: int, capability: bool = True) -> dict:
    entry = {"refused_harmful_detector": count_rate(refused, 40), "over_refusal_detector": count_rate(over, 40),
             "harmless": count_rate(30, 40), "loops": count_rate(1, 40),
             "capability_acc_norm": count_rate(70, 100) if capability else None}  # fmt: skip
    return {"run": f"{name}-seed{seed}", "point": name, "seed": seed, "status": "completed", "command": "selfalign run",
            "stages": {"dpo": {"folder": "f", "ran": True}}, "metrics": {"dpo": entry},
            "evaluated_on": {"harmful": "builtin:redteam:dev", "benign": "builtin:benign-sensitive:dev",
                             "helpful": None, "capability": "builtin:capability:dev"}}  # fmt: skip


def test_the_report_marks_the_pareto_set_and_writes_seeds_md_for_several_seeds(tmp_path):
    points = [
        {"point": "p1", "settings": {"x": 1}, "runs": [_run("p1", 0, 10, 4), _run("p1", 1, 14, 4)]},  # mean 30%, 10%
        {"point": "p2", "settings": {"x": 2}, "runs": [_run("p2", 0, 8, 8), _run("p2", 1, 8, 10)]},  # beaten by p1
        {"point": "p3", "settings": {"x": 3}, "runs": [_run("p3", 0, 20, 20),
                                                       {"run": "p3-seed1", "point": "p3", "seed": 1, "command": "c",
                                                        "status": "failed", "error": "no pairs",
                                                        "evaluated_on": _run("p3", 1, 0, 0)["evaluated_on"]}]},
    ]  # fmt: skip
    record = write_sweep_report({"sweep": "s.yaml", "config": "c.yaml", "out": "o", "seeds": [0, 1], "points": points},
                                tmp_path)  # fmt: skip
    assert record["pareto"] == [{"point": "p1", "variant": "dpo"}, {"point": "p3", "variant": "dpo"}]
    assert record["failed"] == [{"run": "p3-seed1", "error": "no pairs"}]
    assert record["dev_only"] is True and record["evaluated_on"]["helpful"] == []
    assert record["points"][2]["variants"]["dpo"]["refused_harmful_detector"]["n"] == 1  # the failed seed is left out
    on_disk = json.loads((tmp_path / "sweep.json").read_text())
    assert on_disk["points"][0]["variants"]["dpo"]["refused_harmful_detector"]["mean"] == pytest.approx(0.3)
    table = (tmp_path / "sweep.md").read_text()
    assert "| p1 | 1 | dpo | 30.0% (25.0-35.0, sd 7.1) | 10.0% (10.0-10.0, sd 0.0) | 70.0% " in table
    rows = [line for line in table.split("## Runs")[0].splitlines() if "| dpo |" in line]
    assert [row.endswith("| yes |") for row in rows] == [True, False, True]
    assert "Evaluated on the dev splits only" in table and "| p3-seed1 | failed: no pairs |" in table
    assert (tmp_path / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    seeds = (tmp_path / "seeds.md").read_text()
    assert "| p1 | dpo | refused red-team (detector) | 30.0 | 25.0-35.0 | 7.1 | 25.0 | 35.0 |" in seeds
    assert "| p3 | dpo | over-refusal (detector) | 50.0 | 50.0-50.0 | n/a | 50.0 | n/a |" in seeds


def test_one_seed_shows_intervals_a_test_split_is_called_out_and_a_partial_sweep_says_so(tmp_path):
    run = _run("p1", 0, 10, 4, capability=False)
    run["evaluated_on"]["harmful"] = "builtin:redteam:test"
    record = write_sweep_report({"sweep": "s.yaml", "config": "c.yaml", "out": "o", "seeds": None, "runs_planned": 2,
                                 "points": [{"point": "p1", "settings": {}, "runs": [run]}]}, tmp_path)  # fmt: skip
    assert record["dev_only"] is False
    table = (tmp_path / "sweep.md").read_text()
    assert "**1 of 2 runs so far**" in table  # written after every run, so a stopped sweep has its results so far
    assert "**Not only dev splits**" in table and "builtin:redteam:test" in table
    assert "| p1 | dpo | 25.0% [" in table and "| n/a |" in table  # capability not measured
    assert not (tmp_path / "seeds.md").exists()
