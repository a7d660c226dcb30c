"""Revision and refusal templates, and the constitution: data files, checked when they are loaded.

A revision strategy is a YAML file with a `revision` step and, for critique-then-revise, a `critique` step before it;
each step is a Jinja prompt (rendered in the sandbox of `selfalign.templating`) and a `response_prefix` that starts
the model's answer. A prompt that never shows the model the request or the answer it rewrites is refused on load, as
judge templates are (the reference experiment's judge silently lost its placeholders). The shipped files live in
`templates/` beside this module; a path to a `.yaml` file names a user's own.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator

from selfalign.config import StrictModel, format_validation_error, loaded_by
from selfalign.errors import SelfAlignError
from selfalign.templating import parse_template_yaml, read_template_file, render_template, template_variables


class Step(StrictModel):
    prompt: str = Field(description="Jinja prompt: the user message the model answers.")
    response_prefix: str = Field("", description="Text the model's answer starts with, written for it.")


class RevisionTemplate(StrictModel):
    name: str = ""
    description: str = ""
    critique: Step | None = Field(None, description="Optional first step: the model critiques its answer.")
    revision: Step = Field(description="The rewrite of the answer judged harmful.")
    source: str = ""
    text: str = ""  # the file as read, stored beside the dataset

    @property
    def uses_principle(self) -> bool:
        return any("principle" in template_variables(s.prompt, self.source) for s in self.steps)

    @property
    def steps(self) -> list[Step]:
        return [step for step in (self.critique, self.revision) if step is not None]


class RefusalTemplate(StrictModel):
    name: str = ""
    description: str = ""
    prompt: str = Field(description="Jinja prompt telling the model to refuse {{ request }}.")
    response_prefix: str = ""
    source: str = ""
    text: str = ""


class Principle(StrictModel):
    name: str
    critique: str = Field(description="What the critique step asks the model to look for.")
    revision: str = Field(description="How the revision step asks the model to rewrite.")


class Constitution(StrictModel):
    principles: list[Principle] = Field(min_length=1)
    source: str = ""
    text: str = ""

    def choose(self, seed: int, key: str, attempt: int) -> Principle:
        """The principle for one item and attempt: a hash, so it is the same in every run and after a resume."""
        digest = hashlib.sha256(f"{seed}/{key}/{attempt}".encode()).digest()
        return self.principles[int.from_bytes(digest[:8], "big") % len(self.principles)]


class GuidingPrinciple(StrictModel):
    name: str = Field(min_length=1)
    text: str = Field(min_length=1, description="One sentence the policy reads before it answers.")


class Exemplar(StrictModel):
    name: str = Field(min_length=1)
    kind: Literal["helpful", "refusal"] = Field(description="A safe request answered, or a harmful one declined.")
    category: str = "none"
    request: str = Field(min_length=1)
    answer: str = Field(min_length=1)

    @field_validator("request", "answer")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class Principles(StrictModel):
    """Principle-driven answering (Sun et al. 2023): principles and worked exemplars the policy reads in context when
    it answers and revises; training data keeps the bare request, so the adapters learn the behaviour without them."""

    description: str = ""
    preamble: str = Field(min_length=1, description="Said to the assistant before the principles.")
    principles: list[GuidingPrinciple] = Field(min_length=1)
    exemplars: list[Exemplar] = Field(min_length=1)
    source: str = ""
    text: str = ""

    def system_text(self) -> str:
        return "\n".join([self.preamble.strip(), *(f"- {p.text.strip()}" for p in self.principles)])

    def choose(self, count: int, refusal_share: float, request: str, select: str) -> list[Exemplar]:
        """`count` exemplars, round(count * refusal_share) of them refusals: the first of each kind in file order
        (`fixed`), or those whose requests are nearest to this one by TF-IDF cosine (`similar`). Helpful ones come
        first and the last one shown is helpful where there is one: a base model copies what it read last."""
        refusals = round(count * refusal_share)
        pools = {kind: [e for e in self.exemplars if e.kind == kind] for kind in ("helpful", "refusal")}
        if select == "similar":
            pools = {kind: _nearest(pool, request) for kind, pool in pools.items()}
        chosen = pools["refusal"][:refusals] + pools["helpful"][: count - refusals]
        return sorted(chosen, key=lambda e: e.kind == "helpful")


def _nearest(pool: list[Exemplar], request: str) -> list[Exemplar]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    if not pool:
        return pool
    texts = [request, *(e.request for e in pool)]
    vectors = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit_transform(texts)
    similarity = cosine_similarity(vectors[0], vectors[1:])[0]
    order = sorted(range(len(pool)), key=lambda i: (-similarity[i], i))
    return [pool[i] for i in order]


def _folder() -> Any:
    return resources.files("selfalign.preferences").joinpath("templates")


def shipped_strategies() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml") for p in _folder().joinpath("revise").iterdir() if p.name.endswith("yaml")
    )


def _read(name_or_path: str, shipped: Any, names: list[str], kind: str) -> tuple[dict, str, str, str]:
    """(data, text, source, name) of a shipped file by name or of a user's .yaml file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise SelfAlignError(f"{path}: {kind} file not found")
        text, source, name = read_template_file(path), str(path), path.stem
    elif name_or_path in names:
        text = shipped.joinpath(f"{name_or_path}.yaml").read_text(encoding="utf-8")
        source, name = f"{kind} '{name_or_path}'", name_or_path
    else:
        raise SelfAlignError(f"unknown {kind} '{name_or_path}'; shipped: {', '.join(names)}, or a path to a .yaml file")
    data = parse_template_yaml(text, source)
    if not isinstance(data, dict):
        raise SelfAlignError(f"{source}: expected a mapping at the top level")
    return data, text, source, name


def _validated(model: type, data: dict, source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SelfAlignError(format_validation_error(exc, source)) from None


def _require(prompt: str, source: str, step: str, names: tuple[str, ...], why: str) -> None:
    missing = [name for name in names if name not in template_variables(prompt, source)]
    if missing:
        placeholders = ", ".join("{{ " + name + " }}" for name in missing)
        raise SelfAlignError(f"{source}: the {step} prompt never uses {placeholders}; {why}")


@functools.lru_cache(maxsize=32)
def load_revision_template(name_or_path: str) -> RevisionTemplate:
    """A revision strategy: `refuse-and-explain`, `critique-then-revise`, or a user's .yaml file."""
    data, text, source, name = _read(
        name_or_path, _folder().joinpath("revise"), shipped_strategies(), "revision strategy"
    )
    template = _validated(RevisionTemplate, {"name": name, **data, "source": source, "text": text}, source)
    why = "a rewrite that cannot see the request and the answer rewrites nothing"
    _require(template.revision.prompt, source, "revision", ("request", "response"), why)
    if template.critique is not None:
        why = "a critique must read the answer against a principle of the constitution"
        _require(template.critique.prompt, source, "critique", ("request", "response", "principle"), why)
        _require(template.revision.prompt, source, "revision", ("critique",), "the rewrite must read the critique")
    return template


@functools.lru_cache(maxsize=32)
def load_refusal_template(name_or_path: str) -> RefusalTemplate:
    """The request to refuse that writes the `rejected` side of helpful pairs: `refuse` or a user's .yaml file."""
    data, text, source, name = _read(name_or_path, _folder(), ["refuse"], "refusal template")
    template = _validated(RefusalTemplate, {"name": name, **data, "source": source, "text": text}, source)
    _require(template.prompt, source, "refusal", ("request",), "the model must see the request it refuses")
    return template


@functools.lru_cache(maxsize=32)
def load_constitution(name_or_path: str) -> Constitution:
    """The principles critique-then-revise draws from: `constitution` (shipped) or a user's .yaml file."""
    data, text, source, _ = _read(name_or_path, _folder(), ["constitution"], "constitution")
    constitution = _validated(Constitution, {**data, "source": source, "text": text}, source)
    names = [p.name for p in constitution.principles]
    if len(set(names)) != len(names):
        raise SelfAlignError(f"{source}: principle names must be unique")
    return constitution


def _yaml_line(text: str, location: tuple) -> int | None:
    """The line (1-based) of the YAML node at `location` (keys and list indices, as pydantic reports them)."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = node.start_mark.line + 1 if node is not None else None
    for part in location:
        if isinstance(node, yaml.MappingNode):
            node = next((value for key, value in node.value if key.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


@functools.lru_cache(maxsize=32)
def load_principles(name_or_path: str) -> Principles:
    """The principles and exemplars of principle-driven answering: `principles` (shipped) or a user's .yaml file.
    A missing field, an empty answer or an empty list is a one-line error naming the file and its line."""
    data, text, source, _ = _read(name_or_path, _folder(), ["principles"], "principles file")
    try:
        principles = Principles.model_validate({**data, "source": source, "text": text})
    except ValidationError as exc:
        error = exc.errors()[0]
        location = tuple(error["loc"])
        # a missing key is reported at its parent, which is where the line is
        line = _yaml_line(text, location if error["type"] != "missing" else location[:-1])
        key = ".".join(str(part) for part in location)
        problem = "missing" if error["type"] == "missing" else error["msg"].removeprefix("Value error, ")
        raise SelfAlignError(f"{source}{f', line {line}' if line else ''}: {key}: {problem}") from None
    names = [e.name for e in principles.exemplars]
    if len(set(names)) != len(names):
        raise SelfAlignError(f"{source}: exemplar names must be unique")
    return principles


RevisionTemplateName = Annotated[str, loaded_by(load_revision_template)]
PrinciplesName = Annotated[str, loaded_by(load_principles)]
RefusalTemplateName = Annotated[str, loaded_by(load_refusal_template)]
ConstitutionName = Annotated[str, loaded_by(load_constitution)]


def policy_request(config: Any, request: str) -> str | list[dict[str, str]]:
    """What the policy reads for one request: the request alone (`bare`), or, `principle-driven`, a conversation of
    the principles (as the system message) and worked exemplars, then the request. Only answering and revising use
    this; the pairs keep the bare request, so training engraves the behaviour without the principles in context."""
    if config.policy_prompt == "bare":
        return request
    principles = load_principles(config.principles.file)
    settings = config.principles
    messages = [{"role": "system", "content": principles.system_text()}]
    for exemplar in principles.choose(settings.exemplars, settings.refusal_share, request, settings.select):
        messages += [{"role": "user", "content": exemplar.request}, {"role": "assistant", "content": exemplar.answer}]
    return [*messages, {"role": "user", "content": request}]


def render_step(step: Step, source: str, **variables: Any) -> str:
    """The prompt of one step; the answer it rewrites must really be in it."""
    text = render_template(step.prompt, origin=source, **variables)
    response = str(variables.get("response", "")).strip()
    if response and response not in text:
        raise SelfAlignError(f"{source}: the rendered prompt does not contain the answer it is about")
    return text


def join_prefix(prefix: str, text: str) -> str:
    """An answer the model continued from `prefix`: the prefix and the continuation, one space between them."""
    if not prefix:
        return text.strip()
    if not text.strip():
        return prefix.strip()
    return prefix.rstrip() + " " + text.strip()
