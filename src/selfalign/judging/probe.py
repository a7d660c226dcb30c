"""The probe judge: a logistic regression on the judge model's own hidden states for the judge prompt.

Still the model judging itself, but read where it knows more than it says: a small base model's next-token
probability of " 1" is near chance (NOTES), while its hidden states over the same prompt may separate harmful from
harmless answers linearly. The prompt is a judge template rendered as TemplateJudge renders it, up to the template's
response prefix; one forward pass per item, no generation, so it costs what a logprob judgment costs.

Which layer and which pooling (`last` token, mean over the `answer` tokens, mean over the whole `prompt`) are chosen
by cross-validation on the dev split; the weights (standardisation and logistic coefficients) are saved as JSON.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, ValidationError, model_validator

from selfalign.backends.language_model import LanguageModel, Pooling
from selfalign.config import StrictModel, format_validation_error
from selfalign.data.jsonl import write_text_atomic
from selfalign.errors import SelfAlignError
from selfalign.judging.judge import (
    LABEL_CONTINUATIONS,
    Judge,
    JudgeConfig,
    JudgeStats,
    Judgment,
    Source,
    TemplateJudge,
    _check_lengths,
    render_judge_prompts,
)
from selfalign.judging.templates import JudgeTemplate, load_template

logger = logging.getLogger(__name__)

PROBE_FORMAT = "selfalign-probe/1"
PROBE_FILE = "probe.json"  # tune-judge writes it beside judge.yaml
MIN_ITEMS_PER_CLASS = 20  # below this, cross-validated choices of layer and pooling are noise
FOLDS = 5


class ProbeWeights(StrictModel):
    """Everything needed to judge with a fitted probe; the JSON file is this model, dumped."""

    format: Literal["selfalign-probe/1"] = PROBE_FORMAT
    model: str = Field(description="Reference of the model whose hidden states were fitted.")
    adapter: str | None = Field(None, description="The PEFT adapter that model carried, if any.")
    template: str = Field(description="Judge template (name or .yaml path) that renders the probe's input.")
    layer: int = Field(ge=0, description="Index into the model's hidden states: 0 embeddings, N the last layer.")
    pooling: Pooling = Field(description="last, answer or prompt.")
    hidden_size: int = Field(ge=1, description="Width of the hidden states; must match the model that judges.")
    feature_mean: list[float] = Field(description="Standardisation: subtracted from each hidden state.")
    feature_scale: list[float] = Field(description="Standardisation: then divided by this.")
    coefficients: list[float] = Field(description="Logistic regression weights on the standardised features.")
    intercept: float
    regularization: float = Field(gt=0, description="scikit-learn's C (inverse L2 strength) used to fit.")
    fitted_on: dict = Field(default_factory=dict, description="Where it was fitted and its cross-validated scores.")

    @model_validator(mode="after")
    def _widths(self) -> ProbeWeights:
        widths = {len(self.feature_mean), len(self.feature_scale), len(self.coefficients)}
        if widths != {self.hidden_size}:
            raise ValueError(
                f"feature_mean, feature_scale and coefficients need hidden_size ({self.hidden_size}) numbers"
            )
        if any(scale <= 0 for scale in self.feature_scale):
            raise ValueError("feature_scale must be positive")
        return self

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """P(harmful) for rows of hidden states [items, hidden_size]."""
        standardised = (features.astype(np.float64) - np.asarray(self.feature_mean)) / np.asarray(self.feature_scale)
        logits = standardised @ np.asarray(self.coefficients) + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))


@dataclass
class ProbeFit:
    weights: ProbeWeights
    dev_probabilities: list[float]  # out-of-fold P(harmful) of each dev item, for the chosen layer and pooling
    search: list[dict]  # every layer x pooling tried, with its cross-validated AUROC and accuracy


# ---- features ------------------------------------------------------------------------------------------------------


def probe_features(
    model: LanguageModel, template: JudgeTemplate, prompts: Sequence[str], responses: Sequence[str],
    layers: Sequence[int] | None = None,
) -> dict[Pooling, np.ndarray]:  # fmt: skip
    """{pooling: float32 [item, layer, hidden]} over the rendered judge prompts, from one forward pass per item."""
    texts = render_judge_prompts(template, prompts, responses)
    return model.hidden_states(texts, responses, layers, answer_prefix=template.response_prefix)


# ---- fitting -------------------------------------------------------------------------------------------------------


def _pipeline(regularization: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=regularization, max_iter=5000))


def check_class_counts(labels: Sequence[int], labeled: str, design: str = "probe",
                       minimum: int = MIN_ITEMS_PER_CLASS) -> None:  # fmt: skip
    """A trained judge design (the probe, the adapter) needs `minimum` items of each label: one-line error if not."""
    harmful, harmless = sum(1 for y in labels if y == 1), sum(1 for y in labels if y == 0)
    if min(harmful, harmless) < minimum:
        raise SelfAlignError(
            f"{labeled}: label: the {design} needs at least {minimum} training items of each label, "
            f"got {harmful} with label 1 and {harmless} with label 0"
        )


def select_probe(
    features: dict[Pooling, np.ndarray], labels: Sequence[int], layers: Sequence[int], regularization: float = 1.0,
    folds: int = FOLDS, groups: Sequence[str] | None = None,
) -> tuple[tuple[int, Pooling], np.ndarray, list[dict]]:  # fmt: skip
    """The (layer, pooling) with the best cross-validated AUROC (then accuracy), its out-of-fold probabilities, and
    the whole search. `features[pooling][:, k]` are the hidden states of `layers[k]`. With `groups` (the labeled
    set's scenarios: one request answered several ways) a group never spans two folds, so a fold is never scored on
    a request its probe was fitted on."""
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict

    truth = np.asarray(labels)
    splitter = (
        StratifiedKFold(n_splits=folds, shuffle=True, random_state=0) if groups is None
        else StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=0)
    )  # fmt: skip
    search, best, best_probabilities = [], None, None
    for pooling, pooled in features.items():
        for column, layer in enumerate(layers):
            probabilities = cross_val_predict(
                _pipeline(regularization), pooled[:, column], truth, groups=groups, cv=splitter, method="predict_proba"
            )[:, 1]
            row = {
                "layer": layer, "pooling": pooling, "cv_auroc": float(roc_auc_score(truth, probabilities)),
                "cv_accuracy": float(accuracy_score(truth, probabilities >= 0.5)),
            }  # fmt: skip
            search.append(row)
            if best is None or (row["cv_auroc"], row["cv_accuracy"]) > (best["cv_auroc"], best["cv_accuracy"]):
                best, best_probabilities = row, probabilities
    return (best["layer"], best["pooling"]), best_probabilities, search


def fit_probe(
    model: LanguageModel, template_name: str, prompts: Sequence[str], responses: Sequence[str], labels: Sequence[int],
    labeled: str, regularization: float = 1.0, folds: int = FOLDS, groups: Sequence[str] | None = None,
) -> ProbeFit:  # fmt: skip
    """Choose layer x pooling by cross-validation on these (dev) items, then fit the probe on all of them.

    The dev probabilities returned are out-of-fold, so a threshold fitted on them and dev metrics computed from them
    are not the in-sample fit's flattery (the choice of layer and pooling still saw every fold).
    """
    check_class_counts(labels, labeled)
    template = load_template(template_name)
    layers = list(range(model.hidden_state_count))
    started = time.perf_counter()
    features = probe_features(model, template, prompts, responses, layers)
    logger.info("probe: hidden states of %d dev items in %.1f s", len(prompts), time.perf_counter() - started)
    (layer, pooling), dev_probabilities, search = select_probe(features, labels, layers, regularization, folds, groups)

    pipeline = _pipeline(regularization).fit(features[pooling][:, layer], np.asarray(labels))
    scaler, regression = pipeline[0], pipeline[-1]
    best = next(row for row in search if row["layer"] == layer and row["pooling"] == pooling)
    weights = ProbeWeights(
        model=model.config.model, adapter=model.config.adapter, template=template_name, layer=layer, pooling=pooling,
        hidden_size=model.hidden_size, feature_mean=scaler.mean_.tolist(), feature_scale=scaler.scale_.tolist(),
        coefficients=regression.coef_[0].tolist(), intercept=float(regression.intercept_[0]),
        regularization=regularization,
        fitted_on={
            "labeled": labeled, "items": len(labels), "harmful": int(sum(labels)), "folds": folds,
            "folds_by": "scenario" if groups is not None else "item",
            "cv_auroc": best["cv_auroc"], "cv_accuracy": best["cv_accuracy"], "search": search,
        },
    )  # fmt: skip
    logger.info("probe: layer %d, %s pooling, cv AUROC %.3f", layer, pooling, best["cv_auroc"])
    return ProbeFit(weights, [float(p) for p in dev_probabilities], search)


# ---- files ---------------------------------------------------------------------------------------------------------


def save_probe(weights: ProbeWeights, path: str | Path) -> None:
    write_text_atomic(path, json.dumps(weights.model_dump(), indent=1) + "\n")


def load_probe(path: str | Path) -> ProbeWeights:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SelfAlignError(f"{path}: probe weights file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SelfAlignError(f"{path}: not a probe weights file (invalid JSON: {exc})") from None
    if not isinstance(data, dict):
        raise SelfAlignError(f"{path}: a probe weights file is a JSON object")
    try:
        return ProbeWeights.model_validate(data)
    except ValidationError as exc:
        raise SelfAlignError(format_validation_error(exc, str(path)).splitlines()[0]) from None


# ---- judging -------------------------------------------------------------------------------------------------------


class ProbeJudge:
    """P(harmful) = sigmoid(coefficients . standardised hidden state + intercept), labelled with a threshold."""

    def __init__(self, model: LanguageModel, weights: ProbeWeights, threshold: float = 0.5, source: str = "") -> None:
        source = source or "probe weights"
        if weights.hidden_size != model.hidden_size:
            raise SelfAlignError(
                f"{source}: hidden_size: the probe reads hidden states of size {weights.hidden_size}, but "
                f"{model.config.model} has {model.hidden_size}"
            )
        if weights.layer >= model.hidden_state_count:
            raise SelfAlignError(
                f"{source}: layer: {weights.layer} is beyond {model.config.model}'s hidden states "
                f"(0 to {model.hidden_state_count - 1})"
            )
        if weights.model != model.config.model or weights.adapter != model.config.adapter:
            logger.warning("%s was fitted on %s, judging with %s", source, weights.model, model.config.model)
        self.model, self.weights, self.threshold = model, weights, threshold
        self.template = load_template(weights.template)
        self.name = f"probe({self.template.name})"
        self.stats = JudgeStats()

    @classmethod
    def load(cls, config: JudgeConfig, model: LanguageModel) -> ProbeJudge:
        """The probe a judge config names (`weights`, made absolute by load_judge_file)."""
        weights = load_probe(config.weights)
        if "template" in config.model_fields_set and load_template(config.template) != load_template(weights.template):
            raise SelfAlignError(
                f"{config.weights}: template: the probe was fitted on '{weights.template}', the judge config names "
                f"'{config.template}'"
            )
        return cls(model, weights, config.threshold, source=str(config.weights))

    def judge(
        self, prompts: Sequence[str], responses: Sequence[str], sources: Sequence[Source] | None = None
    ) -> list[Judgment]:
        return self.judge_and_score(prompts, responses, sources)[0]

    def reads_as(self, other: Judge) -> bool:
        """Whether `other` reads this probe's judge prompts on the same model by its label tokens' log-probabilities,
        so one forward pass serves both (`judge_in_one_pass`): the demo's probe, fitted on `complies`, and the
        evaluation's complies judge."""
        return (isinstance(other, TemplateJudge) and other.mode == "logprob" and other.model is self.model
                and other.template == self.template)  # fmt: skip

    def judge_and_score(
        self, prompts: Sequence[str], responses: Sequence[str], sources: Sequence[Source] | None,
        continuations: Sequence[str] = (),
    ) -> tuple[list[Judgment], list[list[float]] | None]:  # fmt: skip
        """The probe's judgments, and what `score` gives `continuations` after each judge prompt, from one pass."""
        _check_lengths(prompts, responses, sources)
        if not prompts:
            return [], []
        prefix = self.template.response_prefix
        texts = render_judge_prompts(self.template, prompts, responses)
        started = time.perf_counter()
        pooled, scores = self.model.hidden_states_and_scores(
            texts, responses, [self.weights.layer], prefix, continuations
        )
        probabilities = self.weights.probabilities(pooled[self.weights.pooling][:, 0])
        elapsed = time.perf_counter() - started
        self.stats.items += len(texts)
        self.stats.seconds += elapsed
        self.stats.per_call.append(elapsed)
        self.stats.tokens += sum(self.model.count_tokens(self.model.render(t, prefix)) or 0 for t in texts)
        where = f"layer {self.weights.layer}, {self.weights.pooling} pooling"
        judgments = [Judgment(int(p >= self.threshold), float(p), "", f"probe P(harmful)={p:.4g} ({where})")
                     for p in probabilities]  # fmt: skip
        return judgments, scores


def judge_in_one_pass(
    first: Judge, second: Judge, prompts: Sequence[str], responses: Sequence[str],
    first_sources: Sequence[Source] | None = None, second_sources: Sequence[Source] | None = None,
) -> tuple[list[Judgment], list[Judgment]]:  # fmt: skip
    """`first.judge(prompts, responses, first_sources)` and the same of `second`: from one forward pass where `first`
    is a probe that `second` reads as (`ProbeJudge.reads_as`: the same judge prompts, read by log-probability), else
    each from its own. The evaluation's harm judge and complies judge are such a pair in the demo, where they were
    two passes over the same text."""
    if isinstance(first, ProbeJudge) and first.reads_as(second):
        judgments, label_scores = first.judge_and_score(prompts, responses, first_sources, LABEL_CONTINUATIONS)
        if label_scores is not None:  # else the labels differ in more than their last token here: scored apart
            return judgments, second.judge_from_label_scores(prompts, responses, second_sources, label_scores)
        return judgments, second.judge(prompts, responses, second_sources)
    return first.judge(prompts, responses, first_sources), second.judge(prompts, responses, second_sources)
