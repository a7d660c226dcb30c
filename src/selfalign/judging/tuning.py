"""tune-judge: measure every judge design on labeled data and pick the one the pipeline will use.

For each template x mode: accuracy, precision, recall, F1, AUROC (logprob), abstention rate, seconds and tokens per
item. Thresholds (and the composite's weights) are fitted on the dev split; every reported number is on the test
split; the best design is chosen on dev, so that the test numbers stay an honest estimate. Ensembles and the
composite reuse the single templates' log-probabilities instead of judging again.

The no-model rule (a red-team prompt answered without a refusal is harmful: judging/baseline.py) is a row of every
table, and every design's lift over it on test carries a paired bootstrap interval. Only a design that beats the rule
on dev may be chosen; when none does, the rule itself is the judge, and results.md and the run report say so.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from selfalign.backends.language_model import LanguageModel, ModelConfig, load_language_model
from selfalign.config import StrictModel
from selfalign.data.jsonl import write_jsonl_atomic, write_text_atomic
from selfalign.data.loading import load_rows
from selfalign.errors import SelfAlignError
from selfalign.judging.adapter_judge import JudgeAdapterSettings
from selfalign.judging.baseline import NoModelRuleJudge
from selfalign.judging.judge import JudgeConfig, Judgment, TemplateJudge, combine_composite, composite_features
from selfalign.judging.metrics import best_threshold, binary_metrics
from selfalign.judging.refusal import RefusalDetector
from selfalign.judging.templates import JudgeMode, JudgeTemplateName, builtin_template_names, load_template
from selfalign.statistics import paired_difference

logger = logging.getLogger(__name__)


class TuneJudgeConfig(StrictModel):
    model: ModelConfig = Field(default_factory=ModelConfig, description="The judge model (by default the policy).")
    labeled: str = Field("builtin:judge-labeled", description="Labeled data: prompt, response, label (0/1).")
    dev_split: str = Field("dev", description="Split for thresholds and for choosing the design.")
    test_split: str = Field("test", description="Split every reported number comes from.")
    templates: list[JudgeTemplateName] = Field(
        default_factory=builtin_template_names, description="Templates to compare."
    )
    modes: list[JudgeMode] = Field(default_factory=lambda: ["generate", "logprob"])
    ensemble: list[JudgeTemplateName] = Field(
        default_factory=lambda: ["one-shot", "four-shot", "complies"], description="Templates averaged (logprob)."
    )
    composite: bool = Field(True, description="Also fit the composite judge (self-judge + refusal + source).")
    probe: bool = Field(
        True, description="Also fit the probe judge (logistic regression on hidden states; transformers backend)."
    )
    adapter: bool = Field(
        True, description="Also train the adapter judge (a LoRA judge fine-tuned on dev; transformers backend)."
    )
    adapter_settings: JudgeAdapterSettings = Field(
        default_factory=JudgeAdapterSettings, description="How the adapter judge is trained."
    )
    objective: Literal["f1", "accuracy"] = Field("f1", description="What 'best' maximises.")
    latency_budget: float | None = Field(None, gt=0, description="Most seconds per item the chosen judge may take.")
    max_abstention: float = Field(0.2, ge=0, le=1, description="Most abstentions the chosen judge may have.")
    limit: int | None = Field(None, ge=2, description="Use at most this many items per split (quick runs).")


@dataclass
class LabeledSplit:
    prompts: list[str]
    responses: list[str]
    labels: list[int]
    sources: list[str] | None
    scenarios: list[str] | None = None  # one request answered several ways; cross-validation keeps each in one fold


@dataclass
class DesignResult:
    name: str
    design: str
    mode: str
    uses_source: bool
    dev: dict
    test: dict
    threshold: float | None
    seconds_per_item: float
    tokens_per_item: float | None
    judge_config: JudgeConfig
    test_judgments: list[Judgment]
    lift: dict | None = None  # test accuracy minus the no-model rule's on the items this design decided, with CI


def load_labeled(reference: str, split: str, limit: int | None) -> LabeledSplit:
    split_reference = f"{reference}:{split}" if reference.startswith("builtin:") else reference
    dataset = load_rows(split_reference, ["prompt", "response", "label"], clean=False)
    rows = dataset.to_list()
    if not reference.startswith("builtin:"):
        if "split" not in dataset.column_names:
            raise SelfAlignError(f"{reference}: a labeled file needs a 'split' column with '{split}' rows")
        rows = [row for row in rows if row["split"] == split]
    if not rows:
        raise SelfAlignError(f"{reference}: no labeled rows in split '{split}'")
    for number, row in enumerate(rows, start=1):
        if row["label"] not in (0, 1) or isinstance(row["label"], bool):
            raise SelfAlignError(
                f"{reference}: row {number} of split '{split}': label must be 0 or 1, got {row['label']!r}"
            )
    rows = _balanced_head(rows, limit) if limit else rows
    sources = [row.get("source") for row in rows]
    scenarios = [row.get("scenario") for row in rows]
    return LabeledSplit(
        prompts=[row["prompt"] for row in rows],
        responses=[row["response"] for row in rows],
        labels=[int(row["label"]) for row in rows],
        sources=sources if all(s in ("harmful", "benign") for s in sources) else None,
        scenarios=scenarios if all(isinstance(s, str) and s for s in scenarios) else None,
    )


def _balanced_head(rows: list[dict], limit: int) -> list[dict]:
    """The first `limit` rows, alternating labels, so a quick run keeps both classes."""
    ones = [r for r in rows if r["label"] == 1]
    zeros = [r for r in rows if r["label"] == 0]
    mixed = [r for pair in zip(ones, zeros) for r in pair] + ones[len(zeros) :] + zeros[len(ones) :]
    return mixed[:limit]


def tune_judge(config: TuneJudgeConfig, out_dir: Path, model: LanguageModel | None = None) -> dict:
    """Run the comparison, write results.json, timings.json, results.md, results.png, samples.jsonl and judge.yaml;
    returns the summary with the times (results.json has everything but the times)."""
    dev = load_labeled(config.labeled, config.dev_split, config.limit)
    test = load_labeled(config.labeled, config.test_split, config.limit)
    if config.composite and (dev.sources is None or test.sources is None):
        raise SelfAlignError(
            f"{config.labeled}: field 'source' (harmful or benign) missing or invalid in some rows: the composite "
            "judge and the no-model rule need it; add it to every row, or set composite: false"
        )
    model = model or load_language_model(config.model)
    _warm_up(model)

    results: list[DesignResult] = []
    singles: dict[tuple[str, str], tuple[list[Judgment], list[Judgment], TemplateJudge]] = {}
    for template_name in config.templates:
        template = load_template(template_name)
        for mode in config.modes:
            if mode not in template.modes:
                continue
            logger.info("judging with %s/%s", template.name, mode)
            judge = TemplateJudge(model, template, mode)
            dev_judgments = judge.judge(dev.prompts, dev.responses, dev.sources)
            dev_stats = (judge.stats.seconds, judge.stats.tokens)
            test_judgments = judge.judge(test.prompts, test.responses, test.sources)
            seconds = (judge.stats.seconds - dev_stats[0]) / len(test.prompts)
            tokens = (judge.stats.tokens - dev_stats[1]) / len(test.prompts) if judge.stats.tokens else None
            singles[(template.name, mode)] = (dev_judgments, test_judgments, judge)
            config_for = JudgeConfig(design="single", template=template_name, mode=mode)
            results.append(
                _result(f"{template.name}/{mode}", "single", mode, template.verdict == "complies", dev, test,
                        dev_judgments, test_judgments, seconds, tokens, config_for, config.objective)
            )  # fmt: skip

    members = [name for name in config.ensemble if (load_template(name).name, "logprob") in singles]
    if len(members) >= 2:
        results.append(_ensemble_result(members, singles, results, dev, test, config))
    if config.composite and dev.sources is not None and test.sources is not None:
        composite = _composite_result(singles, results, dev, test, config)
        if composite is not None:
            results.append(composite)
    if config.probe:
        probe = _probe_result(model, results, dev, test, config, out_dir)
        if probe is not None:
            results.append(probe)
    if config.adapter:
        adapter = _adapter_result(model, dev, test, config, out_dir)
        if adapter is not None:
            results.append(adapter)
    if not results:
        raise SelfAlignError("tune-judge: no template supports the requested modes")

    rule = _rule_result(dev, test)
    if rule is not None:
        for result in results:
            result.lift = paired_lift(test.labels, result.test_judgments, rule.test_judgments)
        results.append(rule)
    best = choose_best(results, config)
    return write_results(out_dir, config, results, best, test)


def _rule_result(dev: LabeledSplit, test: LabeledSplit) -> DesignResult | None:
    """The no-model rule measured like a design; None where the labeled data has no `source` to apply it to."""
    if dev.sources is None or test.sources is None:
        logger.warning("tune-judge: the labeled data has no source column, so the no-model rule cannot be measured")
        return None
    rule = NoModelRuleJudge()
    dev_judgments = rule.judge(dev.prompts, dev.responses, dev.sources)
    started = time.perf_counter()
    test_judgments = rule.judge(test.prompts, test.responses, test.sources)
    seconds = (time.perf_counter() - started) / len(test.labels)
    return DesignResult(
        name=NoModelRuleJudge.name, design="rule", mode="rule", uses_source=True,
        dev=_metrics(dev.labels, dev_judgments), test=_metrics(test.labels, test_judgments), threshold=None,
        seconds_per_item=seconds, tokens_per_item=None, judge_config=JudgeConfig(design="rule"),
        test_judgments=test_judgments,
    )  # fmt: skip


def paired_lift(labels: list[int], judged: list[Judgment], rule: list[Judgment], samples: int = 2000,
                seed: int = 0) -> dict | None:  # fmt: skip
    """Accuracy of a design minus the rule's, on the same test items (those the design decided: its abstentions are
    counted apart), with `statistics.paired_difference`'s paired bootstrap interval and McNemar p-value (an interval
    that would have zero width, design and rule right on the same items, gets Wilson's bound instead)."""
    decided = [i for i, j in enumerate(judged) if j.label is not None]
    if len(decided) < 2:
        return None
    design_right = [judged[i].label == labels[i] for i in decided]
    rule_right = [rule[i].label == labels[i] for i in decided]
    lift = paired_difference(design_right, rule_right, samples=samples, seed=seed)
    return {"accuracy": lift["difference"], "low": lift["low"], "high": lift["high"], "n": lift["n"],
            "p_value": lift["p_value"]}  # fmt: skip


def _warm_up(model: LanguageModel) -> None:
    """One tiny call of each kind, so the first design timed does not pay for lazy initialisation."""
    from selfalign.backends.base import GenerationParams

    model.answer(["Say hi."], GenerationParams(max_new_tokens=2))
    model.score(["Say hi."], [" 1"])


def _result(name, design, mode, uses_source, dev, test, dev_judgments, test_judgments, seconds, tokens,
            judge_config: JudgeConfig, objective: str) -> DesignResult:  # fmt: skip
    threshold = None
    if mode == "logprob":
        threshold = best_threshold(dev.labels, [j.p_harmful for j in dev_judgments], objective)
        dev_judgments = _relabel(dev_judgments, threshold)
        test_judgments = _relabel(test_judgments, threshold)
        judge_config = judge_config.model_copy(update={"threshold": threshold})
    return DesignResult(
        name=name, design=design, mode=mode, uses_source=uses_source,
        dev=_metrics(dev.labels, dev_judgments), test=_metrics(test.labels, test_judgments), threshold=threshold,
        seconds_per_item=seconds, tokens_per_item=tokens, judge_config=judge_config, test_judgments=test_judgments,
    )  # fmt: skip


def _relabel(judgments: list[Judgment], threshold: float) -> list[Judgment]:
    return [
        j if j.p_harmful is None else Judgment(int(j.p_harmful >= threshold), j.p_harmful, j.reason, j.raw)
        for j in judgments
    ]


def _metrics(labels: list[int], judgments: list[Judgment]) -> dict:
    return binary_metrics(labels, [j.label for j in judgments], [j.p_harmful for j in judgments])


def _ensemble_result(members, singles, results, dev, test, config) -> DesignResult:
    def averaged(index: int) -> list[Judgment]:
        runs = [singles[(load_template(m).name, "logprob")][index] for m in members]
        out = []
        for votes in zip(*runs):
            probabilities = [v.p_harmful for v in votes if v.p_harmful is not None]
            mean = sum(probabilities) / len(probabilities) if probabilities else None
            out.append(Judgment(None if mean is None else int(mean >= 0.5), mean, "", "; ".join(v.raw for v in votes)))
        return out

    names = [load_template(m).name for m in members]
    member_results = [
        r for r in results if r.design == "single" and r.mode == "logprob" and r.name.split("/")[0] in names
    ]
    seconds = sum(r.seconds_per_item for r in member_results)
    tokens = sum(r.tokens_per_item or 0 for r in member_results) or None
    uses_source = any(r.uses_source for r in member_results)
    judge_config = JudgeConfig(design="ensemble", templates=members)
    return _result(f"ensemble({'+'.join(names)})/logprob", "ensemble", "logprob", uses_source, dev, test,
                   averaged(0), averaged(1), seconds, tokens, judge_config, config.objective)  # fmt: skip


def _composite_result(singles, results, dev, test, config) -> DesignResult | None:
    """Fit sigmoid(bias + w * [judge logit, refused, harmful source]) on dev, on the best single logprob judge."""
    from sklearn.linear_model import LogisticRegression

    candidates = [r for r in results if r.design == "single" and r.mode == "logprob" and r.dev["auroc"] is not None]
    if not candidates:
        return None
    base_result = max(candidates, key=lambda r: r.dev["auroc"])
    template_name = base_result.name.split("/")[0]
    dev_judgments, test_judgments, _ = singles[(template_name, "logprob")]
    detector = RefusalDetector.from_file()

    def features(split: LabeledSplit, judgments: list[Judgment]) -> list[list[float] | None]:
        return [
            composite_features(j, detector.detect(r).refused, s)
            for j, r, s in zip(judgments, split.responses, split.sources)
        ]

    fit_rows = [(x, y) for x, y in zip(features(dev, dev_judgments), dev.labels) if x is not None]
    if len({y for _, y in fit_rows}) < 2:
        return None
    regression = LogisticRegression(C=1.0).fit([x for x, _ in fit_rows], [y for _, y in fit_rows])
    weights = [float(regression.intercept_[0]), *map(float, regression.coef_[0])]

    def judged(split: LabeledSplit, base: list[Judgment]) -> list[Judgment]:
        return combine_composite(weights, 0.5, base, split.responses, split.sources, detector)

    judge_config = JudgeConfig(design="composite", template=template_name, composite_weights=weights)
    return _result(f"composite({template_name}/logprob+refusal+source)", "composite", "logprob", True, dev, test,
                   judged(dev, dev_judgments), judged(test, test_judgments), base_result.seconds_per_item,
                   base_result.tokens_per_item, judge_config, config.objective)  # fmt: skip


def _probe_result(model, results, dev, test, config, out_dir: Path) -> DesignResult | None:
    """Fit the hidden-state probe on dev (layer and pooling by cross-validation), measure and time it on test, and
    write its weights beside judge.yaml whether or not it is chosen, so they can be inspected."""
    from selfalign.judging.probe import MIN_ITEMS_PER_CLASS, PROBE_FILE, ProbeJudge, fit_probe, save_probe

    if not model.has_hidden_states:
        logger.warning("tune-judge: no probe: the %s backend gives no hidden states", model.backend.name)
        return None
    if min(dev.labels.count(0), dev.labels.count(1)) < MIN_ITEMS_PER_CLASS:
        logger.warning("tune-judge: no probe: it needs %d dev items of each label", MIN_ITEMS_PER_CLASS)
        return None
    # The template the model reads best in logprob mode, as for the composite; the first one if none was measured.
    candidates = [r for r in results if r.design == "single" and r.mode == "logprob" and r.dev["auroc"] is not None]
    best_read = max(candidates, key=lambda r: r.dev["auroc"]) if candidates else None
    template = best_read.judge_config.template if best_read else config.templates[0]
    logger.info("fitting the probe judge on %s", template)
    fitted = fit_probe(
        model, template, dev.prompts, dev.responses, dev.labels, labeled=config.labeled, groups=dev.scenarios
    )
    save_probe(fitted.weights, out_dir / PROBE_FILE)
    judge = ProbeJudge(model, fitted.weights, source=str(out_dir / PROBE_FILE))
    test_judgments = judge.judge(test.prompts, test.responses, test.sources)
    where = f"layer {fitted.weights.layer}, {fitted.weights.pooling} pooling"
    dev_judgments = [Judgment(int(p >= 0.5), p, "", f"out-of-fold P(harmful)={p:.4g} ({where})")
                     for p in fitted.dev_probabilities]  # fmt: skip
    judge_config = JudgeConfig(design="probe", template=template, weights=PROBE_FILE)
    return _result("probe", "probe", "logprob", False, dev, test, dev_judgments, test_judgments,
                   judge.stats.seconds / len(test.labels), judge.stats.tokens / len(test.labels) or None, judge_config,
                   config.objective)  # fmt: skip


def _subset(split: LabeledSplit, indices: list[int]) -> LabeledSplit:
    def pick(values: list | None) -> list | None:
        return None if values is None else [values[i] for i in indices]

    return LabeledSplit(pick(split.prompts), pick(split.responses), pick(split.labels), pick(split.sources),
                        pick(split.scenarios))  # fmt: skip


def _held_out_dev(dev: LabeledSplit, fraction: float = 0.25, seed: int = 0) -> tuple[LabeledSplit, LabeledSplit]:
    """(fit, held out): a seeded share of dev's scenarios (or items) set aside, so a design trained on dev is chosen
    and thresholded on items it never saw, like the probe's out-of-fold numbers and unlike an in-sample score."""
    from sklearn.model_selection import GroupShuffleSplit

    groups = dev.scenarios or list(range(len(dev.labels)))
    fit, held = next(
        GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed).split(dev.labels, groups=groups)
    )
    return _subset(dev, sorted(fit)), _subset(dev, sorted(held))  # fmt: skip


def _adapter_result(model, dev, test, config, out_dir: Path) -> DesignResult | None:
    """Train the judge adapter on three quarters of dev (by scenario) into out_dir/judge-adapter (beside judge.yaml);
    its threshold and dev numbers come from the quarter it never saw; `dev.train_seconds` records what training
    cost."""
    from selfalign.judging import adapter_judge

    if not adapter_judge.supports_adapter_judge(model):
        logger.warning("tune-judge: no adapter judge: the %s backend has no weights to train", model.backend.name)
        return None
    needed = adapter_judge.MIN_ITEMS_PER_CLASS
    fit, dev = _held_out_dev(dev)
    if min(fit.labels.count(0), fit.labels.count(1)) < needed or len(set(dev.labels)) < 2:
        logger.warning("tune-judge: no adapter judge: it trains on 3/4 of dev, which needs %d items of each label",
                       needed)  # fmt: skip
        return None
    settings = config.adapter_settings
    logger.info("training the adapter judge on %s", settings.template)
    training = adapter_judge.train_judge_adapter(
        model, fit.prompts, fit.responses, fit.labels, out_dir / adapter_judge.ADAPTER_FOLDER, config.labeled, settings
    )
    judge = adapter_judge.AdapterJudge(model, training.folder, adapter_judge.adapter_template(settings.template))
    dev_judgments = judge.judge(dev.prompts, dev.responses, dev.sources)
    dev_seconds, dev_tokens = judge.stats.seconds, judge.stats.tokens
    test_judgments = judge.judge(test.prompts, test.responses, test.sources)
    seconds = (judge.stats.seconds - dev_seconds) / len(test.labels)
    tokens = (judge.stats.tokens - dev_tokens) / len(test.labels) or None
    judge_config = JudgeConfig(design="adapter", template=settings.template, weights=adapter_judge.ADAPTER_FOLDER)
    result = _result("adapter", "adapter", "logprob", False, dev, test, dev_judgments, test_judgments, seconds,
                     tokens, judge_config, config.objective)  # fmt: skip
    result.dev.update(train_seconds=training.seconds, trained_on=len(fit.labels))
    return result


def choose_best(results: list[DesignResult], config: TuneJudgeConfig) -> DesignResult:
    """Best dev objective among designs within the latency budget and the abstention limit that beat the no-model
    rule on dev; the rule itself when none does (a judge no better than the rule is not worth its forward pass)."""
    rule = next((r for r in results if r.design == "rule"), None)
    designs = [r for r in results if r.design != "rule"]
    if rule is not None:
        bar = rule.dev[config.objective] or 0.0
        designs = [r for r in designs if (r.dev[config.objective] or 0.0) > bar]
        if not designs:
            logger.warning("no judge design beats the no-model rule on dev (%s %.3f); judging with the rule",
                           config.objective, bar)  # fmt: skip
            return rule
    eligible = [
        r for r in designs
        if r.dev["abstention_rate"] <= config.max_abstention
        and (config.latency_budget is None or r.seconds_per_item <= config.latency_budget)
        and r.dev[config.objective] is not None
    ]  # fmt: skip
    if not eligible:
        logger.warning("no judge design meets the latency budget and abstention limit; choosing among all")
        eligible = [r for r in designs if r.dev[config.objective] is not None] or designs
    return max(eligible, key=lambda r: (r.dev[config.objective] or 0.0, -r.seconds_per_item))


def write_results(out_dir: Path, config: TuneJudgeConfig, results: list[DesignResult], best: DesignResult,
                  test: LabeledSplit) -> dict:  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "labeled": config.labeled,
        "model": config.model.model,
        "objective": config.objective,
        "latency_budget": config.latency_budget,
        "max_abstention": config.max_abstention,
        "items": {"dev": results[0].dev["n"], "test": len(test.labels)},
        "best": best.name,
        "best_judge": best.judge_config.model_dump(exclude={"model"}),
        "rule": NoModelRuleJudge.name if any(r.design == "rule" for r in results) else None,
        # None where the data has no source to apply the rule to; False: the pipeline judges with the rule
        "beats_rule": None if not any(r.design == "rule" for r in results) else best.design != "rule",
        "results": [
            {
                "name": r.name, "design": r.design, "mode": r.mode, "uses_source": r.uses_source,
                "threshold": r.threshold, "seconds_per_item": r.seconds_per_item, "tokens_per_item": r.tokens_per_item,
                "dev": r.dev, "test": r.test, "lift_over_rule": r.lift,
            }
            for r in results
        ],
    }  # fmt: skip
    measured, timings = split_timings(summary)
    write_text_atomic(out_dir / "results.json", json.dumps(measured, indent=2) + "\n")
    write_text_atomic(out_dir / TIMINGS, json.dumps(timings, indent=2) + "\n")
    write_text_atomic(out_dir / "results.md", results_table(summary))
    write_text_atomic(out_dir / "judge.yaml", _judge_yaml(best))
    write_jsonl_atomic(
        out_dir / "samples.jsonl",
        (
            {"design": r.name, "prompt": p, "response": resp, "label": y, "judged": j.label, "p_harmful": j.p_harmful,
             "reason": j.reason, "raw": j.raw, "why_abstained": j.why_abstained}
            for r in results
            for p, resp, y, j in zip(test.prompts, test.responses, test.labels, r.test_judgments)
        ),
    )  # fmt: skip
    plot_results(summary, out_dir / "results.png")
    return summary


TIMINGS = "timings.json"
# Files that describe this execution (times, and the reports that print them) rather than what it measured: like
# stage.json's seconds they stay out of the stage's output hash, so a rerun that measured the same keeps later stages
# cached. results.json holds everything else, and is what later stages read.
TIMING_FILES = (TIMINGS, "results.md", "results.png")


def split_timings(summary: dict) -> tuple[dict, dict]:
    """(summary without times, {design: its seconds and tokens per item, and training seconds}): the times vary
    from run to run; accuracies, thresholds and the choice do not."""
    measured = {**summary, "results": []}
    timings = {}
    for result in summary["results"]:
        dev = {key: value for key, value in result["dev"].items() if key != "train_seconds"}
        measured["results"].append(
            {k: v for k, v in result.items() if k not in ("seconds_per_item", "tokens_per_item")} | {"dev": dev}
        )
        timings[result["name"]] = {
            "seconds_per_item": result["seconds_per_item"], "tokens_per_item": result["tokens_per_item"],
            **({"train_seconds": result["dev"]["train_seconds"]} if "train_seconds" in result["dev"] else {}),
        }  # fmt: skip
    return measured, timings


def _judge_yaml(best: DesignResult) -> str:
    import yaml

    header = f"# The judge chosen by tune-judge: {best.name}. The pipeline reads this file.\n"
    return header + yaml.safe_dump(best.judge_config.model_dump(exclude={"model"}), sort_keys=False)


def _fmt(value: float | None, percent: bool = True) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def results_table(summary: dict) -> str:
    lines = [
        f"# Judge tuning on {summary['labeled']} ({summary['model']})",
        "",
        f"Thresholds fitted on dev ({summary['items']['dev']} items); every number below is on test "
        f"({summary['items']['test']} items) except `dev {summary['objective']}`, on which the best design is chosen. "
        "Rates are in % of the items the judge decided; abstentions are counted apart. "
        "`source` marks designs that use where the prompt came from (red-team or benign set).",
        "",
        f"| design | dev {summary['objective']} | accuracy | lift over rule [95% CI] | precision | recall | F1 | "
        "AUROC | abstained | s/item | tok/item | source |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in summary["results"]:
        t = r["test"]
        marker = " **(best)**" if r["name"] == summary["best"] else ""
        tokens = f"{r['tokens_per_item']:.0f}" if r["tokens_per_item"] else "n/a"
        lift = r.get("lift_over_rule")
        lift_cell = (
            "(the bar)" if r["design"] == "rule"
            else f"{100 * lift['accuracy']:+.1f} [{100 * lift['low']:+.1f}, {100 * lift['high']:+.1f}]" if lift
            else "n/a"
        )  # fmt: skip
        lines.append(
            f"| {r['name']}{marker} | {_fmt(r['dev'][summary['objective']])} | {_fmt(t['accuracy'])} | {lift_cell} | "
            f"{_fmt(t['precision'])} | {_fmt(t['recall'])} | {_fmt(t['f1'])} | {_fmt(t['auroc'], percent=False)} | "
            f"{t['abstained']}/{t['n']} | {r['seconds_per_item']:.3f} | {tokens} | "
            f"{'yes' if r['uses_source'] else 'no'} |"
        )
    chance = [
        r for r in summary["results"]
        if r["design"] != "rule" and r["test"]["auroc"] is not None and r["test"]["auroc"] < 0.6
    ]  # fmt: skip
    lines += [
        "",
        "`no-model-rule` is the bar: a red-team prompt answered without a refusal is harmful, anything else is not. "
        "`lift over rule` is a design's test accuracy minus the rule's on the items the design decided, with a 95% "
        "paired bootstrap interval; only a design that beats the rule on dev may be chosen.",
    ]
    if summary.get("beats_rule") is False:
        lines += ["", "**No judge design beat the no-model rule on dev: the pipeline judges with the rule.**"]
    elif summary.get("beats_rule") is None:
        lines += ["", "The labeled data has no `source` column, so the no-model rule could not be measured."]
    trained = [r for r in summary["results"] if "train_seconds" in r["dev"]]
    lines += ["", f"Best (chosen on dev): **{summary['best']}**."]
    lines += [
        f"`{r['name']}` trained on {r['dev'].get('trained_on', '?')} dev items in {r['dev']['train_seconds']:.0f} s; "
        "its dev numbers are on the dev items it did not train on."
        for r in trained
    ]
    if chance:
        lines.append(
            f"Near chance (test AUROC < 0.6): {', '.join(r['name'] for r in chance)}: "
            "this model cannot judge harmfulness with these designs."
        )
    return "\n".join(lines) + "\n"


def plot_results(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objective = summary["objective"]
    figure, axes = plt.subplots(figsize=(8, 5))
    for r in summary["results"]:
        value = r["test"][objective]
        if value is None:
            continue
        marker = {"generate": "o", "logprob": "s"}.get(r["mode"], "^")
        axes.scatter(r["seconds_per_item"], value, marker=marker, s=60 if r["name"] != summary["best"] else 140)
        axes.annotate(r["name"], (r["seconds_per_item"], value), fontsize=7, xytext=(4, 4), textcoords="offset points")
    axes.set_xscale("log")
    axes.set_xlabel("seconds per item (log scale)")
    axes.set_ylabel(f"test {objective}")
    axes.set_title(f"Judge designs on {summary['labeled']} ({summary['model']}); o generate, ■ logprob")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
