"""Every loader, template renderer, the judge parser and config loading, fed malformed input (random bytes, wrong
types, missing fields, huge strings): each call either works or raises a one-line SelfAlignError, never another
exception, and within hypothesis' deadline (a regex that backtracks or a template that builds 10 GB would miss it).
The CLI turns such an error into one `error:` line and exit code 2."""

from __future__ import annotations

import atexit
import itertools
import json
import shutil
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfalign.cli.main import main
from selfalign.config import load_config, parse_override
from selfalign.data.jsonl import read_jsonl
from selfalign.data.loading import load_rows
from selfalign.data.resumable import ResumableJsonl
from selfalign.errors import SelfAlignError
from selfalign.judging.parsing import parse_verdict
from selfalign.judging.templates import load_template
from selfalign.pipeline.config import RunConfig
from selfalign.preferences.templates import load_constitution, load_refusal_template, load_revision_template
from selfalign.templating import render_template
from tests.cli_runner import run_cli
from tests.reliability.tally import count

FILE_NUMBERS = itertools.count()  # template loaders cache by path: every example gets a new file name
SCRATCH = Path(tempfile.mkdtemp(prefix="selfalign-malformed-"))  # hypothesis examples cannot use tmp_path
atexit.register(shutil.rmtree, SCRATCH, True)
PROPERTY_SETTINGS = settings(
    max_examples=30, deadline=timedelta(seconds=5), suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=40), st.binary(max_size=20)
)
huge_text = st.integers(min_value=100_000, max_value=400_000).map(lambda n: "x" * n)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


def scratch_file(suffix: str, content: bytes) -> Path:
    path = SCRATCH / f"input-{next(FILE_NUMBERS)}{suffix}"
    path.write_bytes(content)
    return path


def clean(call, *args, **kwargs) -> str:
    """Run `call`; it may succeed or raise SelfAlignError with a one-line message, nothing else."""
    try:
        call(*args, **kwargs)
    except SelfAlignError as exc:
        message = str(exc)
        assert message.strip() and "\n" not in message, repr(message)
        return "error"
    return "ok"


def random_document(key_names: list[str]) -> st.SearchStrategy[bytes]:
    """Random bytes, random text, or YAML/JSON mappings whose keys are partly the real ones (with wrong values)."""
    mappings = st.dictionaries(st.sampled_from(key_names) | st.text(max_size=10), yaml_values, max_size=6)
    return st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300).map(str.encode),
        mappings.map(lambda data: yaml.safe_dump(data, allow_unicode=True).encode()),
        yaml_values.map(lambda data: yaml.safe_dump(data).encode()),
        st.integers(1, 300).map(lambda depth: ("[" * depth + "]" * depth).encode()),
    )


# ---- data loaders ---------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(content=st.binary(max_size=400), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
def test_data_files_of_random_bytes(content, suffix):
    count("property:data loaders")
    clean(load_rows, str(scratch_file(suffix, content)), ["prompt"])


@PROPERTY_SETTINGS
@given(
    rows=st.lists(st.dictionaries(st.sampled_from(["prompt", "id", "label", "category"]), json_values), max_size=6)
    | st.lists(json_values, max_size=4),
    huge=st.none() | huge_text,
    suffix=st.sampled_from([".jsonl", ".json"]),
)
def test_data_rows_with_wrong_types_missing_fields_and_huge_strings(rows, huge, suffix):
    count("property:data loaders")
    if huge is not None:
        rows = [*rows, {"prompt": huge}]
    if suffix == ".jsonl":
        text = "".join(json.dumps(row) + "\n" for row in rows)
    else:
        text = json.dumps(rows)
    path = scratch_file(suffix, text.encode())
    clean(load_rows, str(path), ["prompt"])
    clean(load_rows, str(path), ["prompt", "label"], column_map={"label": "category"})
    if suffix == ".jsonl":
        clean(read_jsonl, path)


@PROPERTY_SETTINGS
@given(content=st.binary(max_size=400))
def test_progress_files_of_random_bytes(content):
    count("property:progress files")
    clean(ResumableJsonl, scratch_file(".jsonl", content))


@PROPERTY_SETTINGS
@given(texts=st.lists(st.text(max_size=60), min_size=1, max_size=5))
def test_progress_rows_of_any_text_read_back_as_written(texts):
    """Rows holding any text (U+2028, NEL, lone surrogates excluded by JSON) survive an append and a reload."""
    count("property:progress files")
    store = ResumableJsonl(scratch_file(".jsonl", b""))
    rows = [{"key": f"item-{index}", "answer": text} for index, text in enumerate(texts)]
    store.append(rows)
    assert list(ResumableJsonl(store.path).rows()) == rows


# ---- templates --------------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(
    source=st.text(max_size=200)
    | st.lists(st.sampled_from(["{{", "}}", "{%", "%}", "request", "response", " if ", "for x in ", "endfor",
                                "*", "**", "9", "'a'", "|", "join", "(", ")", "[", "]", ".", "__class__", "~", "/0"]),
               max_size=20).map("".join),
    request=st.text(max_size=50) | huge_text,
)  # fmt: skip
def test_templates_of_random_text_render_or_fail_cleanly(source, request):
    count("property:template rendering")
    clean(render_template, source, "my-template.jinja", request=request, response="an answer")


@PROPERTY_SETTINGS
@given(content=random_document(["prompt", "name", "verdict", "reasoning", "modes", "max_new_tokens", "stop"]))
def test_judge_template_files(content):
    count("property:judge templates")
    path = scratch_file(".yaml", content)
    outcome = clean(load_template, str(path))
    if outcome == "ok":
        clean(load_template(str(path)).render, "a request", "a response")


@PROPERTY_SETTINGS
@given(
    content=random_document(["revision", "critique", "prompt", "response_prefix", "principles", "name"]),
    loader=st.sampled_from([load_revision_template, load_refusal_template, load_constitution]),
)
def test_revision_refusal_and_constitution_files(content, loader):
    count("property:revision templates")
    clean(loader, str(scratch_file(".yaml", content)))


# ---- the judge parser -----------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(
    text=st.text(max_size=500)
    | st.tuples(st.sampled_from(["answer", "#answer:", "reason:", "**", "\n", " ", "verdict ="]),
                st.integers(10_000, 200_000)).map(lambda t: t[0] + (" \n" if t[0] == "reason:" else " ") * t[1])
    | huge_text.map(lambda s: s.replace("x", "\n")),
)  # fmt: skip
def test_the_judge_parser_reads_any_output_in_bounded_time(text):
    count("property:judge parser")
    parsed = parse_verdict(text)
    assert parsed.label in (0, 1, None) and (parsed.label is None) == (parsed.why_abstained is not None)


# ---- configs ----------------------------------------------------------------------------------------------------

RUN_KEYS = ["out", "model", "seed", "rounds", "tune_judge", "judge", "preferences", "training", "evaluation"]


@PROPERTY_SETTINGS
@given(content=random_document(RUN_KEYS), overrides=st.lists(st.text(max_size=30), max_size=3))
def test_run_configs(content, overrides):
    count("property:config loading")
    path = scratch_file(".yaml", content)
    clean(load_config, RunConfig, path)
    clean(load_config, RunConfig, path, overrides)
    for override in overrides:
        clean(parse_override, override)


@PROPERTY_SETTINGS
@given(
    section=st.sampled_from(["preferences", "training", "evaluation", "tune_judge", "model", "judge"]),
    value=yaml_values,
)
def test_run_config_sections_of_the_wrong_shape(section, value):
    count("property:config loading")
    clean(load_config, RunConfig, scratch_file(".yaml", yaml.safe_dump({section: value}).encode()))


# ---- the CLI ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "suffix", "content"),
    [
        (["run", "{file}", "--dry-run"], ".yaml", b"\xff\xfe not utf-8"),
        (["run", "{file}", "--dry-run"], ".yaml", b"? [a, b]\n: 1\n"),
        (["run", "{file}", "--dry-run"], ".yaml", b"[" * 5000 + b"]" * 5000),
        (["run", "{file}", "--dry-run"], ".yaml", b"preferences: {prompts: 3}\n"),
        (["data", "validate", "{file}"], ".jsonl", b'{"prompt": "ok"}\n\xff\n'),
        (["data", "validate", "{file}"], ".csv", b"prompt\n\xff\xfe\n"),
        (["data", "validate", "{file}"], ".parquet", b"PAR1 not really"),
        (["preferences", "--config", "{file}"], ".yaml", b"revision: {strategy: missing.yaml}\n"),
        (["tune-judge", "--out", "out", "--config", "{file}"], ".yaml", b"templates: [\xff.yaml]\n"),
    ],
)
def test_cli_prints_one_error_line_and_exits_2(command, suffix, content, monkeypatch, capsys):
    path = scratch_file(suffix, content)
    monkeypatch.chdir(SCRATCH)
    code, _, stderr = run_cli(monkeypatch, capsys, *[part.replace("{file}", str(path)) for part in command])
    assert code == 2, stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    count("CLI error cases")


@settings(max_examples=20, deadline=timedelta(seconds=5), derandomize=True)
@given(content=random_document(RUN_KEYS))
def test_cli_run_dry_run_on_random_configs_exits_0_or_2_with_one_line(content):
    count("property:CLI")
    path = scratch_file(".yaml", content)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(sys, "argv", ["selfalign", "run", str(path), f"out={SCRATCH / 'runs'}", "--dry-run"])
        monkeypatch.chdir(SCRATCH)
        with pytest.raises(SystemExit) as exit_info:
            main()
    assert exit_info.value.code in (0, None, 2)
