"""Render Jinja templates in a sandbox: templates are data that users write, so they get no access to Python."""

from __future__ import annotations

import functools
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from selfalign.errors import SelfAlignError


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    # StrictUndefined: a template that names a variable nobody passes fails instead of rendering an empty string
    # (the reference experiment's judge template silently lost its placeholders this way).
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.globals["raise_exception"] = _raise_exception
    return env


@functools.lru_cache(maxsize=256)
def compile_template(source: str, origin: str = "template") -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise SelfAlignError(f"{origin}: template syntax error on line {exc.lineno}: {exc.message}") from None


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
        raise SelfAlignError(f"{origin}: template failed to render ({exc})") from None


def template_variables(source: str, origin: str = "template") -> set[str]:
    """Names a template reads from its context, to check required placeholders before rendering anything."""
    from jinja2 import meta

    try:
        return set(meta.find_undeclared_variables(_environment().parse(source)))
    except jinja2.TemplateSyntaxError as exc:
        raise SelfAlignError(f"{origin}: template syntax error on line {exc.lineno}: {exc.message}") from None
