"""README.md and docs/*.md name only what exists: `selfalign` commands and their options, shipped configs, files of
the checkout, modules, dotted settings and extras; the settings their `selfalign run`, `train` and `evaluate`
commands give load. What a claim says beyond a name is for a reader to check; a renamed thing is for this test."""

from __future__ import annotations

import importlib
import re
import shlex
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import BaseModel

from selfalign.backends.base import BACKENDS
from selfalign.cli.main import app
from selfalign.config import load_config
from selfalign.errors import SelfAlignError
from selfalign.evaluation.run import EvaluateConfig
from selfalign.pipeline.config import RunConfig, TrainingSection, load_run_config
from selfalign.pipeline.engine import STAGE_ORDER
from selfalign.preferences.config import PreferencesConfig
from selfalign.shipped_configs import SHIPPED_CONFIGS
from selfalign.training.config import TrainingConfig, load_training_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLI = typer.main.get_command(app)
# a word of three or more capitals (CONFIG, NAME, ORG/NAME), brackets or an ellipsis: a placeholder, not a value
PLACEHOLDER = re.compile(r"[A-Z]{3,}|\[|\]|\.\.\.")
# dotted settings the docs name on purpose although they are wrong
WRONG_ON_PURPOSE = {"model.options.tensor_parallel_sise"}  # scaling.md: a misspelt option stops even a dry run
# the first part of a dotted setting -> the config it is a key of
SETTING_ROOTS = {
    **dict.fromkeys(("model", "tune_judge", "judge", "preferences", "training", "evaluation"), RunConfig),
    **dict.fromkeys(("sft", "dpo", "lora"), TrainingConfig),  # `selfalign train ... dpo.beta=0.2`
    **dict.fromkeys(("revision", "principles"), PreferencesConfig),
}
SETTING = re.compile(rf"(?<![\w./-])(?:{'|'.join(SETTING_ROOTS)})(?:\.[a-z_][a-z0-9_]*)+")
CHECKOUT_PATH = re.compile(r"(?<![\w./-])(?:src|selfalign|tests|benchmarks|scripts|examples|docs|\.ci)/[\w./-]*")
FILE_SUFFIXES = {"yaml", "py", "md", "json", "jsonl", "gguf"}


def _doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _code(text: str) -> list[str]:
    """Inline code spans (a span may cross a line break) and the lines of fenced blocks, continuations joined."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    lines = [line for block in fenced for line in block.replace("\\\n", " ").splitlines()]
    return spans + lines


def _commands(text: str) -> list[list[str]]:
    """The words after `selfalign` (or `-m selfalign`) of every command in the code of `text`, up to `&&`, `;`, `&`."""
    commands = []
    for code in _code(text):
        try:
            words = shlex.split(code, comments=True)
        except ValueError:
            continue  # not a shell line (a YAML value with an apostrophe)
        for start, word in enumerate(words):
            if word == "selfalign" and (start == 0 or words[start - 1] in ("&&", ";", "&", "-m")):
                rest = words[start + 1 :]
                ends = [rest.index(stop) for stop in ("&&", ";", "&") if stop in rest]
                commands.append(rest[: min(ends)] if ends else rest)
    return commands


def _resolve(words: list[str]) -> list[tuple[str, Any, list[str]]]:
    """(name, command, its words) for `selfalign WORDS`: `sft|dpo` names each alternative; a word that is no
    subcommand of a group fails."""
    resolved = []

    def walk(command: Any, name: str, rest: list[str]) -> None:
        # typer has its own copy of click, so a group is what has subcommands; `...` stands for any of them
        if not hasattr(command, "commands") or not rest or rest[0].startswith("-") or rest[0] == "...":
            resolved.append((name, command, rest))
            return
        for alternative in rest[0].strip("[]").split("|"):
            sub = command.commands.get(alternative)
            assert sub is not None, f"`selfalign {name} {alternative}` is not a command: {sorted(command.commands)}"
            walk(sub, f"{name} {alternative}".strip(), rest[1:])

    walk(CLI, "", words)
    return resolved


def _split_arguments(command: Any, words: list[str]) -> tuple[dict[str, str | None], list[str]]:
    """The options given ({--name: value, None for a flag}) and the positional words, by the command's own params."""
    flags = {opt for param in command.params if getattr(param, "is_flag", False) for opt in param.opts}
    options: dict[str, str | None] = {}
    positional: list[str] = []
    index = 0
    while index < len(words):
        word = words[index].strip("[]")
        if word.startswith("-") and len(word) > 1 and not word[1].isdigit():  # --name or -n, not a number
            name, _, inline = word.partition("=") if word.startswith("--") else (word, "", "")
            takes_value = name not in flags and not inline and index + 1 < len(words)
            options[name] = inline or (words[index + 1] if takes_value else None)
            index += 2 if takes_value else 1
        else:
            positional.append(words[index])
            index += 1
    return options, positional


def _option_names(command: Any) -> set[str]:
    names = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    return names | set(command.context_settings.get("help_option_names", ["--help"])) | {"--help"}


def doc_commands() -> list[tuple[str, str, Any, list[str]]]:
    return [
        (_doc_id(doc), name, command, rest)
        for doc in DOCS
        for words in _commands(doc.read_text(encoding="utf-8"))
        for name, command, rest in _resolve(words)
    ]


def test_the_docs_are_read():
    """The parsers below find what they look for, so an empty result cannot pass for a clean one."""
    commands = {name for _, name, _, _ in doc_commands()}
    named = {"run", "sweep", "train sft", "train dpo", "evaluate", "preferences", "configs copy", "data audit"}
    assert named <= commands, sorted(named - commands)
    text = "\n".join(doc.read_text(encoding="utf-8") for doc in DOCS)
    assert "training.settings.max_steps" in SETTING.findall(text)
    assert "examples/preferences.jsonl" in CHECKOUT_PATH.findall(text)


def test_every_selfalign_command_and_option_in_the_docs_exists():
    for doc, name, command, rest in doc_commands():
        options, _ = _split_arguments(command, rest)
        unknown = sorted(set(options) - _option_names(command))
        assert not unknown, f"{doc}: `selfalign {name}` has no option {', '.join(unknown)}"


def _shipped(path: str) -> Path | None:
    """The shipped config a `configs/...yaml` path names, or None for another file."""
    return SHIPPED_CONFIGS / path.removeprefix("configs/") if path.startswith("configs/") else None


def test_the_settings_of_run_train_and_evaluate_commands_in_the_docs_load():
    """Each command's key=value settings (and --only/--from stage) load with the shipped config it names."""
    checked = 0
    for doc, name, command, rest in doc_commands():
        options, positional = _split_arguments(command, rest)
        if any(PLACEHOLDER.search(word) for word in [*positional, *(v for v in options.values() if v)]):
            continue
        where = f"{doc}: `selfalign {name} {' '.join(rest)}`"
        overrides = [word for word in positional if "=" in word]
        paths = [word for word in positional if "=" not in word]
        try:
            if name == "run":
                assert len(paths) <= 1, where
                config = _shipped(paths[0]) if paths else None
                if paths and config is None:
                    continue  # the reader's own file
                load_run_config(config, overrides)
                for stage in (options.get("--only"), options.get("--from")):
                    assert stage is None or stage in STAGE_ORDER, f"{where}: no stage '{stage}'"
            elif name in ("train sft", "train dpo"):
                config = _shipped(options["--config"]) if options.get("--config") else None
                if options.get("--config") and config is None:
                    continue
                load_training_config(config, overrides, options.get("--preset"))
            elif name == "evaluate":
                load_config(EvaluateConfig, None, overrides)
            else:
                continue
        except SelfAlignError as exc:
            pytest.fail(f"{where}: {exc}")
        checked += 1
    assert checked >= 10, checked


def test_every_config_path_in_the_docs_is_shipped():
    for doc in DOCS:
        for code in _code(doc.read_text(encoding="utf-8")):
            for path in re.findall(r"(?<![\w/.-])configs/[\w/.-]*", code):
                if not PLACEHOLDER.search(path):
                    shipped = _shipped(path)
                    assert shipped.exists(), f"{_doc_id(doc)}: {path} is not a shipped config ({shipped})"


def _module_attribute(dotted: str) -> bool:
    """Whether `selfalign.x.y` is a module, or an attribute of the longest importable module before it."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for part in parts[cut:]:
            if not hasattr(target, part):
                return False
            target = getattr(target, part)
        return True
    return False


def test_every_file_and_module_in_the_docs_exists():
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for code in _code(text):
            for path in CHECKOUT_PATH.findall(code):
                if PLACEHOLDER.search(path):
                    continue
                on_disk = ROOT / "src" / path if path.startswith("selfalign/") else ROOT / path
                assert on_disk.exists(), f"{_doc_id(doc)}: {path} does not exist ({on_disk})"
            for module in re.findall(r"(?<![\w./-])selfalign(?:\.\w+)+", code):
                assert _module_attribute(module), f"{_doc_id(doc)}: {module} is no module or attribute"
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (doc.parent / link).exists(), f"{_doc_id(doc)}: link {link} goes nowhere"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (`JudgeConfig | None` -> JudgeConfig), or None (a dict, a scalar)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [m for m in map(_model_in, typing.get_args(annotation)) if m is not None]
        return models[0] if models else None
    return None


def _is_setting(model: type[BaseModel], parts: list[str]) -> bool:
    """Whether `parts` are a path of fields of `model`; `training.settings` goes on in TrainingConfig and
    `model.options` in every backend's options, and other mappings (trl:, engine_args:) take any key."""
    if not parts:
        return True
    field = model.model_fields.get(parts[0])
    if field is None:
        return False
    if model is TrainingSection and parts[0] == "settings":
        return _is_setting(TrainingConfig, parts[1:])
    if parts[0] == "options" and "backend" in model.model_fields:
        options = [BACKENDS.options_model(name) for name in BACKENDS.options_models]
        return len(parts) == 1 or any(_is_setting(o, parts[1:]) for o in options if o is not None)
    inner = _model_in(field.annotation)
    if inner is not None:
        return _is_setting(inner, parts[1:])
    return len(parts) == 1 or typing.get_origin(field.annotation) is dict  # a scalar has no keys; a mapping any


def test_every_dotted_setting_in_the_docs_is_a_field():
    for doc in DOCS:
        for code in _code(doc.read_text(encoding="utf-8")):
            for setting in SETTING.findall(code):
                parts = setting.split(".")
                if parts[-1] in FILE_SUFFIXES or setting in WRONG_ON_PURPOSE:
                    continue  # a file name (judge.yaml), or a mistake shown on purpose
                assert _is_setting(SETTING_ROOTS[parts[0]], parts), f"{_doc_id(doc)}: `{setting}` is not a setting"


def test_every_extra_in_the_docs_is_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    named = {extra for doc in DOCS for extra in re.findall(r"selfalign\[([\w,-]+)\]", doc.read_text(encoding="utf-8"))}
    assert named, "no `selfalign[extra]` found"
    assert named <= set(extras), f"extras the docs name but pyproject.toml lacks: {sorted(named - set(extras))}"
