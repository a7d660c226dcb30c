"""kill -9 at random (seeded) points of every stage of `selfalign run`, then the same command again: the stage's
outputs equal an uninterrupted run's and no row of a progress file is lost or written twice.

Setup: one uninterrupted reference run (scripted backend for every model call, the tiny random Gemma 3 for SFT and
DPO) counts the kill points ("events", see kill_runner.py) of each stage. A trial copies the finished reference
run, deletes the folder of the stage under test (so its inputs stay cached) and runs `selfalign run config.yaml
--only STAGE` in a forked child that SIGKILLs itself at a randomly chosen event of that stage; then the same command
runs to the end and the stage folder is compared with the reference's.

What "identical" means, per file (established by diffing two uninterrupted runs):
- every file of every stage must be byte-identical, except those in VOLATILE below, which hold wall-clock times
  (or, for training, pickled arguments and TRL's timing logs). For those the deterministic parts are compared.
- the stage folder has the same name: its key hashes its settings and its inputs' contents, so a resumed stage that
  gave a different output would also change every downstream key.
- training: a resumed run restarts from its last checkpoint (or from scratch when killed before the first one);
  the adapter weights are compared bitwise, as the code promises a seeded, deterministic run (two uninterrupted
  runs give bitwise-equal weights), plus the step count and the per-step losses (relative 1e-4, as
  tests/training/test_sft.py compares a resumed run).
"""

from __future__ import annotations

import json
import multiprocessing
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from selfalign.judging.tuning import TIMING_FILES
from selfalign.pipeline.outputs import ADAPTER
from selfalign.preferences.pipeline import RUN_RECORD
from selfalign.training.config import RUN_RECORDS
from tests.reliability import kill_runner
from tests.reliability.tally import count

SEED = 20261130
STAGES = ["tune-judge", "preferences", "sft", "dpo", "evaluate", "report"]
TRIALS = {"tune-judge": 3, "preferences": 8, "sft": 3, "dpo": 3, "evaluate": 4, "report": 3}  # 24 in all
CHILD_TIMEOUT_S = 180

# files that hold timings even in two uninterrupted runs; their deterministic content is checked apart. Each stage
# keeps these out of its output hash, so a resumed stage's hash must equal the uninterrupted one's.
TRAINING_RECORDS = {f"{ADAPTER}/{name}" for name in RUN_RECORDS}  # times, TRL's log history, pickled arguments
VOLATILE = {
    "tune-judge": set(TIMING_FILES),  # seconds per item; results.json has none
    "preferences": {RUN_RECORD},
    "sft": TRAINING_RECORDS,
    "dpo": TRAINING_RECORDS,
    "evaluate": set(),
    "report": set(),
}
TIMING_KEYS = {
    "seconds", "seconds_per_item", "train_seconds", "runtime_s", "samples_per_s", "tokens_per_s", "finished", "started"
}  # fmt: skip

RUN_CONFIG = {
    "out": "run",  # relative: the paths written into outputs are the same in the reference and in every trial
    "model": {
        "backend": "scripted",
        "prompt_format": "plain",
        "options": {
            "rules": [
                ["Rewrite the reply", "It would hurt people, so please do not do this."],
                ["Refuse the following request", "Please ask me something else."],
            ],
            "default": "Here is a complete answer.",
        },
    },
    "tune_judge": {"limit": 4, "modes": ["logprob"], "templates": ["one-shot", "complies"],
                   "ensemble": ["one-shot", "complies"]},
    # tune-judge runs (and is killed) like every stage, but the stages judge with the no-model rule: a judge chosen on
    # 4 scripted items may judge every revision harmful, and then the preferences stage rightly stops with no pairs
    "use_tuned_judge": False,
    "judge": {"design": "rule"},
    "preferences": {
        "prompts": [
            {"data": "builtin:redteam:train", "source": "harmful", "limit": 6},
            {"data": "builtin:helpful:train", "source": "benign", "limit": 6},
        ],
        "chunk_size": 2,
        "eval_fraction": 0.3,
    },
    "training": {
        "preset": "cpu-small",
        "dpo_from_sft": False,
        "settings": {"max_steps": 4, "batch_size": 2, "max_length": 384, "save_steps": 2, "logging_steps": 1,
                     "progress_bar": False, "gradient_checkpointing": False},
    },
    "evaluation": {"limit": 4, "generation": {"max_new_tokens": 16}, "bootstrap_samples": 100, "chunk_size": 2},
}  # fmt: skip


def forkserver() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(kill_runner.PRELOAD)
    return context


def selfalign_child(root: Path, argv: list[str], kill: tuple[str, int, bool] | None = None, counts: Path | None = None
                    ) -> int:  # fmt: skip
    """Run `selfalign ARGV` in a forked child in `root`; returns its exit code (-9 when it was killed)."""
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = root / "child.log"
    child = forkserver().Process(
        target=kill_runner.run_selfalign,
        args=(argv, str(root), str(log), env, kill, str(counts) if counts else None),
    )
    child.start()
    child.join(CHILD_TIMEOUT_S)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"selfalign {' '.join(argv)} did not finish in {CHILD_TIMEOUT_S} s; log: {log}")
    return child.exitcode


@dataclass
class Reference:
    root: Path
    kill_points: dict[str, list[tuple[int, bool]]]  # stage -> [(n-th event, torn write)]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    root = tmp_path_factory.mktemp("reference")
    config = {**RUN_CONFIG, "model": {**RUN_CONFIG["model"], "model": str(tiny_model_dir)}}
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    counts_file = root / "events.json"
    code = selfalign_child(root, ["run", "config.yaml"], counts=counts_file)
    assert code == 0, (root / "child.log").read_text()[-3000:]
    events = json.loads(counts_file.read_text())
    rng = random.Random(SEED)
    kill_points = {}
    for stage in STAGES:
        assert events.get(stage, 0) >= TRIALS[stage], f"{stage}: only {events.get(stage, 0)} kill points"
        points = sorted(rng.sample(range(1, events[stage] + 1), TRIALS[stage]))
        kill_points[stage] = [(point, rng.random() < 0.5) for point in points]
    return Reference(root, kill_points)


def stage_folder(run: Path, stage: str) -> Path:
    folders = sorted(path for path in (run / stage).iterdir() if path.is_dir())
    assert len(folders) == 1, folders
    return folders[0]


def output_files(folder: Path) -> dict[str, Path]:
    """Every file of a stage folder but checkpoints (a resumed run has written some of them twice) and the arrow
    caches `datasets` keeps beside the tokenized training data."""
    return {
        path.relative_to(folder).as_posix(): path
        for path in sorted(folder.rglob("*"))
        if path.is_file() and "checkpoint-" not in path.as_posix() and "/training/data/" not in path.as_posix()
    }


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS and "runtime" not in k}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def assert_rows_kept_once(relative: str, trial: Path, reference: Path) -> int:
    """A progress/output JSON Lines file: the same keys in the same order, none missing and none twice."""
    trial_rows = [json.loads(line) for line in trial.read_text().splitlines() if line.strip()]
    reference_rows = [json.loads(line) for line in reference.read_text().splitlines() if line.strip()]
    if trial_rows and all("key" in row for row in trial_rows):
        keys = [(row.get("variant"), row["key"]) for row in trial_rows]  # samples.jsonl: one row per variant and key
        assert len(keys) == len(set(keys)), f"{relative}: a row written twice"
        assert keys == [(row.get("variant"), row["key"]) for row in reference_rows], f"{relative}: rows lost or moved"
    assert len(trial_rows) == len(reference_rows), relative
    return len(trial_rows)


def assert_same_training(trial: Path, reference: Path) -> None:
    from safetensors.torch import load_file

    trained, expected = (load_file(folder / "training" / "adapter_model.safetensors") for folder in (trial, reference))
    assert trained.keys() == expected.keys()
    for name in expected:
        assert trained[name].equal(expected[name]), f"adapter weight {name} differs after resuming"
    metrics, reference_metrics = (json.loads((f / "training" / "metrics.json").read_text()) for f in (trial, reference))
    assert (
        metrics["train"]["steps"]
        == reference_metrics["train"]["steps"]
        == RUN_CONFIG["training"]["settings"]["max_steps"]
    )
    steps = {row["step"]: row["loss"] for row in reference_metrics["train"]["per_step"]}
    for row in metrics["train"]["per_step"]:  # a resumed run logs the steps after its checkpoint
        assert row["loss"] == pytest.approx(steps[row["step"]], rel=1e-4), row
    assert metrics["train"]["per_step"][-1]["step"] == max(steps)


def assert_same_stage_outputs(stage: str, trial_run: Path, reference_run: Path) -> None:
    trial, reference = stage_folder(trial_run, stage), stage_folder(reference_run, stage)
    assert trial.name == reference.name  # same key: same settings and same input contents
    trial_files, reference_files = output_files(trial), output_files(reference)
    assert sorted(trial_files) == sorted(reference_files), "files missing or left over (e.g. a stale temp file)"
    for relative, path in reference_files.items():
        if relative == "stage.json":
            marker, expected = json.loads(trial_files[relative].read_text()), json.loads(path.read_text())
            assert {k: marker[k] for k in ("key", "inputs", "settings")} == {
                k: expected[k] for k in ("key", "inputs", "settings")
            }
            assert marker["output_hash"] == expected["output_hash"]
        elif relative in VOLATILE[stage]:
            if relative.endswith(".json"):
                assert without_timings(json.loads(trial_files[relative].read_text())) == without_timings(
                    json.loads(path.read_text())
                ) or relative.startswith("training/"), relative
        else:
            assert trial_files[relative].read_bytes() == path.read_bytes(), f"{stage}: {relative} differs"
        if relative.endswith(".jsonl"):
            count("rows checked", assert_rows_kept_once(relative, trial_files[relative], path))
    if stage in ("sft", "dpo"):
        assert_same_training(trial, reference)
    if stage == "preferences":
        assert json.loads((trial / "preferences.json").read_text())["status"] == "completed"


TRIAL_IDS = [(stage, number) for stage in STAGES for number in range(TRIALS[stage])]


@pytest.mark.parametrize(("stage", "number"), TRIAL_IDS, ids=[f"{s}-{n}" for s, n in TRIAL_IDS])
def test_kill_9_then_the_same_command_gives_the_uninterrupted_outputs(stage, number, reference, tmp_path):
    kill_at, torn = reference.kill_points[stage][number]
    root = tmp_path / "trial"
    shutil.copytree(reference.root, root, ignore=shutil.ignore_patterns("child.log", "events.json"))
    run = root / "run"
    shutil.rmtree(stage_folder(run, stage))
    for name in ("run.json", "report.md", "report.html"):
        (run / name).unlink()
    command = ["run", "config.yaml", "--only", stage]

    killed = selfalign_child(root, command, kill=(stage, kill_at, torn))
    assert killed == -signal.SIGKILL, f"not killed at event {kill_at}: {(root / 'child.log').read_text()[-3000:]}"
    assert not (run / "run.json").exists()
    finished = selfalign_child(root, command)
    assert finished == 0, (root / "child.log").read_text()[-3000:]

    assert_same_stage_outputs(stage, run, reference.root / "run")
    manifest = json.loads((run / "run.json").read_text())
    # the rerun finishes the stage, or finds it cached when the kill came after its marker (copying the report,
    # writing run.json)
    assert manifest["outputs"][stage] == str(Path("run") / stage / stage_folder(run, stage).name)
    if stage == "report":
        for name in ("report.md", "report.html"):
            assert (run / name).read_bytes() == (reference.root / "run" / name).read_bytes()
    count(f"kill9:{stage}")
