"""The stages of `selfalign run`, built from a RunConfig. Each body calls one library entry point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from selfalign.config import with_values
from selfalign.data.jsonl import read_jsonl, write_text_atomic
from selfalign.pipeline.config import RunConfig, training_settings
from selfalign.pipeline.engine import Stage

ADAPTER = "training"  # a training stage's adapter, tokenizer, metrics and checkpoints, under its folder
# Stage settings are dumped for cache keys with this context: model options that cannot change an output (servers,
# concurrency, retries) are left out, so adding a server reruns nothing.
CACHE_KEY = {"cache_key": True}
CHECKPOINTS = ("*checkpoint-*",)  # what training writes to resume from: not part of a stage's output


def plan_stages(config: RunConfig) -> list[Stage]:
    model = config.model.model_dump(mode="json", context=CACHE_KEY)
    stages: list[Stage] = []
    judge_inputs: list[str] = []
    if config.tune_judge is not None:
        tune = with_values(config.tune_judge, model=config.model)
        # tune-judge generates nothing worth counting: its judges read log-probabilities of fixed answers
        stages.append(
            Stage(
                "tune-judge", "tune-judge", [], tune.model_dump(mode="json", context=CACHE_KEY), _tune_judge_body(tune),
                unhashed=CHECKPOINTS,
            )
        )
        judge_inputs = ["tune-judge"] if config.use_tuned_judge else []

    adapters: dict[str, str] = {}  # variant name -> stage name
    previous_adapter_stage: str | None = None
    for round_number in range(1, config.rounds + 1):
        suffix = "" if round_number == 1 else f"-round{round_number}"
        policy_inputs = [previous_adapter_stage] if previous_adapter_stage else []
        preferences = with_values(config.preferences, seed=config.seed + round_number - 1)
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
                _preferences_body(config, preferences, previous_adapter_stage),
                count_preference_tokens,
                # the sub-stages' resumable files (preferences.stage_files) and its record of timings
                unhashed=("stages/*", "*/stages/*", "preferences.json"),
            )
        )

        if round_number == 1 and config.training.sft:
            stages.append(
                Stage(
                    "sft",
                    "sft",
                    ["preferences"],
                    _training_stage_settings(config, "sft"),
                    _training_body(config, "sft", "preferences", None),
                    count_training_tokens,
                    unhashed=CHECKPOINTS,
                )
            )
            adapters["sft"] = "sft"
        if config.training.dpo:
            start_from = previous_adapter_stage or ("sft" if config.training.dpo_from_sft else None)
            name = f"dpo{suffix}"
            inputs = [f"preferences{suffix}", *([start_from] if start_from else [])]
            stages.append(
                Stage(
                    name,
                    "dpo",
                    inputs,
                    _training_stage_settings(config, "dpo"),
                    _training_body(config, "dpo", f"preferences{suffix}", start_from),
                    count_training_tokens,
                    unhashed=CHECKPOINTS,
                )
            )
            adapters[name] = name
            previous_adapter_stage = name
        elif round_number < config.rounds:
            previous_adapter_stage = "sft"

    evaluation = with_values(config.evaluation, model=config.model)
    settings = {
        "evaluation": evaluation.model_dump(mode="json", context=CACHE_KEY, exclude={"adapters", "judge"}),
        "judge": None if judge_inputs else config.judge.model_dump(mode="json", context=CACHE_KEY),
    }
    stages.append(
        Stage(
            "evaluate",
            "evaluate",
            judge_inputs + list(adapters.values()),
            settings,
            _evaluate_body(config, evaluation, adapters),
            count_evaluation_tokens,
        )
    )
    report_inputs = [s.name for s in stages]
    stages.append(Stage("report", "report", report_inputs, {}, _report_body(report_inputs)))
    return stages


# ---- bodies ---------------------------------------------------------------------------------------------------


def _tune_judge_body(tune: Any):
    def body(inputs: dict[str, Path], folder: Path) -> None:
        from selfalign.judging.tuning import tune_judge

        tune_judge(tune, folder)

    return body


def judge_for(config: RunConfig, inputs: dict[str, Path]) -> Any:
    """tune-judge's chosen judge where it ran, else the configured one; it judges with the run's model."""
    from selfalign.judging.judge import load_judge_file

    if "tune-judge" in inputs:
        return load_judge_file(inputs["tune-judge"] / "judge.yaml")
    return config.judge


def adapter_folder(stage_folder: Path) -> Path:
    """A training stage's output: the PEFT adapter in its `training/` folder (training.common.save_outputs)."""
    return stage_folder / ADAPTER


def _preferences_body(config: RunConfig, preferences: Any, policy_adapter_stage: str | None):
    def body(inputs: dict[str, Path], folder: Path) -> None:
        from selfalign.preferences.pipeline import run_preferences

        policy = config.model
        if policy_adapter_stage is not None:
            policy = with_values(policy, adapter=str(adapter_folder(inputs[policy_adapter_stage])))
        update: dict[str, Any] = {"policy": policy, "judge": judge_for(config, inputs), "out_dir": str(folder)}
        if "tune-judge" in inputs:
            update["judge_results"] = str(inputs["tune-judge"] / "results.json")
        run_preferences(with_values(preferences, **update), folder)

    return body


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


def _training_body(config: RunConfig, kind: str, data_stage: str, start_from: str | None):
    def body(inputs: dict[str, Path], folder: Path) -> None:
        dataset = inputs[data_stage] / "dataset"
        training = config.training_config
        eval_file = dataset / "eval.jsonl"
        if eval_file.is_file() and eval_file.stat().st_size > 0:
            training = with_values(training, eval_data=str(eval_file))
        if kind == "dpo" and start_from is not None:
            dpo = with_values(training.dpo, sft_adapter=str(adapter_folder(inputs[start_from])))
            training = with_values(training, dpo=dpo)
        # what this stage trains with, for `selfalign train --config` to repeat it; a launched child trains from it
        write_text_atomic(folder / "training.yaml", yaml.safe_dump(training.model_dump(mode="json"), sort_keys=False))
        if config.training.launcher is not None:
            from selfalign.pipeline.launcher import launch_training

            launch_training(config.training.launcher, kind, folder / "training.yaml", str(dataset / "train.jsonl"),
                            folder / ADAPTER)  # fmt: skip
            return
        if kind == "sft":
            from selfalign.training.sft import run_sft as train
        else:
            from selfalign.training.dpo import run_dpo as train
        train(training, str(dataset / "train.jsonl"), folder / ADAPTER)

    return body


def _evaluate_body(config: RunConfig, evaluation: Any, adapters: dict[str, str]):
    def body(inputs: dict[str, Path], folder: Path) -> None:
        from selfalign.evaluation.run import evaluate

        variants = {variant: str(adapter_folder(inputs[stage])) for variant, stage in adapters.items()}
        evaluate(with_values(evaluation, adapters=variants, judge=judge_for(config, inputs)), folder)

    return body


def _report_body(stage_names: list[str]):
    def body(inputs: dict[str, Path], folder: Path) -> None:
        from selfalign.reporting.run_report import write_run_report

        write_run_report(inputs, folder)

    return body


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


def copy_report(report_folder: Path, out: Path) -> None:
    """The final report also lands at the top of the run folder, where people look first."""
    for name in ("report.md", "report.html"):
        if (report_folder / name).is_file():
            shutil.copyfile(report_folder / name, out / name)
