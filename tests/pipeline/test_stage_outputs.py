"""The typed values the stages of `selfalign run` hand each other (pipeline/outputs.py): what each library entry point
receives from the stages before it, and that a cached stage hands on the same values as one that ran."""

import json

import pytest

from selfalign.errors import SelfAlignError
from selfalign.pipeline.config import load_run_config
from selfalign.pipeline.engine import run_stages
from selfalign.pipeline.outputs import PreferenceDataset, TrainedAdapter, TunedJudge
from selfalign.pipeline.stages import plan_stages


@pytest.fixture
def received(monkeypatch):
    """The library entry points the stages call, replaced: each keeps what it was given and writes the files its
    stage's outputs are read from; the DPO one builds TRL's DPOConfig as run_dpo does."""
    calls: dict[str, list] = {}

    def tune_judge(config, out, model=None):
        calls.setdefault("tune-judge", []).append(config)
        (out / "judge.yaml").write_text("design: rule\n")
        (out / "results.json").write_text('{"results": []}')

    def run_preferences(config, out_dir=None, models=None, push_to_hub=None):
        calls.setdefault("preferences", []).append(config)
        dataset = out_dir / "dataset"
        dataset.mkdir()
        pair = {"prompt": "p", "chosen": "c", "rejected": "r", "pair_type": "refusal"}
        for split in ("train", "eval"):
            (dataset / f"{split}.jsonl").write_text(json.dumps(pair) + "\n")
        (dataset / "funnel.json").write_text('{"kept": {"refusal": 1, "helpful": 0}}')

    def trainer(method):
        def train(config, data, out, merge=False, callbacks=None):
            arguments = None
            if method == "dpo":
                from trl import DPOConfig

                from selfalign.training.common import trainer_arguments

                arguments = trainer_arguments(DPOConfig, config, out, config.dpo)
            calls.setdefault(method, []).append((config, data, arguments))
            out.mkdir()
            (out / "metrics.json").write_text(json.dumps({"stage": method, "train": {"tokens": 10.0}}))

        return train

    def evaluate(config, out_dir, earlier=()):
        calls.setdefault("evaluate", []).append(config)
        (out_dir / "metrics.json").write_text('{"variants": ["base"]}')

    def write_run_report(folders, folder):
        calls.setdefault("report", []).append(folders)
        (folder / "report.md").write_text("# report\n")

    monkeypatch.setattr("selfalign.judging.tuning.tune_judge", tune_judge)
    monkeypatch.setattr("selfalign.preferences.pipeline.run_preferences", run_preferences)
    monkeypatch.setattr("selfalign.training.sft.run_sft", trainer("sft"))
    monkeypatch.setattr("selfalign.training.dpo.run_dpo", trainer("dpo"))
    monkeypatch.setattr("selfalign.evaluation.run.evaluate", evaluate)
    monkeypatch.setattr("selfalign.reporting.run_report.write_run_report", write_run_report)
    return calls


def test_each_stage_gets_the_typed_outputs_of_the_stages_before_it(tmp_path, received):
    """The demo's `training.settings.dpo.learning_rate` reaches TRL's DPOConfig through typed values only, and DPO
    starts from the SFT stage's adapter."""
    config = load_run_config(None, [f"out={tmp_path}", "training.settings.dpo.learning_rate=3e-4"])
    _, state = run_stages(plan_stages(config), tmp_path)
    tuned, dataset, sft, dpo = (state.outputs[name] for name in ("tune-judge", "preferences", "sft", "dpo"))
    assert isinstance(tuned, TunedJudge) and tuned.judge.design == "rule"
    assert isinstance(dataset, PreferenceDataset) and dataset.funnel["kept"]["refusal"] == 1
    assert isinstance(sft, TrainedAdapter) and (sft.method, dpo.method) == ("sft", "dpo")

    (preferences,) = received["preferences"]
    assert preferences.judge == tuned.judge and preferences.judge_results == str(tuned.results)
    assert preferences.policy == config.model and preferences.seed == config.seed
    assert preferences.out_dir == str(dataset.folder)

    (sft_call,) = received["sft"]
    assert sft_call[1] == str(dataset.train) and sft_call[0].eval_data == str(dataset.eval)
    ((training, data, arguments),) = received["dpo"]
    assert training.dpo.sft_adapter == str(sft.adapter) == str(sft.folder / "training")
    assert data == str(dataset.train)
    assert training.dpo.learning_rate == arguments.learning_rate == 3e-4

    (evaluation,) = received["evaluate"]
    assert evaluation.adapters == {"sft": str(sft.adapter), "dpo": str(dpo.adapter)}
    assert evaluation.judge == tuned.judge and evaluation.model == config.model
    assert received["report"] == [{name: folder for name, folder in state.folders.items() if name != "report"}]
    assert state.records["sft"]["tokens"] == {"trained": 10}

    plan, again = run_stages(plan_stages(config), tmp_path)
    assert not any(item.will_run for item in plan) and len(received["dpo"]) == 1
    assert again.outputs == state.outputs  # a cached stage hands on what it handed on when it ran


def test_the_configured_judge_and_no_adapter_where_tune_judge_is_not_used(tmp_path, received):
    overrides = [f"out={tmp_path}", "use_tuned_judge=false", "judge.design=rule", "training.dpo_from_sft=false"]
    config = load_run_config(None, overrides)
    _, state = run_stages(plan_stages(config), tmp_path)
    (preferences,) = received["preferences"]
    assert preferences.judge == config.judge and preferences.judge_results is None
    ((training, _, _),) = received["dpo"]
    assert training.dpo.sft_adapter is None  # DPO from the base model
    assert received["evaluate"][0].judge == config.judge


def test_a_folder_without_the_file_its_outputs_are_read_from_is_a_one_line_error(tmp_path):
    with pytest.raises(SelfAlignError, match=r"training/metrics.json: not found; the stage that writes it"):
        TrainedAdapter.from_folder(tmp_path)
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "funnel.json").write_text("{\n  oops")
    with pytest.raises(SelfAlignError, match=r"dataset/funnel.json: line 2: not JSON"):
        PreferenceDataset.from_folder(tmp_path)
