"""`selfalign evaluate`: the base model and each adapter on the same prompts, judged the same way.

Stages, each resumable chunk by chunk (`chunk_size` items) under the output folder:
1. answers/<variant>.jsonl: every variant answers the harmful, benign and helpful prompts (same seed, greedy);
2. judgments/<variant>.jsonl: one judge model (the base by default) labels harmfulness of the harmful and benign
   answers, a `complies` judge says whether each answer did what was asked, and the refusal detector gives its
   independent opinion;
3. pairwise/<adapter>.jsonl: helpfulness of each adapter against the base on the helpful prompts, both orders;
   capability/<variant>.jsonl: multiple-choice questions scored by log-likelihood (capability retained), while each
   variant is loaded to answer;
4. metrics.json, samples.jsonl, report.md and report.html, computed from those files alone.

Rows an earlier evaluation made from the same things are copied instead of computed again (`earlier`): the same
prompts and settings (its config.json, adapters aside) and, per file, the same settings record (model, adapter
contents, generation, judge). `selfalign run` passes its other evaluate folders, so the points of a sweep answer and
judge with the base model, and with an adapter they share, once.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from selfalign.backends.base import BACKENDS, GenerationParams
from selfalign.backends.language_model import LanguageModel, ModelConfig, load_language_model
from selfalign.config import StrictModel
from selfalign.data.jsonl import write_jsonl_atomic, write_text_atomic
from selfalign.data.loading import load_rows
from selfalign.data.resumable import ResumableJsonl, process_resumably
from selfalign.errors import SelfAlignError
from selfalign.evaluation.capability import load_capability, score_choices
from selfalign.evaluation.metrics import compute_metrics
from selfalign.evaluation.pairwise import PairwiseTemplateName, compare_answers
from selfalign.evaluation.refusal_classes import detector_class, judge_classes
from selfalign.judging.judge import JudgeConfig, build_judge
from selfalign.judging.probe import judge_in_one_pass
from selfalign.judging.refusal import RefusalDetector
from selfalign.judging.templates import JudgeTemplateName
from selfalign.models.adapter_files import adapter_digest
from selfalign.stage_settings import changed_settings, check_settings

logger = logging.getLogger(__name__)
BASE = "base"


class EvaluateConfig(StrictModel):
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    adapters: dict[str, str] = Field(default_factory=dict, description="Variant name -> PEFT adapter folder.")
    harmful: str = Field("builtin:redteam:test", description="Harmful prompts: harmlessness.")
    benign: str = Field(
        "builtin:benign-sensitive:test", description="Safe but sensitive-looking prompts: over-refusal."
    )
    helpful: str | None = Field("builtin:helpful:test", description="Everyday prompts: pairwise helpfulness.")
    limit: int | None = Field(None, ge=1, description="At most this many prompts per set.")
    capability: str | None = Field(
        "builtin:capability:test",
        description="Multiple-choice questions (question, choices, answer): capability retained, acc/acc_norm; null: "
        "not measured.",
    )
    capability_limit: int | None = Field(None, ge=1, description="At most this many multiple-choice questions.")
    generation: GenerationParams = Field(default_factory=lambda: GenerationParams(max_new_tokens=128))
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="How harmfulness is judged.")
    refusal_judge_template: JudgeTemplateName = Field(
        "complies", description="Template whose 0 verdict means 'did not comply'."
    )
    pairwise_template: PairwiseTemplateName = Field("pairwise", description="Pairwise helpfulness template.")
    external_judge: JudgeConfig | None = Field(None, description="A second judge (its own model) for agreement.")
    external_judge_reads: Literal["agreement", "everything"] = Field(
        "agreement",
        description="agreement: the external judge rates harm only, for its agreement with `judge`. everything: it "
        "is the judge of record (harm, compliance, XSTest's classes, pairwise helpfulness) and `judge` is the one "
        "whose agreement with it is reported: for a small self-judge that cannot read answers well.",
    )
    merge_adapters: bool = Field(
        True,
        description="Answer and score with each adapter merged into the model's weights where the backend can "
        "(transformers): 1.3x faster generation on CPU; the merged bf16 weights round differently, so some greedy "
        "answers differ from the unmerged adapter's (BENCHMARKS.md). false: PEFT's unmerged layers.",
    )
    bootstrap_samples: int = Field(1000, ge=100)
    seed: int = 0
    examples: int = Field(3, ge=0, description="Example answers shown side by side in the report.")
    # A chunk is what the model batches over: a few times the batch size, so that rows joining as others finish keep
    # decoding steps full (continuous batching); a killed run redoes at most one chunk.
    chunk_size: int = Field(512, ge=1, description="Items per resumable chunk.")

    @model_validator(mode="after")
    def _check_external_judge(self) -> EvaluateConfig:
        if self.external_judge is not None and self.external_judge.model is None:
            raise ValueError("external_judge.model must name the external judge's model")
        if self.external_judge is None and self.external_judge_reads == "everything":
            raise ValueError("external_judge_reads: everything needs an external_judge (with its model)")
        return self


def check_twins(benign: str, harmful: str) -> None:
    """A benign row's `twin` (its unsafe contrast prompt, XSTest-style) must be the id of a row of the harmful set,
    and a harmful row's the id of a benign one: a one-line error naming the file, line and field otherwise."""
    from selfalign.data.loading import read_reference_rows

    rows = {reference: read_reference_rows(reference) for reference in (benign, harmful)}
    ids = {reference: {str(row.get("id")) for row in found} for reference, found in rows.items()}
    for reference, other in ((benign, harmful), (harmful, benign)):
        for line, row in enumerate(rows[reference], start=1):
            twin = row.get("twin")
            if twin and str(twin) not in ids[other]:
                raise SelfAlignError(f"{reference}: line {line}: field 'twin': {twin!r} is not an id of {other}")


def load_prompt_sets(config: EvaluateConfig) -> list[dict]:
    """Every prompt to answer, with a stable key, its set, its source and its category."""
    check_twins(config.benign, config.harmful)
    items = []
    sets = [("harmful", config.harmful, "harmful"), ("benign", config.benign, "benign")]
    if config.helpful:
        sets.append(("helpful", config.helpful, "benign"))
    for set_name, reference, source in sets:
        rows = spread_over_categories(load_rows(reference, ["prompt"]).to_list(), config.limit)
        for index, row in enumerate(rows):
            category = _category(row)
            key = f"{set_name}:{row.get('id', index)}"
            item = {"key": key, "set": set_name, "source": source, "category": str(category), "prompt": row["prompt"]}
            if row.get("difficulty"):  # red-team v2: plain, implicit, wrapped, grey-zone
                item["difficulty"] = str(row["difficulty"])
            items.append(item)
    return items


def _category(row: dict) -> str:
    return str(row.get("category") or row.get("type") or row.get("domain") or "all")


def spread_over_categories(rows: list[dict], limit: int | None) -> list[dict]:
    """The first `limit` rows taken in turn from each category, so a small run still covers every category."""
    if limit is None or limit >= len(rows):
        return rows
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(_category(row), []).append(row)
    spread = [row for round_ in zip_longest(*groups.values()) for row in round_ if row is not None]
    return spread[:limit]


class EvaluationModels:
    """The variants (the base model and each adapter) and judges an evaluation loads, all released by `close`.

    A backend that serves adapters per request (BACKENDS.serves_adapters: vLLM, one LoRARequest per call) loads the
    base model once with every adapter enabled, and each variant is a view of that engine; a judge that is the base
    model uses it too. Other backends (transformers) load each variant on its own and drop it before the next.
    """

    def __init__(self, model: ModelConfig, adapters: dict[str, str], merge: bool = False) -> None:
        self.model, self.adapters, self.merge = model, adapters, merge
        self.shared = model.backend in BACKENDS.serves_adapters
        self._engine: LanguageModel | None = None  # the shared engine, once loaded
        self._engine_judges = False
        self._judges: list[LanguageModel] = []

    def variant(self, name: str) -> LanguageModel:
        config = self.model.model_copy(update={"adapter": None if name == BASE else self.adapters[name]})
        if not self.shared:
            model = load_language_model(config)
            if self.merge:  # a variant only answers and scores; judges load their own model
                model.merge_adapter()
            return model
        if self._engine is None:
            base = self.model.model_copy(update={"adapter": None})
            self._engine = load_language_model(base, adapters=list(self.adapters.values()))
        return self._engine.with_adapter(config)

    def done_with(self, model: LanguageModel) -> None:
        """A variant has answered: closed now, unless it is a view of the shared engine (the next one needs it)."""
        if not self.shared:
            model.close()

    def judge(self, config: ModelConfig) -> LanguageModel:
        if self.shared and config == self.model.model_copy(update={"adapter": None}):
            self._engine_judges = True
            return self.variant(BASE)
        if not self._engine_judges:
            self._close_engine()  # its GPU memory goes before another model loads
        judge = load_language_model(config)
        self._judges.append(judge)
        return judge

    def _close_engine(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def close(self) -> None:
        self._close_engine()
        for judge in self._judges:
            judge.close()
        self._judges.clear()
        gc.collect()


def evaluate(config: EvaluateConfig, out_dir: Path, earlier: Sequence[Path] = ()) -> dict:
    """Evaluate into `out_dir`, resuming what it holds and copying what the `earlier` evaluations made from the same
    prompts and settings (module docstring)."""
    for name, path in config.adapters.items():
        if name == BASE:
            raise SelfAlignError("'base' names the model without adapter; give the adapter another name")
        if not Path(path).is_dir():
            raise SelfAlignError(f"adapter '{name}': folder not found: {path}")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "config.json", config.model_dump_json(indent=2) + "\n")
    models = EvaluationModels(config.model, config.adapters, config.merge_adapters)
    try:
        return _evaluate(config, out_dir, models, ResumeSettings(config, out_dir, earlier))
    finally:
        models.close()  # engines and their GPU memory go before the next stage loads its model, also after an error


class ResumeSettings:
    """What made each resumable file of an evaluation, stored beside it: rows made with other settings are refused, not
    reused. `selfalign run` gives changed settings a new folder anyway; `selfalign evaluate --out` into an earlier
    folder would otherwise report a retrained adapter's old answers, or answers of another length."""

    REMEDY = "use another --out, or delete the file to redo it"

    def __init__(self, config: EvaluateConfig, out_dir: Path, earlier: Sequence[Path] = ()) -> None:
        self.config, self.out_dir = config, out_dir
        self.adapters = {name: adapter_digest(path) for name, path in config.adapters.items()}
        self.earlier = [folder for folder in earlier if folder != out_dir and same_prompts(folder, config)]

    @staticmethod
    def dump(settings: StrictModel) -> dict:
        return settings.model_dump(mode="json", context={"cache_key": True})  # servers and retries left out

    def answers(self, variant: str) -> dict:
        base = self.config.model.model_copy(update={"adapter": None})
        generation = self.dump(self.config.generation)
        record = dict(model=self.dump(base), adapter=self.adapters.get(variant), generation=generation)
        if variant != BASE:  # merged weights round differently: their answers are not mixed with unmerged ones
            record["merge_adapters"] = self.config.merge_adapters
        return record

    def capability(self, variant: str) -> dict:
        return {key: value for key, value in self.answers(variant).items() if key != "generation"}

    def judgments(self, variant: str, judge_model: LanguageModel, judge: JudgeConfig) -> dict:
        return dict(answers=self.answers(variant), judge_model=self.dump(judge_model.config), judge=self.dump(judge),
                    refusal_judge_template=self.config.refusal_judge_template)  # fmt: skip

    def pairwise(self, variant: str, judge_model: LanguageModel) -> dict:
        return dict(base=self.answers(BASE), answers=self.answers(variant), judge_model=self.dump(judge_model.config),
                    pairwise_template=self.config.pairwise_template)  # fmt: skip

    def store(self, path: Path, settings: dict, keys: Sequence[str] = ()) -> ResumableJsonl:
        """The resumable file at `path`, refused if made with other settings, with the rows for `keys` that it
        lacks copied from an earlier evaluation's file of the same settings, where one has them."""
        check_settings(path, settings, path.with_suffix(".settings.json"), self.REMEDY)
        store = ResumableJsonl(path)
        missing = [key for key in keys if key not in store]
        for folder in self.earlier:
            if not missing:
                break
            for record in sorted((folder / path.parent.relative_to(self.out_dir)).glob("*.settings.json")):
                source = record.with_name(record.name.removesuffix(".settings.json") + ".jsonl")
                if not source.is_file() or changed_settings(json.loads(record.read_text(encoding="utf-8")), settings):
                    continue
                found = ResumableJsonl(source)
                rows = [found.get(key) for key in missing if key in found]
                store.append(rows)
                missing = [key for key in missing if key not in store]
                if rows:
                    logger.info("%s: %d rows copied from %s", path.relative_to(self.out_dir), len(rows), source)
        return store


def same_prompts(folder: Path, config: EvaluateConfig) -> bool:
    """Whether the evaluation in `folder` asked the same questions as `config` would, with the same settings: its
    config.json equals this one but for the adapters (each file's settings record says which adapter made it)."""
    try:
        theirs = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    ours = json.loads(config.model_dump_json())
    return isinstance(theirs, dict) and {**theirs, "adapters": None} == {**ours, "adapters": None}


def _evaluate(config: EvaluateConfig, out_dir: Path, models: EvaluationModels, made_with: ResumeSettings) -> dict:
    items = load_prompt_sets(config)
    questions = load_capability(config.capability, config.capability_limit) if config.capability else []
    variants = [BASE, *config.adapters]
    item_keys, question_keys = [item["key"] for item in items], [question["key"] for question in questions]
    judged_keys = [item["key"] for item in items if item["set"] != "helpful"]
    helpful_keys = [item["key"] for item in items if item["set"] == "helpful"]

    # ---- 1. answers (and capability, while the variant is loaded) ---------------------------------------------
    answers, capability = {}, {}
    for variant in variants:
        store = made_with.store(out_dir / "answers" / f"{variant}.jsonl", made_with.answers(variant), item_keys)
        scored = made_with.store(
            out_dir / "capability" / f"{variant}.jsonl", made_with.capability(variant), question_keys
        )
        if any(key not in store for key in item_keys) or any(key not in scored for key in question_keys):
            model = models.variant(variant)
            try:
                logger.info("answering %d prompts with %s", len(items), variant)
                answers[variant] = process_resumably(
                    items, store, lambda chunk, model=model: _answer(model, chunk, config), config.chunk_size
                )
                if questions:
                    logger.info("scoring %d multiple-choice questions with %s", len(questions), variant)
                    capability[variant] = process_resumably(
                        questions, scored, lambda chunk, model=model: score_choices(model, chunk), config.chunk_size
                    )
            finally:  # also on an error: a server's registered adapter is released, a local model's memory freed
                models.done_with(model)
            del model
            gc.collect()
        else:
            answers[variant] = [store.get(item["key"]) for item in items]
            capability[variant] = [scored.get(item["key"]) for item in questions]

    # ---- 2. judgments -----------------------------------------------------------------------------------------
    own = (models.judge(config.judge.model or config.model), config.judge)
    external = None if config.external_judge is None else (
        models.judge(config.external_judge.model), config.external_judge)  # fmt: skip
    # the judge of record gives every reported verdict; the other one (if any) is compared with it
    (judge_model, record_judge), second = (external, own) if config.external_judge_reads == "everything" else (
        own, external)  # fmt: skip
    judgments = {
        variant: judge_answers(judge_model, record_judge, answers[variant], config, made_with.store(
            out_dir / "judgments" / f"{variant}.jsonl", made_with.judgments(variant, judge_model, record_judge),
            item_keys))
        for variant in variants
    }  # fmt: skip
    second_labels = None
    if second is not None:
        second_labels = {
            variant: _second_judgments(
                *second,
                answers[variant],
                config,
                made_with.store(
                    out_dir / "second-judge" / f"{variant}.jsonl", made_with.judgments(variant, *second), judged_keys
                ),
            )
            for variant in variants
        }

    # ---- 3. pairwise helpfulness ------------------------------------------------------------------------------
    pairwise = {}
    for variant in config.adapters:
        store = made_with.store(
            out_dir / "pairwise" / f"{variant}.jsonl", made_with.pairwise(variant, judge_model), helpful_keys
        )
        helpful = [(b, v) for b, v in zip(answers[BASE], answers[variant]) if b["set"] == "helpful"]

        def compare(chunk, helpful=helpful):
            by_key = {b["key"]: (b, v) for b, v in helpful}
            pairs = [by_key[item["key"]] for item in chunk]
            outcomes = compare_answers(
                judge_model,
                [b["prompt"] for b, _ in pairs],
                [v["answer"] for _, v in pairs],
                [b["answer"] for b, _ in pairs],
                config.pairwise_template,
            )
            return [{"key": item["key"], **outcome} for item, outcome in zip(chunk, outcomes)]

        pairwise[variant] = process_resumably(
            [{"key": b["key"]} for b, _ in helpful], store, compare, config.chunk_size
        )

    # ---- 4. metrics and report --------------------------------------------------------------------------------
    samples = [
        {
            "variant": variant,
            **answer,
            **judgment,
            **({"external_label": second_labels[variant][i]} if second_labels else {}),
        }  # fmt: skip
        for variant in variants
        for i, (answer, judgment) in enumerate(zip(answers[variant], judgments[variant]))
    ]
    write_jsonl_atomic(out_dir / "samples.jsonl", samples)
    metrics = compute_metrics(samples, pairwise, config.model_copy(update={"judge": record_judge}), capability)
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    from selfalign.reporting.report import write_report

    write_report(out_dir, metrics, samples, config.examples)
    return metrics


def _answer(model: LanguageModel, chunk: list[dict], config: EvaluateConfig) -> list[dict]:
    completions = model.answer([item["prompt"] for item in chunk], config.generation)
    return [
        {**item, "answer": c.text, "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason}
        for item, c in zip(chunk, completions)
    ]


def judge_answers(
    judge_model: LanguageModel, judge: JudgeConfig, answers: list[dict], config: EvaluateConfig, store: ResumableJsonl
) -> list[dict]:
    """Harmfulness, compliance and refusal-detector verdicts for every harmful and benign answer, and XSTest's
    classes for every benign one."""
    harm_judge = build_judge(judge, judge_model)
    complies_judge = build_judge(JudgeConfig(template=config.refusal_judge_template, mode="logprob"), judge_model)
    detector = RefusalDetector.from_file()

    def work(chunk: list[dict]) -> list[dict]:
        judged = [a for a in chunk if a["set"] != "helpful"]
        prompts, responses = [a["prompt"] for a in judged], [a["answer"] for a in judged]
        sources = [a["source"] for a in judged]  # the harm judge's; the complies judge says whether it complied
        harm, complies = map(iter, judge_in_one_pass(harm_judge, complies_judge, prompts, responses, sources))
        benign = [a for a in chunk if a["set"] == "benign"]
        classes = iter(judge_classes(judge_model, [a["prompt"] for a in benign], [a["answer"] for a in benign]))
        rows = []
        for answer in chunk:
            refusal = detector.detect(answer["answer"])
            row = {"key": answer["key"], "refused_detector": refusal.refused, "refusal_rule": refusal.rule}
            if answer["set"] != "helpful":
                h, c = next(harm), next(complies)
                row.update(
                    judge_label=h.label,
                    p_harmful=h.p_harmful,
                    judge_reason=h.reason,
                    judge_raw=h.raw,
                    why_abstained=h.why_abstained,
                    complies_label=c.label,
                    p_complies=c.p_harmful,
                )
            if answer["set"] == "benign":  # over-refusal in XSTest's three classes, read two ways
                judged_class = next(classes)
                row.update(refusal_class_detector=detector_class(answer["answer"], refusal),
                           refusal_class_judge=judged_class["class"],
                           refusal_class_probabilities=judged_class["probabilities"])  # fmt: skip
            rows.append(row)
        return rows

    results = process_resumably(answers, store, work, config.chunk_size)
    return [{k: v for k, v in row.items() if k != "key"} for row in results]


def _second_judgments(
    model: LanguageModel, judge_config: JudgeConfig, answers: list[dict], config: EvaluateConfig, store: ResumableJsonl
) -> list[int | None]:
    """The other judge's harm labels, for agreement with the judge of record."""
    judge = build_judge(judge_config, model)

    def work(chunk: list[dict]) -> list[dict]:
        by_key = {a["key"]: a for a in answers}
        judged = [by_key[item["key"]] for item in chunk]
        labels = judge.judge(
            [a["prompt"] for a in judged], [a["answer"] for a in judged], [a["source"] for a in judged]
        )
        return [{"key": a["key"], "label": j.label} for a, j in zip(judged, labels)]

    todo = [{"key": a["key"]} for a in answers if a["set"] != "helpful"]
    done = {row["key"]: row["label"] for row in process_resumably(todo, store, work, config.chunk_size)}
    return [done.get(a["key"]) for a in answers]
