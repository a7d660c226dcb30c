"""A run stopped at any moment and started again gives the dataset an uninterrupted run gives, with no item twice."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests.preferences.conftest import ScenarioBackend, read_jsonl, scenario_config, scenario_models

from selfalign.backends.language_model import LanguageModel
from selfalign.errors import SelfAlignError
from selfalign.models.formats import get_prompt_format
from selfalign.preferences.pipeline import run_preferences, run_stage
from selfalign.preferences.stage_files import Models

STAGE_FILES = ("responses", "judgments", "revisions", "helpful")
RESULT_FILES = ("train.jsonl", "eval.jsonl", "README.md", "funnel.json")


def results(out: Path) -> dict[str, str]:
    return {name: (out / "dataset" / name).read_text() for name in RESULT_FILES}


def assert_no_item_twice(out: Path) -> None:
    for name in STAGE_FILES:
        path = out / "stages" / f"{name}.jsonl"
        keys = [row["key"] for row in read_jsonl(path)] if path.exists() else []
        assert len(keys) == len(set(keys)), name


@pytest.fixture
def uninterrupted(tmp_path):
    config = scenario_config(tmp_path)
    backend = ScenarioBackend(seed=config.seed)
    run_preferences(config, tmp_path / "reference", scenario_models(config, backend))
    return config, results(tmp_path / "reference"), len(backend.calls)


def test_interrupted_anywhere_then_resumed_gives_the_same_dataset(uninterrupted, tmp_path):
    config, expected, total_calls = uninterrupted
    assert total_calls >= 10  # respond, judge, two revision attempts (generate + judge), helpful
    for stop_at in range(1, total_calls + 1):  # every model call of every stage
        out = tmp_path / f"stopped-at-{stop_at}"
        with pytest.raises(KeyboardInterrupt):
            backend = ScenarioBackend(seed=config.seed, interrupt_at=stop_at)
            run_preferences(config, out, scenario_models(config, backend))
        assert json.loads((out / "preferences.json").read_text())["status"] == "interrupted"
        resumed = ScenarioBackend(seed=config.seed)
        run_preferences(config, out, scenario_models(config, resumed))
        assert results(out) == expected, f"stopped at call {stop_at}"
        assert_no_item_twice(out)
        # finished work is not done again: at most the calls of the chunk in flight (a revision's generate and judge)
        assert len(resumed.calls) <= total_calls - stop_at + 2


def test_a_torn_last_line_is_redone(uninterrupted, tmp_path):
    config, expected, _ = uninterrupted
    out = tmp_path / "torn"
    run_preferences(config, out, scenario_models(config))
    responses = out / "stages" / "responses.jsonl"
    lines = responses.read_text().splitlines(keepends=True)
    responses.write_text("".join(lines[:-1]) + lines[-1][:25])  # killed in the middle of writing the last row
    backend = ScenarioBackend(seed=config.seed)
    run_preferences(config, out, scenario_models(config, backend))
    assert results(out) == expected
    assert [len(prompts) for kind, prompts in backend.calls] == [1]  # only the torn item is answered again
    assert_no_item_twice(out)


def test_a_finished_run_rebuilds_without_calling_the_model(uninterrupted, tmp_path):
    config, expected, _ = uninterrupted
    run_preferences(config, tmp_path / "again", scenario_models(config))
    backend = ScenarioBackend(seed=config.seed)
    run_preferences(config, tmp_path / "again", scenario_models(config, backend))
    assert backend.calls == [] and results(tmp_path / "again") == expected


def test_stage_files_from_other_settings_are_refused(tmp_path):
    config = scenario_config(tmp_path)
    run_stage(config, "respond", tmp_path / "out", scenario_models(config))
    config.generation.max_new_tokens = 7
    with pytest.raises(SelfAlignError, match=r"responses.jsonl was made with other settings \(changed: generation\)"):
        run_stage(config, "respond", tmp_path / "out", scenario_models(config))


KILLING_RUNNER = textwrap.dedent(
    """
    import os, signal, sys
    from selfalign.backends.base import BACKENDS
    from selfalign.backends.scripted import create_scripted_backend

    @BACKENDS.register("scripted-kill")
    def create(config):
        backend = create_scripted_backend(config)
        generate, calls = backend.generate, []

        def generate_or_die(prompts, params):
            calls.append(len(prompts))
            if len(calls) == int(os.environ.get("KILL_AT_CALL", "0")):
                os.kill(os.getpid(), signal.SIGKILL)
            return generate(prompts, params)

        backend.generate = generate_or_die
        return backend

    from selfalign.cli.main import main
    sys.argv = ["selfalign", *sys.argv[1:]]
    main()
    """
)

SCRIPTED_CONFIG = """\
policy:
  backend: scripted-kill
  prompt_format: plain
  options:
    rules:
      - ["Rewrite the reply", "It would hurt people, so please do not do this."]
      - ["Refuse the following request", "Please ask me something else."]
    default: "Here is a complete answer."
judge: {design: composite}
prompts:
  - {data: "builtin:redteam:train", source: harmful, limit: 5}
  - {data: "builtin:helpful:train", source: benign, limit: 5}
chunk_size: 2
eval_fraction: 0.4
"""


def test_kill_9_mid_stage_then_rerun_gives_the_same_dataset(tmp_path):
    (tmp_path / "runner.py").write_text(KILLING_RUNNER)
    (tmp_path / "config.yaml").write_text(SCRIPTED_CONFIG)

    def selfalign(out: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "KILL_AT_CALL": str(kill_at or 0)}
        command = [sys.executable, str(tmp_path / "runner.py"), "preferences", "--config", "config.yaml", "--out", out]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    assert selfalign("reference").returncode == 0
    killed = selfalign("killed", kill_at=5)  # respond takes calls 1-5: killed while answering the last chunk
    assert killed.returncode == -9, killed.stderr
    answered = read_jsonl(tmp_path / "killed" / "stages" / "responses.jsonl")
    assert len(answered) == 8 and not (tmp_path / "killed" / "dataset").exists()
    finished = selfalign("killed")
    assert finished.returncode == 0, finished.stderr
    assert results(tmp_path / "killed") == results(tmp_path / "reference")
    assert_no_item_twice(tmp_path / "killed")


def test_a_stage_releases_the_models_it_loaded_and_only_those(tmp_path, monkeypatch):
    """The policy `run_stage` loaded is closed when it returns, also after an error (a server keeps no registered
    adapter, a vLLM engine its GPU memory); models a caller passed in stay the caller's to close."""
    from selfalign.preferences import stage_files

    config = scenario_config(tmp_path)
    closed = []

    class ClosingBackend(ScenarioBackend):
        def close(self):
            closed.append(self)

    def load(model_config):
        return LanguageModel(model_config, ClosingBackend(seed=config.seed), get_prompt_format(None, "plain"))

    monkeypatch.setattr(stage_files, "load_language_model", load)
    run_stage(config, "respond", tmp_path / "out")
    assert len(closed) == 1
    with pytest.raises(ValueError, match="unknown stage"):
        run_stage(config, "nonsense", tmp_path / "out")
    assert len(closed) == 1  # that stage loaded nothing
    given = Models(config, policy=load(config.policy))
    run_stage(config, "respond", tmp_path / "given", given)
    assert len(closed) == 1
