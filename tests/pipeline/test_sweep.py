"""`selfalign sweep` with stand-in stage bodies (as tests/pipeline/test_pipeline.py uses) whose evaluation writes a
metrics.json that follows from the run's settings, and once with the real stages on the scripted model."""

import json
import re
import shlex
from pathlib import Path

import pytest

from selfalign.errors import SelfAlignError
from selfalign.pipeline import stages as stages_module
from selfalign.pipeline.outputs import PreferenceDataset, TrainedAdapter
from selfalign.pipeline.sweep import expand_points, load_sweep, override_text, plan_sweep, run_sweep
from selfalign.statistics import count_rate
from tests.cli_runner import run_cli
from tests.pipeline.stand_ins import given, replace_stages, stand_in

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"
N = 40  # prompts per evaluation set in the stand-in metrics


def stand_in_counts(adapter, variant: str) -> tuple[int, int]:
    """(red-team prompts refused, benign-sensitive prompts refused) of N: DPO refuses more with a higher learning
    rate and a later seed, and over-refuses less with more helpful pairs. `adapter`: the variant's stand-in
    TrainedAdapter, whose metrics hold the training settings and the dataset's preferences settings."""
    if variant == "base":
        return 4, 2
    if variant == "sft":
        return 10, 8
    training, preferences = adapter.metrics["settings"]["training"], adapter.metrics["data"]["settings"]
    refused = 10 + round(training["dpo"]["learning_rate"] * 2e5) + training["seed"]
    return refused, round((1 - preferences["helpful_mix"]) * 20)


def trained_on(settings, inputs):
    """A stand-in adapter's metrics: its training settings and what its dataset was made with."""
    dataset = next(value for value in inputs.values() if isinstance(value, PreferenceDataset))
    return {**given(settings, inputs), "data": dataset.funnel}


def evaluated(settings, inputs):
    """A stand-in evaluation's metrics.json, in evaluation/metrics.py's format."""
    models = {}
    for variant in ["base", *(name for name, value in inputs.items() if isinstance(value, TrainedAdapter))]:
        refused, over = stand_in_counts(inputs.get(variant), variant)
        models[variant] = {
            "refused_harmful_detector": count_rate(refused, N), "over_refusal_detector": count_rate(over, N),
            "harmless": count_rate(refused + 2, N), "capability": {"acc_norm": count_rate(70, 100)},
            "answer_quality": {"loops": count_rate(1, N)},
        }  # fmt: skip
    return {"variants": list(models), "models": models, **given(settings, inputs)}


@pytest.fixture
def ran(monkeypatch):
    """Each stage is a stand-in that records its run; evaluation writes metrics.json in evaluation/metrics.py's
    format, following the run's settings."""
    calls = []
    replace_stages(monkeypatch, calls, run_sft=trained_on, run_dpo=trained_on, run_evaluation=evaluated)
    return calls


def sweep_file(tmp_path: Path, body: str, name: str = "sweep.yaml") -> Path:
    """A sweep of the demo config into tmp_path/run: the config and out lines, then `body` from line 3."""
    path = tmp_path / name
    path.write_text(f"config: {DEMO}\nout: {tmp_path / 'run'}\n{body}")
    return path


LEARNING_RATES = "grid:\n  training.settings.dpo.learning_rate: [5.0e-5, 1.0e-4]\n"


# ---- points --------------------------------------------------------------------------------------------------------


def test_a_grid_is_every_combination_with_its_first_key_slowest_and_points_keep_their_order(tmp_path):
    grid = load_sweep(sweep_file(tmp_path, "grid:\n  preferences.helpful_mix: [0.4, 0.6]\n  rounds: [1, 2, 3]\n"))
    points = expand_points(grid)
    assert [p.name for p in points] == ["p1", "p2", "p3", "p4", "p5", "p6"]
    assert [(p.settings["preferences.helpful_mix"], p.settings["rounds"]) for p in points] == [
        (0.4, 1), (0.4, 2), (0.4, 3), (0.6, 1), (0.6, 2), (0.6, 3)]  # fmt: skip
    listed = load_sweep(sweep_file(tmp_path, "points:\n  - {rounds: 2}\n  - {}\n  - {preferences.helpful_mix: 0.3}\n"))
    assert [p.settings for p in expand_points(listed)] == [{"rounds": 2}, {}, {"preferences.helpful_mix": 0.3}]
    seeds_only = load_sweep(sweep_file(tmp_path, "seeds: [0, 1, 2]\n"))
    assert [p.settings for p in expand_points(seeds_only)] == [{}]
    assert [run.name for run in plan_sweep(seeds_only)] == ["p1-seed0", "p1-seed1", "p1-seed2"]


@pytest.mark.parametrize("value", [5e-05, "5e-5", "yes", None, True, [1, "a b"], {"x": [1, 2]}, "", "a=b"])
def test_a_setting_reaches_selfalign_run_with_its_type(value):
    from selfalign.config import parse_override

    assert parse_override(override_text("k", value)) == (["k"], value)


def test_each_run_is_selfalign_run_of_the_base_config_on_the_dev_splits(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, LEARNING_RATES + "seeds: [3, 4]\nfixed:\n  evaluation.limit: 7\n"))
    runs = plan_sweep(sweep)
    assert [run.name for run in runs] == ["p1-seed3", "p1-seed4", "p2-seed3", "p2-seed4"]
    config = runs[3].config
    assert config.seed == 4 and config.training.settings["dpo"]["learning_rate"] == 1e-4  # beside the demo's own
    assert config.training_config.dpo.learning_rate == 1e-4
    assert str(config.out) == str(tmp_path / "run") and config.evaluation.limit == 7
    evaluation = config.evaluation
    assert (evaluation.harmful, evaluation.benign, evaluation.helpful, evaluation.capability) == (
        "builtin:redteam:dev", "builtin:benign-sensitive:dev", "builtin:helpful:dev", "builtin:capability:dev",
    )  # fmt: skip
    words = shlex.split(runs[3].command(sweep.config))
    assert words[:3] == ["selfalign", "run", str(DEMO)] and words[-1] == "seed=4"
    from selfalign.pipeline.config import load_run_config

    assert load_run_config(words[2], words[3:]) == config  # the recorded command reproduces the run


def test_a_sweep_file_that_names_an_evaluation_set_keeps_it(tmp_path):
    (tmp_path / "base.yaml").write_text(DEMO.read_text() + "\n  helpful: null\n")  # appended under `evaluation:`
    path = tmp_path / "sweep.yaml"
    path.write_text(f"config: {tmp_path / 'base.yaml'}\nout: {tmp_path / 'run'}\nseeds: [0]\n"
                    "fixed: {evaluation.harmful: 'builtin:redteam:test', evaluation.benign: "
                    "'builtin:benign-sensitive:test'}\n")  # fmt: skip
    evaluation = plan_sweep(load_sweep(path))[0].config.evaluation
    assert evaluation.harmful == "builtin:redteam:test" and evaluation.benign == "builtin:benign-sensitive:test"
    assert evaluation.capability == "builtin:capability:dev"  # not named: dev
    assert evaluation.helpful is None  # not measured in the base config: the sweep does not start measuring it


# ---- running ---------------------------------------------------------------------------------------------------


def test_a_sweep_runs_every_point_sharing_the_stages_they_have_in_common(tmp_path, ran):
    result = run_sweep(load_sweep(sweep_file(tmp_path, LEARNING_RATES)))
    assert ran == ["tune-judge", "preferences", "sft", "dpo", "evaluate", "report", "dpo", "evaluate", "report"]
    assert result.failed == [] and result.folder == tmp_path / "run" / "sweep"
    record = json.loads((result.folder / "sweep.json").read_text())
    first, second = (point["runs"][0] for point in record["points"])
    for shared in ("tune-judge", "preferences", "sft"):
        assert first["stages"][shared]["folder"] == second["stages"][shared]["folder"]
        assert first["stages"][shared]["ran"] and not second["stages"][shared]["ran"]
    assert first["stages"]["dpo"]["folder"] != second["stages"]["dpo"]["folder"]
    assert first["settings"] == {"training.settings.dpo.learning_rate": 5e-5}
    assert second["metrics"]["dpo"]["refused_harmful_detector"] == count_rate(30, N)  # 10 + 1e-4 * 2e5
    assert set(second["metrics"]["dpo"]["refused_harmful_detector"]) >= {"rate", "low", "high", "n"}
    assert record["dev_only"] and record["evaluated_on"]["harmful"] == ["builtin:redteam:dev"]
    evaluate = json.loads((Path(first["stages"]["evaluate"]["folder"]) / "stage.json").read_text())
    assert evaluate["settings"]["evaluation"]["benign"] == "builtin:benign-sensitive:dev"  # what the stage ran with
    # base (4, 2) and sft (10, 6) are the same in both points; dpo: (20, 8) and (30, 8): p2's dpo beats p1's
    assert result.pareto == [{"point": "p1", "variant": "base"}, {"point": "p2", "variant": "base"},
                             {"point": "p2", "variant": "dpo"}]  # fmt: skip
    assert json.loads((result.folder / "runs" / "p2-seed0.json").read_text())["status"] == "completed"
    assert (result.folder / "tradeoff.png").is_file() and not (result.folder / "seeds.md").exists()
    assert "| p2 | 0.0001 | dpo | 75.0% [" in (result.folder / "sweep.md").read_text()


def test_a_sweep_of_seeds_alone_runs_the_base_config_once_per_seed_and_summarizes_them(tmp_path, ran):
    result = run_sweep(load_sweep(sweep_file(tmp_path, "seeds: [0, 1, 2]\n")))
    assert ran.count("tune-judge") == 1 and ran.count("preferences") == 3  # the preferences seed is the run's seed
    (point,) = json.loads((result.folder / "sweep.json").read_text())["points"]
    assert [run["seed"] for run in point["runs"]] == [0, 1, 2]
    refused = point["variants"]["dpo"]["refused_harmful_detector"]  # 20, 21 and 22 of 40
    assert refused["mean"] == pytest.approx(21 / 40) and refused["std"] == pytest.approx(1 / 40)
    assert (refused["min"], refused["max"]) == (20 / 40, 22 / 40)
    seeds = (result.folder / "seeds.md").read_text()
    assert "| p1 | dpo | refused red-team (detector) | 52.5 | 50.0-55.0 | 2.5 | 50.0 | 52.5 | 55.0 |" in seeds


def test_a_stopped_sweep_reruns_nothing_that_finished(tmp_path, ran, monkeypatch):
    dpo_stand_in = stages_module.run_dpo

    def dpo_failing_at_the_higher_rate(settings, inputs, out):
        if settings.training.dpo.learning_rate == 1e-4:
            raise SelfAlignError("dpo: stopped")
        return dpo_stand_in(settings, inputs, out)

    path = sweep_file(tmp_path, LEARNING_RATES)
    monkeypatch.setattr(stages_module, "run_dpo", dpo_failing_at_the_higher_rate)
    stopped = run_sweep(load_sweep(path))
    assert stopped.failed == ["p2-seed0"]
    assert json.loads((stopped.folder / "sweep.json").read_text())["failed"] == [
        {"run": "p2-seed0", "error": "dpo: stopped"}]  # fmt: skip
    monkeypatch.setattr(stages_module, "run_dpo", dpo_stand_in)
    ran.clear()
    resumed = run_sweep(load_sweep(path))
    assert ran == ["dpo", "evaluate", "report"] and resumed.failed == []  # only what p2 had left
    ran.clear()
    again = run_sweep(load_sweep(path))
    assert ran == []
    assert not any(stage["ran"] for point in again.record["points"] for stage in point["runs"][0]["stages"].values())


def test_the_sweep_command_runs_and_prints_what_each_run_did(tmp_path, ran, monkeypatch, capsys):
    path = sweep_file(tmp_path, LEARNING_RATES)
    code, out, _ = run_cli(monkeypatch, capsys, "sweep", str(path), "--dry-run", "evaluation.limit=5")
    assert code == 0 and ran == []
    assert out.splitlines()[0].startswith("p1-seed0: selfalign run ") and "evaluation.limit=5" in out
    code, out, _ = run_cli(monkeypatch, capsys, "sweep", str(path), f"out={tmp_path / 'other'}")
    assert code == 0 and (tmp_path / "other" / "sweep" / "sweep.md").is_file()
    assert "p1-seed0: tune-judge, preferences, sft, dpo, evaluate, report\np2-seed0: dpo, evaluate, report" in out
    assert "Pareto set: p1 base, p2 base, p2 dpo" in out


def test_sweeps_that_share_a_run_folder_keep_their_own_results(tmp_path, ran, monkeypatch, capsys):
    dev = run_sweep(load_sweep(sweep_file(tmp_path, LEARNING_RATES, "dev.yaml")))
    report = (dev.folder / "sweep.md").read_text()
    test_body = "seeds: [0]\nfixed:\n  training.settings.dpo.learning_rate: 1.0e-4\n  evaluation.limit: 5\n"
    test_file = sweep_file(tmp_path, test_body, "test.yaml")
    ran.clear()
    for command in (["--dry-run"], []):  # refused before anything runs, the dry run included
        code, _, err = run_cli(monkeypatch, capsys, "sweep", str(test_file), *command)
        assert code == 2 and ran == [] and (dev.folder / "sweep.md").read_text() == report
        assert (
            f"{test_file}: {dev.folder} holds the results of {tmp_path / 'dev.yaml'}, which this sweep would "
            "replace; name another folder (results: NAME in the file, or results=NAME), or remove that one" in err
        )
    test = run_sweep(load_sweep(test_file, ["results=sweep-test"]))
    assert ran == ["evaluate", "report"]  # the dev sweep's p2 adapter, from the shared stage cache
    assert test.folder == tmp_path / "run" / "sweep-test" and (dev.folder / "sweep.md").read_text() == report
    assert json.loads((test.folder / "sweep.json").read_text())["sweep"] == str(test_file)
    ran.clear()
    assert run_sweep(load_sweep(sweep_file(tmp_path, LEARNING_RATES, "dev.yaml"))).folder == dev.folder  # its own
    assert ran == []


# ---- bad input: one-line errors before any stage ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("grid:\n  training.settings.dpo.learning_rat: [1.0e-4]\n",
         ":4: point p1 (training.settings.dpo.learning_rat=0.0001): {demo} (with command-line overrides): "
         "training.settings.dpo.learning_rat: unknown key"),
        ("grid:\n  rounds: [1, 2]\n  evaluation.limt: [3]\n",
         ":5: point p1 (rounds=1, evaluation.limt=3): {demo} (with command-line overrides): unknown key "
         "'evaluation.limt'"),
        ("points:\n  - {rounds: 2}\n  - {preferences.helpful_mix: 2}\n",
         ":5: point p2 (preferences.helpful_mix=2): {demo} (with command-line overrides): invalid value for "
         "'preferences.helpful_mix'"),
        ("points:\n  - {preferences.prompts.0.prompt_column: text}\n",
         ":4: point p1 (preferences.prompts.0.prompt_column=text): builtin:redteam:train: no column 'text'"),
        ("grid:\n  preferences.helpful_mix: []\n",
         ":4: grid key 'preferences.helpful_mix' has an empty list of values"),
        ("grid:\n  rounds: [1, 2, 1]\n", ":4: grid key 'rounds' lists 1 twice"),
        ("grid: {}\n", ":3: grid is empty"),
        ("points: []\n", ":3: points is empty"),
        ("points:\n  - {rounds: 2}\n  - {rounds: 2}\n", ":5: point p2 repeats an earlier point"),
        ("seeds: [0, 1, 0]\n", ":3: seeds lists 0 twice"),
        ("seeds: []\n", ":3: seeds is empty"),
        ("seeds: [0, -1]\n", ":3: invalid value for 'seeds.1': Input should be greater than or equal to 0"),
        ("grid: {rounds: [1]}\npoints: [{rounds: 2}]\n", ":4: give grid or points, not both"),
        ("grid:\n  out: [a, b]\n", ":4: out is the sweep's own"),
        ("seeds: [0, 1]\ngrid:\n  seed: [3]\n", ":5: seed is set for every run by seeds"),
        ("seed: [0, 1]\n",
         ":3: unknown key 'seed'; a sweep file has config, out, results, grid, points, seeds, fixed"),
        ("fixed:\n  evaluation.limit: 0\nseeds: [0]\n",
         ":4: fixed: {demo} (with command-line overrides): invalid value for 'evaluation.limit'"),
        ("", ": nothing to sweep: give grid, points or seeds"),
        ("seeds: [0]\nresults: dpo\n", ":4: results 'dpo' is not a folder name for OUT: letters, digits, _ and -, "
         "and none of the stages' folders"),
        ("seeds: [0]\nresults: ../elsewhere\n", ":4: results '../elsewhere' is not a folder name for OUT"),
        ("grid:\n  rounds: [1]\n  rounds: [2]\n", ":5: invalid YAML: duplicate key 'rounds' (first on line 4)"),
    ],
)  # fmt: skip
def test_bad_sweep_input_is_a_one_line_error_naming_the_file_and_line_before_any_stage(tmp_path, ran, body, message):
    path = sweep_file(tmp_path, body)
    with pytest.raises(SelfAlignError) as error:
        run_sweep(load_sweep(path))
    text = str(error.value)
    assert "\n" not in text
    assert text.startswith(str(path) + message.split("{demo}")[0]), text
    assert message.replace("{demo}", str(DEMO)) in text
    assert ran == [] and not (tmp_path / "run").exists()


def test_command_line_settings_set_the_sweeps_keys_or_every_runs_settings(tmp_path, ran):
    path = sweep_file(tmp_path, "seeds: [0, 1]\ngrid:\n  rounds: [1]\n")
    sweep = load_sweep(path, ["grid.preferences.helpful_mix=[0.3, 0.5]", "evaluation.limit=5", "seeds=[2]", "out=o"])
    assert sweep.grid == {"rounds": [1], "preferences.helpful_mix": [0.3, 0.5]} and sweep.seeds == [2]
    assert sweep.fixed == {"evaluation.limit": 5} and sweep.out == "o"
    with pytest.raises(SelfAlignError) as error:  # the file's seeds are on line 3, but these came from the command
        load_sweep(path, ["seeds=[4, 4]"])
    assert str(error.value) == f"{path}: seeds lists 4 twice"


def test_a_missing_file_a_list_and_a_missing_base_config_are_errors_naming_the_file(tmp_path, ran):
    with pytest.raises(SelfAlignError, match=re.escape(f"{tmp_path / 'nope.yaml'}: sweep file not found")):
        load_sweep(tmp_path / "nope.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- config: a\n- out: b\n")
    with pytest.raises(SelfAlignError, match=re.escape(f"{listed}: the top level must be a mapping")):
        load_sweep(listed)
    missing = tmp_path / "missing.yaml"
    missing.write_text(f"out: {tmp_path / 'run'}\nconfig: nowhere.yaml\nseeds: [0]\n")
    with pytest.raises(SelfAlignError, match=re.escape(f"{missing}:2: run config nowhere.yaml not found")):
        run_sweep(load_sweep(missing))
    assert ran == []


def test_the_sweep_command_prints_one_line_and_exits_2_on_bad_input(tmp_path, ran, monkeypatch, capsys):
    path = sweep_file(tmp_path, "grid:\n  training.settings.dpo.learning_rat: [1.0e-4]\n")
    code, _, err = run_cli(monkeypatch, capsys, "sweep", str(path))
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {path}:4: point p1")


# ---- shipped sweep files ---------------------------------------------------------------------------------------


def test_shipped_sweep_files_validate_and_start_with_their_command(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    paths = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
    assert paths
    for path in paths:
        relative = path.relative_to(ROOT).as_posix()
        commands = [line.lstrip("# ").split("  #")[0].split() for line in path.read_text().splitlines()
                    if line.startswith("#   selfalign sweep")]  # fmt: skip
        assert commands and all(words[2] == relative for words in commands), relative
        for words in commands:
            overrides = [word for word in words[3:] if word != "--dry-run"]
            sweep = load_sweep(path, overrides)
            runs = plan_sweep(sweep, tmp_path / "run")  # every point loads and reads its data
            # dev splits, unless the file names its sets (demo-seeds.yaml: the demo's test sets, for README)
            harmful = sweep.fixed.get("evaluation.harmful", "builtin:redteam:dev")
            assert all(run.config.evaluation.harmful == harmful for run in runs)


# ---- the real stages on the scripted model ---------------------------------------------------------------------

SCRIPTED_BASE = {
    "model": {"backend": "scripted", "prompt_format": "plain",
              "options": {"rules": [["Rewrite the reply", "It would hurt people, so please do not do this."]],
                          "default": "Here is a complete answer."}},
    "tune_judge": None,
    "judge": {"design": "rule"},  # the no-model rule: verdicts follow from the refusal detector
    "preferences": {"prompts": [{"data": "builtin:redteam:train", "source": "harmful", "limit": 4},
                                {"data": "builtin:helpful:train", "source": "benign", "limit": 4}]},
    "training": {"settings": {"max_steps": 2}},
    "evaluation": {"limit": 3, "capability_limit": 4, "bootstrap_samples": 100, "generation": {"max_new_tokens": 16}},
}  # fmt: skip


def test_a_sweep_of_the_real_stages_on_the_scripted_model_evaluates_on_dev(tmp_path, monkeypatch, caplog):
    """Preferences, evaluation and the report run for real (training is a stand-in: the scripted model has no weights
    to train, and answers the same with any adapter). The second point's evaluation copies the base model's and the
    shared SFT adapter's rows from the first's."""
    import logging

    import yaml

    caplog.set_level(logging.INFO, logger="selfalign.evaluation.run")

    for function in ("run_sft", "run_dpo"):  # an adapter folder whose metrics.json holds the training settings
        monkeypatch.setattr(stages_module, function, stand_in(TrainedAdapter, []))
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(SCRIPTED_BASE))
    path = tmp_path / "sweep.yaml"
    path.write_text(f"config: {base}\nout: {tmp_path / 'run'}\n{LEARNING_RATES}")
    result = run_sweep(load_sweep(path))
    assert result.failed == []
    run = tmp_path / "run"
    assert [len(list((run / kind).glob("*/stage.json"))) for kind in ("preferences", "sft", "dpo", "evaluate")] == [
        1, 1, 2, 2]  # fmt: skip
    first, second = (point["runs"][0] for point in result.record["points"])
    assert first["stages"]["preferences"]["folder"] == second["stages"]["preferences"]["folder"]
    samples = [json.loads(line) for line in (Path(first["stages"]["evaluate"]["folder"]) / "samples.jsonl").open()]
    assert {s["variant"] for s in samples} == {"base", "sft", "dpo"}
    assert {s["key"].split(":")[1].rsplit("-", 1)[0] for s in samples} == {"redteam-dev", "benign-dev", "helpful-dev"}
    capability = (Path(first["stages"]["evaluate"]["folder"]) / "capability" / "dpo.jsonl").read_text()
    assert capability.count('"key": "capability:cap-dev-') == 4
    refused = second["metrics"]["dpo"]["refused_harmful_detector"]
    assert refused["n"] == 3 and refused["low"] <= refused["rate"] <= refused["high"]
    assert second["metrics"]["dpo"]["capability_acc_norm"]["n"] == 4
    assert result.record["evaluated_on"]["capability"] == ["builtin:capability:dev"]
    assert (result.folder / "sweep.md").read_text().count("| dpo |") == 2
    copied = {record.args[0].as_posix() for record in caplog.records if "rows copied" in record.msg}
    assert {"answers/base.jsonl", "judgments/base.jsonl", "answers/sft.jsonl", "pairwise/sft.jsonl"} <= copied
