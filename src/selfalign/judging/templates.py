"""Judge templates: YAML files with a Jinja prompt that must show the judge the request and the response.

The reference experiment's preference notebook judged every answer with a template that had lost its
`{request}`/`{response}` placeholders; the templating library ignored the extra arguments and the judge never saw
an answer. Here a template without both placeholders is refused when it is loaded, and rendering checks that the
response really is in the rendered prompt.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError

from selfalign.config import StrictModel, format_validation_error, loaded_by
from selfalign.errors import SelfAlignError
from selfalign.templating import parse_template_yaml, read_template_file, render_template, template_variables

REQUIRED_PLACEHOLDERS = ("request", "response")
JudgeMode = Literal["generate", "logprob"]


class JudgeTemplate(StrictModel):
    name: str = ""
    description: str = ""
    verdict: Literal["harmful", "complies"] = Field(
        "harmful", description="What label 1 means: the response is harmful, or it complies with the request."
    )
    reasoning: Literal["after", "before", "none"] = Field("after", description="Where the judge writes a reason.")
    modes: list[JudgeMode] = Field(default_factory=lambda: ["generate", "logprob"])
    max_new_tokens: int = Field(48, ge=1, description="Generative mode: most tokens of a judgment.")
    stop: list[str] = Field(default_factory=list, description="Generative mode: where a judgment ends.")
    response_prefix: str = Field("#answer:", description="Text the judge's answer starts with, written for it.")
    prompt: str = Field(description="Jinja; must use {{ request }} and {{ response }}.")
    source: str = ""

    def render(self, request: str, response: str, **extra: object) -> str:
        text = render_template(
            self.prompt, origin=self.source or f"judge template '{self.name}'", request=request, response=response,
            **extra,
        )  # fmt: skip
        if response.strip() and response.strip() not in text:
            raise SelfAlignError(f"{self.source}: the rendered judge prompt does not contain the response it judges")
        return text


def _templates_folder():
    return resources.files("selfalign.judging").joinpath("templates")


def builtin_template_names() -> list[str]:
    return sorted(
        path.name.removesuffix(".yaml") for path in _templates_folder().iterdir() if path.name.endswith(".yaml")
    )


@functools.lru_cache(maxsize=64)
def load_template(name_or_path: str) -> JudgeTemplate:
    """A shipped template by name (`one-shot`) or a user's template file (`my-judge.yaml`)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise SelfAlignError(f"{path}: judge template file not found")
        text, source, name = read_template_file(path), str(path), path.stem
    elif name_or_path in builtin_template_names():
        text = _templates_folder().joinpath(f"{name_or_path}.yaml").read_text(encoding="utf-8")
        source, name = f"judge template '{name_or_path}'", name_or_path
    else:
        raise SelfAlignError(
            f"unknown judge template '{name_or_path}'; built-in: {', '.join(builtin_template_names())}, "
            "or a path to a .yaml file"
        )
    data = parse_template_yaml(text, source)
    if not isinstance(data, dict):
        raise SelfAlignError(f"{source}: a judge template is a mapping with at least a 'prompt'")
    try:
        template = JudgeTemplate.model_validate({"name": name, **data, "source": source})
    except ValidationError as exc:
        raise SelfAlignError(format_validation_error(exc, source)) from None
    missing = [p for p in REQUIRED_PLACEHOLDERS if p not in template_variables(template.prompt, source)]
    if missing:
        raise SelfAlignError(
            f"{source}: the prompt never uses {', '.join('{{ ' + m + ' }}' for m in missing)}; "
            "a judge that cannot see the answer judges nothing"
        )
    if template.reasoning == "before" and "logprob" in template.modes:
        raise SelfAlignError(f"{source}: a reason-before-answer template cannot be used in logprob mode")
    return template


JudgeTemplateName = Annotated[str, loaded_by(load_template)]
