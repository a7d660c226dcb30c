"""A full disk or a read-only output folder: one clear error naming the file, the rows already written survive and
a rerun resumes. Secrets in the environment never reach a log, manifest, report or dataset card. Templates render
in a sandbox: a template that reaches for Python internals fails cleanly, naming its file, for every kind of
template file a user can give."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
from pathlib import Path

import pytest

from selfalign.errors import SelfAlignError
from selfalign.judging.templates import load_template
from selfalign.preferences.pipeline import run_preferences
from selfalign.preferences.templates import load_refusal_template, load_revision_template, render_step
from tests.preferences.conftest import ScenarioBackend, read_jsonl, scenario_config, scenario_models
from tests.reliability.tally import count

DATASET_FILES = ("train.jsonl", "eval.jsonl", "README.md", "funnel.json")


def dataset_files(out: Path) -> dict[str, str]:
    return {name: (out / "dataset" / name).read_text() for name in DATASET_FILES}


def progress_rows(out: Path) -> dict[str, list[str]]:
    return {path.name: [row["key"] for row in read_jsonl(path)] for path in sorted((out / "stages").glob("*.jsonl"))}


@pytest.fixture
def uninterrupted(tmp_path):
    config = scenario_config(tmp_path)
    run_preferences(config, tmp_path / "reference", scenario_models(config))
    return config, dataset_files(tmp_path / "reference")


# ---- disk full ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("full_after", [1, 3, 6, 10, 14])
def test_disk_full_gives_one_clear_error_keeps_the_rows_and_a_rerun_resumes(full_after, uninterrupted, tmp_path,
                                                                            monkeypatch):  # fmt: skip
    """The disk fills up after `full_after` durable writes (fsync is where a full disk shows itself): every later
    write fails with ENOSPC until space is freed."""
    config, expected = uninterrupted
    out = tmp_path / "out"
    real_fsync, writes = os.fsync, []

    def fsync_until_full(descriptor):
        writes.append(descriptor)
        if len(writes) > full_after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync_until_full)
    with pytest.raises(SelfAlignError) as error:
        run_preferences(config, out, scenario_models(config))
    message = str(error.value)
    assert "\n" not in message and "No space left on device" in message and str(out) in message, message
    kept = progress_rows(out) if (out / "stages").exists() else {}
    monkeypatch.setattr(os, "fsync", real_fsync)  # space freed

    assert progress_rows(out) == kept  # what was written before the error is still there, nothing more or less
    backend = ScenarioBackend(seed=config.seed)
    run_preferences(config, out, scenario_models(config, backend))
    assert dataset_files(out) == expected
    for name, keys in progress_rows(out).items():
        assert len(keys) == len(set(keys)), name
        assert keys[: len(kept.get(name, []))] == kept.get(name, []), name  # resumed after them, not redone
    count("disk-full cases")


# ---- a read-only output folder ----------------------------------------------------------------------------------


def refuse_writes_under(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a read-only mount does: creating or writing any file under `folder` fails with EROFS (the tests run as
    root, for whom chmod 0o555 stops nothing)."""
    real_os_open, real_io_open = os.open, io.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def under(path) -> bool:
        return str(Path(os.fspath(path)).resolve()).startswith(str(folder.resolve()))

    def os_open(path, flags, *args, **kwargs):
        if flags & write_flags and under(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_os_open(path, flags, *args, **kwargs)

    def io_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") and under(file):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_io_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(io, "open", io_open)


def test_a_read_only_output_folder_gives_one_clear_error_and_keeps_what_is_there(uninterrupted, tmp_path,
                                                                                 monkeypatch):  # fmt: skip
    config, expected = uninterrupted
    out = tmp_path / "out"
    run_preferences(config, out, scenario_models(config))
    responses = out / "stages" / "responses.jsonl"
    lines = responses.read_text().splitlines(keepends=True)
    responses.write_text("".join(lines[:3]))  # a run that had answered 3 prompts when the folder became read-only
    (out / "dataset").rename(tmp_path / "old-dataset")
    before = responses.read_bytes()

    with monkeypatch.context() as read_only:
        refuse_writes_under(out, read_only)
        with pytest.raises(SelfAlignError) as error:
            run_preferences(config, out, scenario_models(config))
    message = str(error.value)
    assert "\n" not in message and "Read-only file system" in message and str(out) in message, message
    assert responses.read_bytes() == before
    run_preferences(config, out, scenario_models(config))  # writable again: resumes
    assert dataset_files(out) == expected
    count("read-only cases")


@pytest.mark.skipif(os.geteuid() == 0, reason="as root, chmod 0o555 does not stop writes (the test above covers it)")
def test_a_chmod_read_only_output_folder(uninterrupted, tmp_path):
    config, _ = uninterrupted
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(SelfAlignError, match="cannot write"):
            run_preferences(config, out, scenario_models(config))
    finally:
        out.chmod(0o755)
    count("read-only cases")


# ---- secrets ----------------------------------------------------------------------------------------------------

SECRETS = {
    "OPENAI_API_KEY": "sk-canary-openai-5b1f0c",
    "MY_SERVER_KEY": "canary-server-key-8d2e41",  # the variable an openai backend config names (api_key_env)
    "HF_TOKEN": "hf_canaryHubToken7c9a",
    "HUGGING_FACE_HUB_TOKEN": "hf_canaryHubToken2b6d",
    "WANDB_API_KEY": "canary-wandb-3f8e",
}


def test_no_secret_reaches_a_log_manifest_report_or_dataset_card(tmp_path, monkeypatch, caplog):
    """The run pipeline with the scripted model (tune-judge, preferences, evaluate, report; training replaced by
    a stand-in that records its settings, as tests/pipeline/test_pipeline.py does: the real trainer's files are
    checked for these canaries in tests/training/test_sft.py)."""
    from selfalign.pipeline import run_pipeline as run_everything
    from selfalign.pipeline import stages as stages_module
    from selfalign.pipeline.config import load_run_config
    from selfalign.pipeline.outputs import TrainedAdapter
    from tests.pipeline.stand_ins import stand_in

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)

    for function in ("run_sft", "run_dpo"):  # an adapter folder whose metrics.json holds the training settings
        monkeypatch.setattr(stages_module, function, stand_in(TrainedAdapter, []))
    monkeypatch.setattr("selfalign.evaluation.run.evaluate", _evaluate_base_only(monkeypatch))
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "run"
    config = load_run_config(
        None,
        [
            f"out={out}",
            "model.backend=scripted",
            "model.prompt_format=plain",
            "model.options={default: 'Here is a complete answer.', rules: [['Rewrite the reply', 'No, that hurts.']]}",
            "tune_judge.limit=4",
            "tune_judge.modes=[logprob]",
            "tune_judge.templates=[one-shot]",
            "tune_judge.ensemble=[one-shot]",
            "use_tuned_judge=false",  # the rule judges: a judge chosen on 4 scripted items can accept no revision
            "judge.design=rule",
            "preferences.prompts=[{data: 'builtin:redteam:train', source: harmful, limit: 4},"
            " {data: 'builtin:helpful:train', source: benign, limit: 4}]",
            "evaluation.limit=3",
            "evaluation.bootstrap_samples=100",
        ],
    )
    run_everything(config)

    files = [path for path in out.rglob("*") if path.is_file()]
    assert {"run.json", "preferences.json", "report.md", "README.md", "config.yaml", "stage.json"} <= {
        path.name for path in files}  # fmt: skip
    for path in files:
        content = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in content, f"{name} leaked into {path}"
    for name, value in SECRETS.items():
        assert value not in caplog.text, f"{name} leaked into the log"
    count("secret files checked", len(files))


def _evaluate_base_only(monkeypatch):
    """evaluate() with the stand-in adapters dropped: the scripted backend has nothing to apply them to."""
    from selfalign.evaluation import run as evaluation_run

    real = evaluation_run.evaluate

    def evaluate(config, folder, earlier=()):
        return real(config.model_copy(update={"adapters": {}}), folder, earlier)

    return evaluate


# ---- the template sandbox ---------------------------------------------------------------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ request.__class__.__base__.__subclasses__() }}",
    "{{ self._TemplateReference__context }}",
    "{{ lipsum.__globals__['os'].system('true') }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ request.format_map.__self__.__class__ }}",
    "{% set x = [].append %}{{ x.__self__.__class__ }}",
    "{{ 'a' * 100000000000 }}",
    "{{ 2 ** 100000000 }}",
]


def write_template(folder: Path, kind: str, escape: str) -> Path:
    """A user's template file of `kind` whose prompt shows the request and the response, then tries `escape`."""
    prompt = "Request: {{ request }} Response: {{ response }} " + escape
    path = folder / f"{kind}.yaml"
    if kind == "judge":
        text = {"prompt": prompt, "modes": ["generate"]}
    elif kind == "revision":
        text = {"revision": {"prompt": prompt}}
    elif kind == "critique":
        critique = "Critique {{ request }} {{ response }} against {{ principle }} " + escape
        text = {"critique": {"prompt": critique}, "revision": {"prompt": "{{ request }} {{ response }} {{ critique }}"}}
    else:
        text = {"prompt": "Refuse: {{ request }} " + escape}
    path.write_text(json.dumps(text))  # JSON is YAML, and it keeps the braces quoted
    return path


@pytest.mark.parametrize("kind", ["judge", "revision", "critique", "refusal"])
@pytest.mark.parametrize("escape", ESCAPES)
def test_a_template_reaching_for_python_internals_fails_cleanly_naming_its_file(kind, escape, tmp_path):
    path = write_template(tmp_path, kind, escape)
    with pytest.raises(SelfAlignError) as error:
        if kind == "judge":
            load_template(str(path)).render("a request", "a response")
        elif kind in ("revision", "critique"):
            template = load_revision_template(str(path))
            variables = {"request": "a request", "response": "a response", "critique": "c", "principle": "p"}
            for step in template.steps:
                render_step(step, template.source, **variables)
        else:
            template = load_refusal_template(str(path))
            render_step(template, template.source, request="a request")
    message = str(error.value)
    assert message.startswith(str(path)) and "\n" not in message, message
    assert "unsafe" in message or "failed to render" in message, message
    count("sandbox cases")
