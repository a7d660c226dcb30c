"""The pipeline's wiring and caching with stand-in stage bodies (the real ones are tested in their own folders)."""

import json
import re
import sys
import time
from pathlib import Path

import pytest

from selfalign.errors import SelfAlignError
from selfalign.judging.tuning import TIMING_FILES
from selfalign.pipeline import run_pipeline
from selfalign.pipeline import stages as stages_module
from selfalign.pipeline.config import load_run_config
from selfalign.pipeline.outputs import ADAPTER
from selfalign.training.config import RUN_RECORDS
from tests.pipeline.stand_ins import replace_stages


@pytest.fixture
def ran(monkeypatch):
    """Replace each stage by a stand-in that records its run and writes outputs that follow its settings."""
    calls = []
    replace_stages(monkeypatch, calls)
    return calls


def demo(tmp_path, *overrides):
    return load_run_config(None, [f"out={tmp_path / 'run'}", *overrides])


def test_first_run_runs_every_stage_and_writes_the_manifest(tmp_path, ran):
    _, manifest = run_pipeline(demo(tmp_path))
    assert ran == ["tune-judge", "preferences", "sft", "dpo", "evaluate", "report"]
    on_disk = json.loads((tmp_path / "run" / "run.json").read_text())
    assert on_disk["seed"] == 0 and on_disk["packages"]["transformers"]
    assert set(on_disk["outputs"]) == set(ran)
    assert all("output_hash" in stage and "seconds" in stage for stage in on_disk["stages"].values())
    assert all(stage["peak_rss_kb"] >= stage["rss_start_kb"] for stage in on_disk["stages"].values())
    assert on_disk["peak_rss_kb"] >= max(stage["peak_rss_kb"] for stage in on_disk["stages"].values())
    # what differs between machines: the dtype `auto` chose follows the CPU's bf16 units
    machine = on_disk["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["cpu_capability"]
    if not machine["gpus"]:
        assert machine["auto_dtype"] == ("bfloat16" if machine["cpu_bf16"] else "float32")
    assert machine["cpu_amx"] in (True, False) and (machine["cpu_bf16"] or not machine["cpu_amx"])  # AMX has bf16


def test_changing_one_training_setting_reruns_only_training_evaluation_and_report(tmp_path, ran):
    run_pipeline(demo(tmp_path))
    ran.clear()
    run_pipeline(demo(tmp_path))
    assert ran == []
    run_pipeline(demo(tmp_path, "training.settings.max_steps=41"))
    assert ran == ["sft", "dpo", "evaluate", "report"]


def rerun_alone(tmp_path, ran, monkeypatch, stage: str, function: str, records) -> list[dict]:
    """Run the pipeline with `function` (stage `stage`) writing new times into `records(out)` at every run, then
    rerun it alone (its stage.json lost, as when its folder is lost or a run is killed inside it): what ran, and
    each stage's output hash in both runs."""
    run = getattr(stages_module, function)

    def timed(settings, inputs, out):
        outputs = run(settings, inputs, out)
        for path in records(out):
            path.parent.mkdir(exist_ok=True)
            path.write_text(f'{{"seconds": {time.perf_counter()}}}\n')
        return outputs

    monkeypatch.setattr(stages_module, function, timed)
    manifests = [run_pipeline(demo(tmp_path))[1]]
    next((tmp_path / "run" / stage).glob("*/stage.json")).unlink()
    ran.clear()
    manifests.append(run_pipeline(demo(tmp_path))[1])
    return [{name: s["output_hash"] for name, s in manifest["stages"].items()} for manifest in manifests]


def test_a_tune_judge_rerun_that_measured_the_same_keeps_later_stages_cached(tmp_path, ran, monkeypatch):
    """tune-judge's times (timings.json, and the reports that print them) differ at every run; what later stages
    read does not, so a rerun of tune-judge alone reruns nothing else."""
    hashes = rerun_alone(tmp_path, ran, monkeypatch, "tune-judge", "run_tune_judge",
                         lambda out: [out / name for name in TIMING_FILES])  # fmt: skip
    assert ran == ["tune-judge"]
    assert hashes[0] == hashes[1]


def test_a_training_rerun_that_trained_the_same_adapter_keeps_later_stages_cached(tmp_path, ran, monkeypatch):
    """A training run's records of itself (times in metrics.json, TRL's log history, its pickled arguments) differ at
    every run; the adapter does not, so a rerun of SFT alone reruns neither DPO nor the evaluation."""
    hashes = rerun_alone(tmp_path, ran, monkeypatch, "sft", "run_sft",
                         lambda out: [out / ADAPTER / name for name in RUN_RECORDS])  # fmt: skip
    assert ran == ["sft"]
    assert hashes[0] == hashes[1]
    timed = stages_module.run_sft

    def retrained(settings, inputs, out):  # another adapter: what follows reruns
        outputs = timed(settings, inputs, out)
        (out / ADAPTER / "adapter_model.safetensors").write_bytes(b"trained otherwise")
        return outputs

    monkeypatch.setattr(stages_module, "run_sft", retrained)
    next((tmp_path / "run" / "sft").glob("*/stage.json")).unlink()
    ran.clear()
    run_pipeline(demo(tmp_path))
    assert ran == ["sft", "dpo", "evaluate", "report"]


def test_a_setting_of_one_training_method_leaves_the_other_cached(tmp_path, ran):
    run_pipeline(demo(tmp_path))
    ran.clear()
    run_pipeline(demo(tmp_path, "training.settings.dpo.learning_rate=2e-4"))
    assert ran == ["dpo", "evaluate", "report"]
    ran.clear()
    run_pipeline(demo(tmp_path, "training.settings.dpo.learning_rate=2e-4", "training.settings.sft.learning_rate=1e-4"))
    assert ran == ["sft", "dpo", "evaluate", "report"]  # this DPO starts from the SFT adapter
    ran.clear()
    run_pipeline(demo(tmp_path, "training.dpo_from_sft=false", "training.settings.sft.learning_rate=1e-3"))
    assert ran == ["sft", "dpo", "evaluate", "report"]
    ran.clear()
    run_pipeline(demo(tmp_path, "training.dpo_from_sft=false", "training.settings.sft.learning_rate=3e-3"))
    assert ran == ["sft", "evaluate", "report"]  # a DPO from the base model does not see SFT settings


def test_dry_run_prints_the_plan_without_running(tmp_path, ran):
    run_pipeline(demo(tmp_path))
    ran.clear()
    plan, manifest = run_pipeline(demo(tmp_path, "evaluation.limit=10"), dry_run=True)
    assert ran == [] and manifest is None
    assert {p.stage.name: p.will_run for p in plan} == {
        "tune-judge": False, "preferences": False, "sft": False, "dpo": False, "evaluate": True, "report": True,
    }  # fmt: skip


SERVED = ["model.backend=openai", "model.model=served-model"]


def test_adding_a_server_or_changing_concurrency_reruns_nothing(tmp_path, ran):
    one_server = ["model.options.base_urls=[http://127.0.0.1:8000/v1]", "model.options.concurrency=4"]
    run_pipeline(demo(tmp_path, *SERVED, *one_server))
    ran.clear()
    two_servers = ["model.options.base_urls=[http://127.0.0.1:8000/v1, http://127.0.0.1:8001/v1]",
                   "model.options.concurrency=16", "model.options.max_retries=9"]  # fmt: skip
    plan, _ = run_pipeline(demo(tmp_path, *SERVED, *two_servers), dry_run=True)
    assert not any(p.will_run for p in plan)
    plan, _ = run_pipeline(demo(tmp_path, *SERVED, *one_server, "model.options.endpoint=chat"), dry_run=True)
    assert all(p.will_run for p in plan)  # the endpoint changes what the server answers


def test_a_misspelt_backend_option_fails_before_any_stage(tmp_path, ran):
    with pytest.raises(SelfAlignError, match="backend vllm: tensor_parallel_sise: unknown option"):
        demo(tmp_path, "model.backend=vllm", "model.options.tensor_parallel_sise=2")
    with pytest.raises(SelfAlignError, match="needs base_url"):
        demo(tmp_path, "model.backend=openai")
    assert ran == []


def test_rounds_use_the_latest_adapter(tmp_path, ran):
    run_pipeline(demo(tmp_path, "rounds=2"))
    assert ran == ["tune-judge", "preferences", "sft", "dpo", "preferences-round2", "dpo-round2", "evaluate", "report"]


def test_config_errors_come_before_any_stage(tmp_path, ran):
    with pytest.raises(SelfAlignError, match="training.settings.max_stepz: unknown key"):
        run_pipeline(demo(tmp_path, "training.settings.max_stepz=3"))
    with pytest.raises(SelfAlignError, match="no column"):
        run_pipeline(demo(tmp_path, "preferences.prompts.0.prompt_column=text"))
    assert ran == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("judge.template=one-shoot", "invalid value for 'judge.template': unknown judge template 'one-shoot'"),
        ("tune_judge.ensemble=[one-shot, complys]", "unknown judge template 'complys'"),
        ("preferences.revision.strategy=refuse", "unknown revision strategy 'refuse'"),
        ("preferences.refusal_template=missing.yaml", "missing.yaml: refusal template file not found"),
        ("evaluation.pairwise_template=missing.yaml", "missing.yaml: pairwise template file not found"),
    ],
)
def test_a_template_that_does_not_load_is_a_config_error(tmp_path, ran, override, message):
    with pytest.raises(SelfAlignError, match=re.escape(message)):
        run_pipeline(demo(tmp_path, override))
    assert ran == []


def test_a_broken_template_file_stops_the_run_command_before_any_stage(tmp_path, ran, monkeypatch, capsys):
    """`key=value` whose value is a .yaml file is a setting, not the run config's path."""
    from selfalign.cli.main import main

    broken = tmp_path / "my-judge.yaml"
    broken.write_text('prompt: "{{ request "\n')
    monkeypatch.setattr(sys, "argv", ["selfalign", "run", f"judge.template={broken}", f"out={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"invalid value for 'judge.template': {broken}: template syntax error on line 1" in error
    assert ran == []


def test_a_run_config_whose_path_holds_an_equals_sign_is_read_as_the_config(tmp_path, ran, monkeypatch):
    from selfalign.cli.main import main

    monkeypatch.chdir(tmp_path)
    config = Path("lr=2e-4") / "run.yaml"  # relative: it starts like a setting `lr=...`, but it is a file
    config.parent.mkdir()
    config.write_text(f"out: {tmp_path / 'run'}\nrounds: 1\n")
    monkeypatch.setattr(sys, "argv", ["selfalign", "run", str(config), "--dry-run"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert not exit_info.value.code and (tmp_path / "run").exists() is False  # planned, nothing run
    assert ran == []


def test_the_run_command_prints_peak_memory_per_stage(tmp_path, ran, monkeypatch, capsys):
    from selfalign.cli.main import main

    monkeypatch.setattr(sys, "argv", ["selfalign", "run", f"out={tmp_path / 'run'}"])
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps the table to the terminal's width
    with pytest.raises(SystemExit) as exit_info:
        main()
    printed = capsys.readouterr().out
    assert not exit_info.value.code
    assert "peak RSS" in printed and "peak resident memory of this run:" in printed
    assert re.search(r"preferences .*yes .* \d+\.\d\d GB", printed)


def test_a_failed_stage_is_recorded_in_run_json_and_what_finished_stays_cached(tmp_path, ran, monkeypatch):
    def failing_preferences(settings, inputs, out):
        raise SelfAlignError("preferences: 0 of 8 red-team answers judged harmful by one-shot/logprob; no pairs")

    monkeypatch.setattr(stages_module, "run_preferences", failing_preferences)
    with pytest.raises(SelfAlignError, match="0 of 8 red-team answers"):
        run_pipeline(demo(tmp_path))
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["status"] == "failed"
    assert manifest["failed_stage"] == "preferences"
    assert manifest["error"].startswith("preferences: 0 of 8 red-team answers judged harmful")
    assert manifest["stages"]["tune-judge"]["ran"] is True and "output_hash" in manifest["stages"]["tune-judge"]
    assert "output_hash" not in manifest["stages"]["preferences"]


def test_use_tuned_judge_false_measures_the_judges_but_judges_with_the_configured_one(tmp_path, ran):
    plan, _ = run_pipeline(demo(tmp_path, "use_tuned_judge=false", "judge.design=rule"), dry_run=True)
    by_name = {item.stage.name: item.stage for item in plan}
    assert "tune-judge" in by_name
    assert "tune-judge" not in by_name["preferences"].inputs and "tune-judge" not in by_name["evaluate"].inputs
    assert by_name["preferences"].settings["judge"]["design"] == "rule"


def test_a_trained_judge_without_its_weights_fails_when_the_config_loads(tmp_path, ran):
    with pytest.raises(SelfAlignError, match=r"judge.weights: .*missing.json not found \(the probe judge's weights\)"):
        demo(tmp_path, "judge.design=probe", f"judge.weights={tmp_path / 'missing.json'}")
    with pytest.raises(SelfAlignError, match="weights: a probe judge needs the file or folder of its trained weights"):
        demo(tmp_path, "judge.design=probe")
    assert ran == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.settings.prompt_format=plain", "training.settings.prompt_format is set by the pipeline from "
         "model.prompt_format; set it there"),
        ("training.settings.system_prompt=Kind", "training.settings.system_prompt is set by the pipeline from "
         "model.system_prompt"),
        ("training.settings.dtype=bfloat16", "training.settings.dtype is set by the pipeline from model.dtype"),
        ("rounds=2 training.dpo=false training.dpo_from_sft=false", "rounds: 2 repeats preferences -> DPO"),
    ],
)  # fmt: skip
def test_settings_that_model_owns_or_that_nothing_would_use_are_config_errors(tmp_path, ran, override, message):
    """These were once accepted and then silently overwritten (prompt_format, system_prompt) or planned for nothing."""
    with pytest.raises(SelfAlignError, match=re.escape(message)):
        run_pipeline(demo(tmp_path, *override.split(" ")))
    assert ran == []


def test_model_dtype_and_4bit_reach_training_where_model_sets_them(tmp_path):
    from selfalign.pipeline.config import training_settings as _training_settings

    default = _training_settings(demo(tmp_path))
    assert "dtype" not in default and "quantization" not in default
    settings = _training_settings(demo(tmp_path, "model.dtype=bfloat16", "model.load_in_4bit=true"))
    assert settings["dtype"] == "bfloat16" and settings["quantization"] == "4bit"


def test_dry_run_of_only_one_stage_says_what_the_run_would_do(tmp_path, ran):
    """`--only preferences` on a fresh folder stops at preferences (tune-judge has not run): the dry run said `run`,
    and printed folders named from placeholder input hashes that the real run would never use."""
    from selfalign.pipeline.engine import print_plan

    config = demo(tmp_path)
    plan, _ = run_pipeline(config, only="preferences", dry_run=True)
    by_name = {p.stage.name: p for p in plan}
    assert by_name["preferences"].blocked_by == ["tune-judge"]
    assert "preferences      blocked needs tune-judge, which has not run" in print_plan(plan)
    with pytest.raises(SelfAlignError, match="stage preferences needs tune-judge, which has not run"):
        run_pipeline(config, only="preferences")
    plan, _ = run_pipeline(config, dry_run=True)  # the whole run: nothing is blocked, later folders are not known yet
    assert all(not p.blocked_by for p in plan) and plan[0].folder is not None
    assert {p.stage.name for p in plan if p.folder is None} == {"preferences", "sft", "dpo", "evaluate", "report"}
    assert "(folder named once its inputs exist)" in print_plan(plan)
