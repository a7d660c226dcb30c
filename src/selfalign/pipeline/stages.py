"""The stages of `selfalign run`, built from a RunConfig.

Each stage is a function `run(settings, inputs, out) -> outputs`: its typed settings, the typed outputs of the stages
it reads (pipeline/outputs.py, by stage name), and its own folder. It calls one library entry point and returns what
it hands on; `plan_stages` wires them and says what each stage's cache key covers.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import yaml

from selfalign.config import StrictModel, with_values
from selfalign.data.jsonl import read_jsonl, write_text_atomic
from selfalign.evaluation.run import EvaluateConfig
from selfalign.judging.tuning import TIMING_FILES, TuneJudgeConfig
from selfalign.pipeline.config import RunConfig, training_settings
from selfalign.pipeline.engine import Stage
from selfalign.pipeline.launcher import LauncherSettings
from selfalign.pipeline.outputs import (
    ADAPTER,
    Evaluation,
    PreferenceDataset,
    RunReport,
    StageOutputs,
    TrainedAdapter,
    TunedJudge,
)
from selfalign.preferences.config import PreferencesConfig
from selfalign.preferences.pipeline import WORKING_FILES as PREFERENCES_WORKING_FILES
from selfalign.training.config import RUN_RECORDS as TRAINING_RUN_RECORDS
from selfalign.training.config import TrainingConfig

# Stage settings are dumped for cache keys with this context: model options that cannot change an output (servers,
# concurrency, retries) are left out, so adding a server reruns nothing.
CACHE_KEY = {"cache_key": True}
CHECKPOINTS = ("*checkpoint-*",)  # what training writes to resume from: not part of a stage's output
TRAINING_UNHASHED = CHECKPOINTS + tuple(f"{ADAPTER}/{name}" for name in TRAINING_RUN_RECORDS)

Inputs = dict[str, StageOutputs]  # the outputs of the stages a stage reads, by stage name
OutputsT = TypeVar("OutputsT", TunedJudge, PreferenceDataset, TrainedAdapter, Evaluation, RunReport)


def plan_stages(config: RunConfig) -> list[Stage]:
    model = config.model.model_dump(mode="json", context=CACHE_KEY)
    stages: list[Stage] = []
    judge_inputs: list[str] = []
    if config.tune_judge is not None:
        tune = with_values(config.tune_judge, model=config.model)
        # tune-judge generates nothing worth counting: its judges read log-probabilities of fixed answers
        stages.append(
            Stage(
                "tune-judge", "tune-judge", [], tune.model_dump(mode="json", context=CACHE_KEY),
                partial(run_tune_judge, tune), TunedJudge.from_folder, unhashed=CHECKPOINTS + TIMING_FILES,
            )
        )  # fmt: skip
        judge_inputs = ["tune-judge"] if config.use_tuned_judge else []

    adapters: list[str] = []  # the training stages; each one's name is its variant's name in the evaluation
    launcher = config.training.launcher
    previous_adapter_stage: str | None = None
    for round_number in range(1, config.rounds + 1):
        suffix = "" if round_number == 1 else f"-round{round_number}"
        policy_inputs = [previous_adapter_stage] if previous_adapter_stage else []
        # the policy and judge as configured; tune-judge's judge and the previous round's adapter replace them when
        # the stage runs (run_preferences), which is why the key covers the judge only where tune-judge does not
        preferences = with_values(
            config.preferences, seed=config.seed + round_number - 1, policy=config.model, judge=config.judge
        )
        settings = {
            "preferences": preferences.model_dump(
                mode="json", context=CACHE_KEY, exclude={"judge", "policy", "out_dir"}
            ),
            "model": model,
            "judge": None if judge_inputs else config.judge.model_dump(mode="json", context=CACHE_KEY),
        }
        stages.append(
            Stage(
                f"preferences{suffix}",
                "preferences",
                judge_inputs + policy_inputs,
                settings,
                partial(run_preferences, preferences),
                PreferenceDataset.from_folder,
                count_preference_tokens,
                unhashed=PREFERENCES_WORKING_FILES,
            )
        )

        if round_number == 1 and config.training.sft:
            stages.append(
                Stage(
                    "sft",
                    "sft",
                    ["preferences"],
                    _training_stage_settings(config, "sft"),
                    partial(run_sft, TrainingStageSettings(training=config.training_config, launcher=launcher)),
                    TrainedAdapter.from_folder,
                    count_training_tokens,
                    unhashed=TRAINING_UNHASHED,
                )
            )
            adapters.append("sft")
        if config.training.dpo:
            start_from = previous_adapter_stage or ("sft" if config.training.dpo_from_sft else None)
            name = f"dpo{suffix}"
            stages.append(
                Stage(
                    name,
                    "dpo",
                    [f"preferences{suffix}", *([start_from] if start_from else [])],
                    _training_stage_settings(config, "dpo"),
                    partial(run_dpo, TrainingStageSettings(training=config.training_config, launcher=launcher)),
                    TrainedAdapter.from_folder,
                    count_training_tokens,
                    unhashed=TRAINING_UNHASHED,
                )
            )
            adapters.append(name)
            previous_adapter_stage = name
        elif round_number < config.rounds:
            previous_adapter_stage = "sft"

    evaluation = with_values(config.evaluation, model=config.model, judge=config.judge)
    settings = {
        "evaluation": evaluation.model_dump(mode="json", context=CACHE_KEY, exclude={"adapters", "judge"}),
        "judge": None if judge_inputs else config.judge.model_dump(mode="json", context=CACHE_KEY),
    }
    stages.append(
        Stage(
            "evaluate",
            "evaluate",
            judge_inputs + adapters,
            settings,
            partial(run_evaluation, evaluation),
            Evaluation.from_folder,
            count_evaluation_tokens,
        )
    )
    report_inputs = [s.name for s in stages]
    stages.append(Stage("report", "report", report_inputs, {}, partial(run_report, None), RunReport.from_folder))
    return stages


def _training_key(config: RunConfig, kind: str) -> dict[str, Any]:
    """The settings a training stage's key covers: the run's training settings as written (pipeline.config.
    training_settings) but the other method's section (`sft:` or `dpo:`), so that a DPO learning rate leaves the SFT
    adapter cached. SFT settings still reach a DPO that starts from the SFT adapter, through that adapter's hash
    among its inputs."""
    other = "dpo" if kind == "sft" else "sft"
    return {key: value for key, value in training_settings(config).items() if key != other}


def _training_stage_settings(config: RunConfig, kind: str) -> dict[str, Any]:
    """What a training stage's key hashes: the preset, its training settings and, when training runs in several
    processes, their number: data-parallel processes each take `batch_size` examples a step, so their number changes
    the effective batch and the adapter. Where and how they run (the launcher, its accelerate file, DDP or FSDP) is
    left out, like a server's address; one process, as a run without a launcher trains, adds nothing, so those keys
    stay what they were."""
    settings = {"preset": config.training.preset, "training": _training_key(config, kind), "stage": kind}
    launcher = config.training.launcher
    if launcher is not None and launcher.processes > 1:
        settings["processes"] = launcher.processes
    return settings


def only_input(inputs: Inputs, kind: type[OutputsT]) -> OutputsT | None:
    """The one input of this type (a stage reads at most one judge, one dataset, one adapter to start from)."""
    found = [value for value in inputs.values() if isinstance(value, kind)]
    if len(found) > 1:
        raise ValueError(f"a stage got {len(found)} inputs of type {kind.__name__}; the pipeline wires one at most")
    return found[0] if found else None


# ---- the stages -------------------------------------------------------------------------------------------------


def run_tune_judge(settings: TuneJudgeConfig, inputs: Inputs, out: Path) -> TunedJudge:
    from selfalign.judging.tuning import tune_judge

    tune_judge(settings, out)
    return TunedJudge.from_folder(out)


def run_preferences(settings: PreferencesConfig, inputs: Inputs, out: Path) -> PreferenceDataset:
    """respond -> judge -> revise -> helpful -> build, with tune-judge's judge (it judges with the run's model) and
    the previous round's adapter as the policy, where those are inputs."""
    from selfalign.preferences.pipeline import run_preferences as make_preferences

    update: dict[str, Any] = {"out_dir": str(out)}
    if (tuned := only_input(inputs, TunedJudge)) is not None:
        update.update(judge=tuned.judge, judge_results=str(tuned.results))
    if (policy := only_input(inputs, TrainedAdapter)) is not None:
        update["policy"] = with_values(settings.policy, adapter=str(policy.adapter))
    make_preferences(with_values(settings, **update), out)
    return PreferenceDataset.from_folder(out)


class TrainingStageSettings(StrictModel):
    """What a training stage trains with, and where: in this process, or in the children `launcher` starts."""

    training: TrainingConfig
    launcher: LauncherSettings | None = None


def run_sft(settings: TrainingStageSettings, inputs: Inputs, out: Path) -> TrainedAdapter:
    return _train("sft", settings, inputs, out)


def run_dpo(settings: TrainingStageSettings, inputs: Inputs, out: Path) -> TrainedAdapter:
    """DPO from the base model, or from the adapter among its inputs (the SFT one, or the previous round's)."""
    return _train("dpo", settings, inputs, out)


def _train(kind: str, settings: TrainingStageSettings, inputs: Inputs, out: Path) -> TrainedAdapter:
    dataset = only_input(inputs, PreferenceDataset)
    assert dataset is not None  # plan_stages gives every training stage its preferences stage
    training = settings.training
    if dataset.eval is not None:
        training = with_values(training, eval_data=str(dataset.eval))
    if (start_from := only_input(inputs, TrainedAdapter)) is not None:
        training = with_values(training, dpo=with_values(training.dpo, sft_adapter=str(start_from.adapter)))
    # what this stage trains with, for `selfalign train --config` to repeat it; a launched child trains from it
    write_text_atomic(out / "training.yaml", yaml.safe_dump(training.model_dump(mode="json"), sort_keys=False))
    if settings.launcher is not None:
        from selfalign.pipeline.launcher import launch_training
        from selfalign.training.common import model_dtype

        launch_training(settings.launcher, kind, out / "training.yaml", str(dataset.train), out / ADAPTER,
                        dtype=model_dtype(training))  # fmt: skip
    else:
        if kind == "sft":
            from selfalign.training.sft import run_sft as train
        else:
            from selfalign.training.dpo import run_dpo as train
        train(training, str(dataset.train), out / ADAPTER)
    return TrainedAdapter.from_folder(out)


def run_evaluation(settings: EvaluateConfig, inputs: Inputs, out: Path) -> Evaluation:
    """The base model and every adapter among the inputs, each named by its stage; judged by tune-judge's judge
    where it is an input. What the run's other evaluations made from the same prompts and settings (the base
    model's answers and verdicts, an adapter's that two points of a sweep share) is copied, not made again."""
    from selfalign.evaluation.run import evaluate

    adapters = {name: str(value.adapter) for name, value in inputs.items() if isinstance(value, TrainedAdapter)}
    tuned = only_input(inputs, TunedJudge)
    earlier = sorted(folder for folder in out.parent.iterdir() if folder.is_dir())  # evaluate() leaves out `out`
    evaluate(with_values(settings, adapters=adapters, judge=tuned.judge if tuned else settings.judge), out, earlier)
    return Evaluation.from_folder(out)


def run_report(settings: None, inputs: Inputs, out: Path) -> RunReport:
    """The report reads the stages' files (so it can be rebuilt from a run folder alone)."""
    from selfalign.reporting.run_report import write_run_report

    write_run_report({name: value.folder for name, value in inputs.items()}, out)
    return RunReport.from_folder(out)


# ---- token counts, read from the files each stage wrote ---------------------------------------------------------


def _sum_column(path: Path, column: str) -> int | None:
    """Sum of a JSONL file's integer column; None when the file or the column is missing (a stand-in stage, or
    rows written before the column existed)."""
    if not path.is_file():
        return None
    values = [row[column] for row in read_jsonl(path) if isinstance(row.get(column), int)]
    return sum(values) if values else None


def count_preference_tokens(folder: Path) -> dict[str, Any] | None:
    """Tokens the policy generated: answers, revisions (and critiques), refusals for the helpful mix. The judge is
    not counted: its rows do not record tokens, and a log-probability judge generates none."""
    from selfalign.preferences.stage_files import HELPFUL, RESPONSES, REVISIONS, stage_path

    stage_dir = folder / "stages"
    per_step = {
        "respond": _sum_column(stage_path(stage_dir, RESPONSES), "response_tokens"),
        "respond bare": _sum_column(stage_path(stage_dir, RESPONSES), "bare_response_tokens"),  # principle-driven
        "critique": _sum_column(stage_path(stage_dir, REVISIONS), "critique_tokens"),
        "revise": _sum_column(stage_path(stage_dir, REVISIONS), "revision_tokens"),
        "helpful": _sum_column(stage_path(stage_dir, HELPFUL), "refusal_tokens"),
    }
    counted = {step: count for step, count in per_step.items() if count is not None}
    return {"generated": sum(counted.values()), "per_step": counted} if counted else None


def count_training_tokens(folder: Path) -> dict[str, Any] | None:
    """Tokens the trainer fed the model (attention-mask tokens), as TRL last logged them (`num_tokens`)."""
    try:
        metrics = json.loads((folder / "training" / "metrics.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    tokens = metrics.get("train", {}).get("tokens")
    return {"trained": round(tokens)} if isinstance(tokens, (int, float)) and tokens > 0 else None


def count_evaluation_tokens(folder: Path) -> dict[str, Any] | None:
    """Tokens the base model and every adapter generated as answers; the judges' tokens are not counted."""
    generated = _sum_column(folder / "samples.jsonl", "completion_tokens")
    return None if generated is None else {"generated": generated}


def copy_report(report: RunReport, out: Path) -> None:
    """The final report also lands at the top of the run folder, where people look first."""
    for path in report.files:
        shutil.copyfile(path, out / path.name)
