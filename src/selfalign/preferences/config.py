"""Configuration of the preference-data engine: one section per stage, grouped into `PreferencesConfig`.

Every seed a stage uses derives from the top-level `seed`, so one number fixes the prompt sample, sampling, the
principle drawn per item, the helpful mix and the train/eval split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from selfalign.backends.base import GenerationParams
from selfalign.backends.language_model import ModelConfig
from selfalign.config import StrictModel, load_config
from selfalign.errors import SelfAlignError
from selfalign.judging.judge import JudgeConfig, load_judge_file
from selfalign.preferences.templates import (
    ConstitutionName,
    PrinciplesName,
    RefusalTemplateName,
    RevisionTemplateName,
    load_principles,
)

Source = Literal["harmful", "benign"]
CATEGORY_COLUMNS = ("category", "type", "domain")  # red-team, benign-sensitive and helpful sets name it differently


class PromptSet(StrictModel):
    """One set of training prompts and what kind of answer it should teach."""

    data: str = Field(description="Data reference: builtin:NAME:split, a .jsonl/.json/.csv/.parquet file, hf:ORG/NAME.")
    source: Source = Field(description="harmful: red-team prompts to refuse; benign: prompts to answer helpfully.")
    limit: int | None = Field(None, ge=1, description="At most this many prompts: a seeded sample, in file order.")
    prompt_column: str = Field("prompt", description="Column holding the prompt.")
    id_column: str = Field("id", description="Column with a stable row id; the row number where there is none.")

    @property
    def name(self) -> str:
        return self.data.removeprefix("builtin:")


class PrinciplesConfig(StrictModel):
    """How principle-driven answering picks what the policy reads (preferences.policy_prompt: principle-driven)."""

    file: PrinciplesName = Field("principles", description="Principles and exemplars: shipped name or a .yaml.")
    exemplars: int = Field(4, ge=0, description="Worked exemplars shown before each request (0: principles only).")
    refusal_share: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Share of the exemplars that are reasoned refusals (the rest: helpful answers).",
    )
    select: Literal["fixed", "similar"] = Field(
        "fixed", description="fixed: the first of each kind; similar: those nearest the request (TF-IDF)."
    )


class RevisionConfig(StrictModel):
    strategy: RevisionTemplateName = Field(
        "refuse-and-explain", description="refuse-and-explain, critique-then-revise, or a revision template .yaml."
    )
    n_attempts: int = Field(2, ge=1, description="Revisions tried per harmful answer until one is judged harmless.")
    force_prefix: bool = Field(
        True,
        description="Start the rewrite with the strategy's response_prefix (refuse-and-explain: a refusal sentence, "
        "which a base model needs to refuse at all, and which the refusal detector then always matches; "
        "critique-then-revise has none). false: the model writes the whole revision and the judge reads only that.",
    )
    constitution: ConstitutionName = Field(
        "constitution", description="Principles for critique-then-revise: shipped or a .yaml."
    )
    generation: GenerationParams = Field(
        default_factory=lambda: GenerationParams(max_new_tokens=128, temperature=0.7, top_p=0.9),
        description="Sampling, so that a second attempt differs from the first; attempt k uses seed + k.",
    )


def _default_prompt_sets() -> list[PromptSet]:
    return [
        PromptSet(data="builtin:redteam:train", source="harmful"),
        PromptSet(data="builtin:benign-sensitive:train", source="benign"),
        PromptSet(data="builtin:helpful:train", source="benign"),
    ]


class PreferencesConfig(StrictModel):
    """respond -> judge -> revise -> helpful mix -> build."""

    policy: ModelConfig = Field(default_factory=ModelConfig, description="The model that answers and revises.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="The self-judge (judge.model: another one).")
    judge_file: str | None = Field(None, description="tune-judge's judge.yaml; replaces `judge` (but judge.model).")
    judge_results: str | None = Field(
        None, description="tune-judge's results.json, for the judge's measured accuracy in the card (default: beside "
        "judge_file)."
    )  # fmt: skip
    prompts: list[PromptSet] = Field(default_factory=_default_prompt_sets, min_length=1)
    generation: GenerationParams = Field(
        default_factory=lambda: GenerationParams(max_new_tokens=128),
        description="Answers and helpful-mix refusals; greedy by default, the model's own unaligned behaviour.",
    )
    policy_prompt: Literal["bare", "principle-driven"] = Field(
        "bare",
        description="bare: the request alone in the policy's format. principle-driven: principles and exemplars first "
        "(Sun et al. 2023), when answering and revising; the pairs keep the bare request.",
    )
    principles: PrinciplesConfig = Field(default_factory=PrinciplesConfig)
    revision: RevisionConfig = Field(default_factory=RevisionConfig)
    refusal_template: RefusalTemplateName = Field(
        "refuse", description="Writes the rejected refusals of helpful pairs."
    )
    cut_unfinished_chosen: bool = Field(
        True,
        description="End a chosen answer that the token limit stopped mid-sentence at its last complete sentence "
        "(or line); one left with under 3 words is dropped. False keeps it as generated.",
    )
    helpful_mix: float = Field(0.5, ge=0.0, lt=1.0, description="Share of helpful pairs among the pairs kept.")
    seed: int = Field(0, ge=0, description="Seeds the prompt sample, sampling, principles, the mix and the split.")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of each pair type held out as eval.")
    chunk_size: int = Field(32, ge=1, description="Items per model call; finished chunks survive a kill.")
    out_dir: str = Field("runs/preferences", description="Where stage files and the dataset go (--out overrides).")

    @model_validator(mode="after")
    def _check(self) -> PreferencesConfig:
        for where, params in (("generation", self.generation), ("revision.generation", self.revision.generation)):
            if "seed" in params.model_fields_set:
                raise ValueError(f"{where}.seed: set the top-level seed instead; every stage's seed derives from it")
        if self.policy_prompt == "principle-driven":
            load_principles(self.principles.file)  # a broken file fails when the config loads, not mid-run
        names = [prompt_set.name for prompt_set in self.prompts]
        if len(set(names)) != len(names):
            raise ValueError("each prompt set must be listed once")
        return self


def load_preferences_config(path: str | Path | None, overrides: list[str] | None = None) -> PreferencesConfig:
    """The config from YAML and overrides, with the judge read from `judge_file` where one is given."""
    config = load_config(PreferencesConfig, path, overrides)
    if config.judge_file is None:
        return config
    fields_set = config.judge.model_fields_set - {"model"}
    if fields_set:
        raise SelfAlignError(
            f"judge_file is given, so set no judge.{sorted(fields_set)[0]}: the judge comes from {config.judge_file}"
        )
    judge = load_judge_file(config.judge_file)
    results = Path(config.judge_file).with_name("results.json")
    config.judge = judge.model_copy(update={"model": config.judge.model})
    if config.judge_results is None and results.is_file():
        config.judge_results = str(results)
    return config
