"""`selfalign run`: the whole self-alignment loop as cached, resumable stages."""

from __future__ import annotations

import time
from pathlib import Path

from selfalign.pipeline.config import RunConfig
from selfalign.pipeline.engine import STAGE_ORDER, PlannedStage, RunState, build_manifest, run_stages, write_manifest
from selfalign.pipeline.lock import hold_run_folder
from selfalign.pipeline.stages import copy_report, plan_stages

MODEL_STAGES = {"tune-judge", "preferences", "sft", "dpo", "evaluate"}  # the kinds that load the model
TRAINING_STAGES = {"sft", "dpo"}


def preflight(config: RunConfig, running: set[str] | None = None) -> None:
    """Fail on bad data references and templates, and, where a stage of these kinds will run (`running`; None: any),
    on 4-bit weights this machine cannot load or a launch it has no devices for, before any stage spends time. A
    cached run checked on another machine (a laptop reading a GPU run's report) needs neither."""
    from selfalign.data.loading import load_rows
    from selfalign.errors import SelfAlignError
    from selfalign.evaluation.run import check_twins
    from selfalign.judging.templates import load_template
    from selfalign.models.loading import four_bit_unavailable
    from selfalign.preferences.respond import load_prompt_rows

    running = set(STAGE_ORDER) if running is None else running
    reason = four_bit_unavailable() if config.model.load_in_4bit and running & MODEL_STAGES else None
    if reason is not None:
        raise SelfAlignError(
            f"model.load_in_4bit: true {reason}; model.load_in_4bit=false loads full-precision weights"
        )
    for prompt_set in config.preferences.prompts:
        load_prompt_rows(prompt_set)
    for reference in (config.evaluation.harmful, config.evaluation.benign, config.evaluation.helpful):
        if reference:
            load_rows(reference, ["prompt"])
    check_twins(config.evaluation.benign, config.evaluation.harmful)
    if config.training.launcher is not None and running & TRAINING_STAGES:
        from selfalign.pipeline.launcher import check_devices

        check_devices(config.training.launcher)
    if config.tune_judge is not None:
        for template in config.tune_judge.templates:
            load_template(template)
    else:
        load_template(config.judge.template)


def run_pipeline(
    config: RunConfig, from_stage: str | None = None, only: str | None = None, dry_run: bool = False,
    wait: bool = False,
) -> tuple[list[PlannedStage], dict | None]:  # fmt: skip
    """Run the loop (or, with dry_run, only plan it); returns the plan and the manifest written to run.json. A run
    holds its folder's lock (`<out>/.lock`) until run.json is written, so a second run on the folder stops before
    its first stage, or waits with `wait`; a dry run writes nothing and takes no lock."""
    out = Path(config.out)
    stages = plan_stages(config)
    if dry_run:
        plan, _ = run_stages(stages, out, from_stage, only, dry_run=True)
        return plan, None
    planned, _ = run_stages(stages, out, from_stage, only, dry_run=True)
    preflight(config, {item.stage.kind for item in planned if item.will_run})
    with hold_run_folder(out, wait=wait):
        started = time.perf_counter()
        state = RunState()
        try:
            plan, state = run_stages(stages, out, from_stage, only, state=state)
        except Exception as exc:
            # what finished stays cached; run.json says which stage stopped the run and why, in one line
            if state.failed is not None:
                error = (str(exc).splitlines() or [type(exc).__name__])[0]
                seconds = time.perf_counter() - started
                write_manifest(out, build_manifest(config, state.plan, state, out, seconds, error=error))
            raise
        if "report" in state.outputs:
            copy_report(state.outputs["report"], out)
        manifest = build_manifest(config, plan, state, out, time.perf_counter() - started)
        write_manifest(out, manifest)
        return plan, manifest
