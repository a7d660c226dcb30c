"""Typed configuration: pydantic models loaded from YAML, then `key=value` overrides from the command line.

Precedence is defaults < YAML < overrides. Unknown keys, duplicate keys and a top level that is not a mapping are
errors that name the key and the file, because a mistyped option silently ignored is a wrong experiment.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from selfalign.errors import SelfAlignError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def with_values(config: ConfigT, /, **values: Any) -> ConfigT:
    """A copy of `config` with `values` set through validation (StrictModel validates assignment), for values one
    stage hands the next; pydantic's model_copy(update=...) would store them unchecked."""
    copy = config.model_copy(deep=True)
    for name, value in values.items():
        setattr(copy, name, value)
    return copy


def loaded_by(loader: Callable[[str], object]) -> AfterValidator:
    """For a field that names a template (shipped, or a .yaml file): load it when the config loads, so a misspelt
    name or a broken file stops the command, `--dry-run` included, before any stage runs rather than when a stage
    first reads it. Defaults are shipped templates and are not re-checked."""

    def check(name: str) -> str:
        try:
            loader(name)
        except SelfAlignError as exc:
            raise ValueError(str(exc)) from None
        return name

    return AfterValidator(check)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word; this loader refuses them."""


def _construct_mapping_without_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, Hashable):  # `? [a, b]` is a list key: PyYAML itself would fail with a TypeError
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a plain value, not a list or mapping", key_node.start_mark
            )
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first on line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_without_duplicates)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping; an empty file is an empty mapping."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SelfAlignError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SelfAlignError(f"{path}: cannot read config file ({exc})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SelfAlignError(f"{path}{where}: invalid YAML: {' '.join(problem.split())}") from None
    except RecursionError:
        raise SelfAlignError(f"{path}: invalid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SelfAlignError(f"{path}: the top level must be a mapping of keys to values, not {type(data).__name__}")
    return data


def _quoted(text: str) -> str:
    """User text inside an error message, kept on one line: control characters are shown escaped."""
    return f"'{text}'" if text.isprintable() else repr(text)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`judge.mode=logprob` -> (['judge', 'mode'], 'logprob'); the value is read as YAML (numbers, lists, null)."""
    key, sep, raw_value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise SelfAlignError(f"override {_quoted(text)}: expected key=value, e.g. generation.max_new_tokens=64")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `a.b.c=value` override set, creating nested mappings as needed."""
    result = _deep_copy(data)
    for override in overrides:
        keys, value = parse_override(override)
        node: Any = result
        for key in keys[:-1]:
            node = _child(node, key, override)
        if isinstance(node, list):
            node[_list_index(node, keys[-1], override)] = value
        else:
            node[keys[-1]] = value
    return result


def _child(node: Any, key: str, override: str) -> Any:
    """The section `key` of `node`, created if missing; lists are indexed by number (`prompts.0.limit=5`)."""
    if isinstance(node, list):
        return node[_list_index(node, key, override)]
    child = node.get(key)
    if child is None:
        child = node[key] = {}
    elif not isinstance(child, (dict, list)):
        raise SelfAlignError(f"override {_quoted(override)}: {_quoted(key)} is a value, not a section")
    return child


def _list_index(node: list, key: str, override: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise SelfAlignError(
            f"override {_quoted(override)}: {_quoted(key)} is not an index of a list of {len(node)} items"
        )
    return int(key)


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {key: _deep_copy(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_deep_copy(value) for value in data]
    return data


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem, each naming the dotted key and where the config came from."""
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        elif error["type"] == "missing":
            lines.append(f"{source}: missing required key '{key}'")
        elif error["type"] == "value_error":
            message = error["msg"].removeprefix("Value error, ")
            lines.append(
                f"{source}: {message}" if not error["loc"] else f"{source}: invalid value for '{key}': {message}"
            )
        else:
            lines.append(f"{source}: invalid value for '{key}': {error['msg']}")
    return "; ".join(lines)


def load_config(
    config_cls: type[ConfigT], path: str | Path | None = None, overrides: list[str] | None = None
) -> ConfigT:
    """Build `config_cls` from defaults, then the YAML file at `path`, then the `key=value` overrides."""
    data = read_yaml_mapping(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    source = str(path) if path is not None else "command line"
    if overrides and path is not None:
        source += " (with command-line overrides)"
    try:
        return config_cls.model_validate(data)
    except ValidationError as exc:
        raise SelfAlignError(format_validation_error(exc, source)) from None
