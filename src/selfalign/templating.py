"""Render Jinja templates in a sandbox: templates are data that users write, so they get no access to Python."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from selfalign.errors import SelfAlignError


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


MAX_RESULT_LENGTH = 1_000_000  # characters or items a template's `*` may build
MAX_EXPONENT = 1_000


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox also bounds `*` and `**`: `{{ 'a' * 10**10 }}` or `{{ 9**9**9 }}` would otherwise hang a run or
    take all memory (jinja's own sandbox bounds only `range`)."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"exponent {right} is larger than {MAX_EXPONENT}")
        if operator == "*":
            for sequence, times in ((left, right), (right, left)):
                if isinstance(sequence, (str, list, tuple)) and isinstance(times, int):
                    if len(sequence) * times > MAX_RESULT_LENGTH:
                        raise SecurityError(f"a repetition longer than {MAX_RESULT_LENGTH:,}")
        return super().call_binop(context, operator, left, right)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    # StrictUndefined: a template that names a variable nobody passes fails instead of rendering an empty string
    # (the reference experiment's judge template silently lost its placeholders this way).
    env = _BoundedSandbox(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.globals["raise_exception"] = _raise_exception
    return env


@functools.lru_cache(maxsize=256)
def compile_template(source: str, origin: str = "template") -> jinja2.Template:
    with _parse_errors(origin):
        return _environment().from_string(source)


@contextlib.contextmanager
def _parse_errors(origin: str) -> Iterator[None]:
    """Errors of parsing a template, compiled or only inspected, as one line naming `origin`."""
    try:
        yield
    except jinja2.TemplateSyntaxError as exc:
        raise SelfAlignError(f"{origin}: template syntax error on line {exc.lineno}: {exc.message}") from None
    except RecursionError:
        raise SelfAlignError(f"{origin}: template nests too deeply to compile") from None


def render_template(source: str, origin: str = "template", **variables: Any) -> str:
    """Render `source` with `variables`; any failure is a one-line SelfAlignError naming `origin`."""
    template = compile_template(source, origin)
    try:
        return template.render(**variables)
    except SecurityError as exc:
        raise SelfAlignError(f"{origin}: template tried an unsafe operation ({exc})") from None
    except jinja2.UndefinedError as exc:
        raise SelfAlignError(f"{origin}: template uses an undefined variable ({exc.message})") from None
    except jinja2.TemplateError as exc:
        raise SelfAlignError(f"{origin}: template failed to render ({_one_line(exc)})") from None
    except Exception as exc:  # the template's own expressions: 1/0, [1] + 'a', int overflow, deep recursion
        raise SelfAlignError(f"{origin}: template failed to render ({type(exc).__name__}: {_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def read_template_file(path: Path) -> str:
    """A user's template file as text; a file that is not UTF-8 text is a one-line error, not a traceback."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SelfAlignError(f"{path}: not valid UTF-8 text") from None
    except OSError as exc:
        raise SelfAlignError(f"{path}: cannot read ({exc.strerror})") from None


def parse_template_yaml(text: str, source: str) -> Any:
    """A template file's YAML; invalid or too deeply nested YAML is a one-line error naming `source`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SelfAlignError(f"{source}: invalid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise SelfAlignError(f"{source}: invalid YAML (nested too deeply)") from None


def template_variables(source: str, origin: str = "template") -> set[str]:
    """Names a template reads from its context, to check required placeholders before rendering anything."""
    from jinja2 import meta

    with _parse_errors(origin):
        return set(meta.find_undeclared_variables(_environment().parse(source)))
