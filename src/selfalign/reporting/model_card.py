"""The model card (README.md) of a published adapter: what was trained and what its run measured, from the records.

Like the reports, it reads only a run's files (the adapter's metrics.json and config.yaml, run.json, the evaluate
stage's metrics.json), and it names no local path: the run folder's name and the stage folder's name are enough to
find the run again on the machine that made it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import yaml

from selfalign import __version__
from selfalign.quality import format_rate
from selfalign.reporting.report import difference_lines

EVALUATION_COLUMNS = (  # (where in a variant's metrics, column): the trade-off the evaluation measures
    (("harmless",), "harmless (judge)"),
    (("refused_harmful_detector",), "refused harmful (detector)"),
    (("over_refusal_detector",), "over-refusal (detector)"),
    (("over_refusal_judge",), "over-refusal (judge: did not comply)"),
    (("capability", "acc_norm"), "capability (acc_norm)"),
    (("answer_quality", "loops"), "loops"),
)


@dataclass(frozen=True)
class AdapterRecords:
    """What a card is written from; `None` where the adapter was not trained inside a run or the run has no
    evaluation."""

    variant: str  # the run's stage name (sft, dpo, dpo-round2), which is also the evaluation's variant name
    source: str  # e.g. "run folder `demo`, stage folder `dpo-93f06631017841cf`"
    training: dict[str, Any]  # the adapter folder's metrics.json (training/common.py)
    settings: dict[str, Any]  # the adapter folder's config.yaml: the resolved training settings
    manifest: dict[str, Any] | None  # run.json
    evaluation: dict[str, Any] | None  # the evaluate stage's metrics.json


def public_name(reference: str) -> str:
    """A model reference fit to publish: a local path shrinks to its last part, anything else stays as written."""
    looks_local = reference.startswith(("/", "~", ".")) or "\\" in reference or reference.count("/") > 1
    return PurePath(reference).name if looks_local else reference


def model_card(records: AdapterRecords, repo: str, base_model: str | None) -> str:
    method = str(records.training.get("stage") or records.settings.get("stage") or "adapter")
    front = {
        "library_name": "peft",
        **({"base_model": base_model} if base_model else {}),
        "tags": ["selfalign", "lora", method, "harmlessness"],
    }
    trained_on = public_name(str(records.training.get("model") or records.settings.get("model") or "unknown"))
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {repo}",
        "",
        f"A LoRA adapter on `{base_model or trained_on}`, trained by selfalign's self-alignment loop for "
        f"harmlessness: {method.upper()} on preference pairs the model made from its own answers, judged and "
        f"revised by itself. From {records.source}, variant `{records.variant}`.",
        "",
    ]
    if base_model and trained_on != base_model:
        lines += [f"Trained on `{trained_on}`; `{base_model}` is the Hub model it stands for, so loading the adapter "
                  "on it can differ slightly from what was measured here.", ""]  # fmt: skip
    lines += training_lines(records, method)
    lines += evaluation_lines(records)
    if base_model:
        lines += usage_lines(repo)
    return "\n".join(lines).rstrip() + "\n"


def _number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def _before_after(training: dict[str, Any], key: str) -> str | None:
    before, after = (training.get(section) or {} for section in ("eval_before", "eval_after"))
    if key not in before and key not in after:
        return None
    return f"{_number(before.get(key))} -> {_number(after.get(key))}"


def training_lines(records: AdapterRecords, method: str) -> list[str]:
    """One table of how the adapter was trained: method, size of the data, steps, losses, LoRA and optimizer."""
    training, settings = records.training, records.settings
    train, examples = training.get("train") or {}, training.get("examples") or {}
    start = str(training.get("start") or "")
    if method == "dpo" and start.startswith("SFT adapter"):
        how = "DPO, continuing the run's SFT adapter (this adapter holds both)"
    else:
        how = method.upper() + (" from a fresh adapter on the base model" if start == "base model" else "")
    lora = settings.get("lora") or {}
    method_settings = settings.get(method) or {}
    rows = [
        ("method", how),
        ("trained on", f"`{public_name(str(training.get('model') or settings.get('model') or 'unknown'))}`"),
        ("examples", f"{examples.get('train', 'n/a')} train, {examples.get('eval', 'n/a')} held out"
                     + (f", {examples['too_long']} too long, left out" if examples.get("too_long") else "")),
        ("steps", str(train.get("steps", "n/a"))),
        ("tokens trained", _number(train.get("tokens"), 6)),
        ("training loss (mean over steps)", _number(train.get("loss"))),
        ("held-out loss before -> after", _before_after(training, "eval_loss")),
        ("held-out reward accuracy before -> after", _before_after(training, "eval_rewards/accuracies")),
        ("learning rate", _number(method_settings.get("learning_rate"))),
        ("DPO beta", _number(method_settings.get("beta")) if method == "dpo" else None),
        ("batch size, max length", f"{settings.get('batch_size', 'n/a')}, {settings.get('max_length', 'n/a')} tokens"),
        ("LoRA", f"r={lora.get('r', 'n/a')}, alpha={lora.get('alpha', 'n/a')}, dropout={lora.get('dropout', 'n/a')}, "
                 f"on {', '.join(lora.get('target_modules') or []) or 'n/a'}"),
        ("seed", str(settings.get("seed", (records.manifest or {}).get("seed", "n/a")))),
        ("versions", versions(records)),
    ]  # fmt: skip
    return ["## Training", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows if v is not None), ""]


def versions(records: AdapterRecords) -> str:
    """selfalign's version from run.json (an adapter trained outside a run does not record it) and the libraries'."""
    packages = dict((records.manifest or {}).get("packages") or {})
    packages.update({k: v for k, v in (records.training.get("versions") or {}).items() if k not in packages})
    trained_with = packages.pop("selfalign", None) or "not recorded"
    others = ", ".join(f"{name} {packages[name]}" for name in ("peft", "trl", "transformers", "torch") if
                       packages.get(name))  # fmt: skip
    return f"selfalign {trained_with} ({others}); card written by selfalign {__version__}"


def _rate_at(metrics: dict[str, Any], path: tuple[str, ...]) -> str:
    value: Any = metrics
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return format_rate(value) if isinstance(value, dict) and "rate" in value else "n/a"


def evaluation_lines(records: AdapterRecords) -> list[str]:
    """The variant beside the base, the paired differences, and how far one run's numbers reach."""
    metrics, variant = records.evaluation, records.variant
    if not metrics or variant not in metrics.get("models", {}) or "base" not in metrics.get("models", {}):
        return ["## Evaluation", "", "The run records no evaluation of this adapter.", ""]
    models = metrics["models"]
    header = [label for _, label in EVALUATION_COLUMNS]
    lines = [
        "## Evaluation",
        "",
        f"Judge: `{metrics.get('judge', 'n/a')}`. Rates with 95% Wilson intervals and (count/n); judge abstentions "
        "are counted apart, never as harmless.",
        "",
        "| model | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(header),
        *(f"| {name} | " + " | ".join(_rate_at(models[name], path) for path, _ in EVALUATION_COLUMNS) + " |"
          for name in ("base", variant)),
        "",
        *difference_lines({"variants": ["base", variant], "models": {n: models[n] for n in ("base", variant)}}),
        "",
        sample_note(records),
        "",
    ]  # fmt: skip
    return lines


def sample_note(records: AdapterRecords) -> str:
    """How much the numbers rest on, as the run recorded it: one seed and the prompts each rate counts."""
    metrics = records.evaluation or {}
    model = metrics["models"][records.variant]
    harmful = (model.get("refused_harmful_detector") or {}).get("n")
    benign = (model.get("over_refusal_detector") or {}).get("n")
    questions = ((model.get("capability") or {}).get("acc_norm") or {}).get("n")
    seed = (records.manifest or {}).get("seed", records.settings.get("seed"))
    sets = f"{harmful} harmful and {benign} benign prompts" if harmful != benign else f"{harmful} prompts per set"
    capability = f" and {questions} capability questions" if questions else ""
    return (
        f"These numbers come from one run with one seed ({seed}) on {sets}{capability}, so only large differences "
        "stand out from the noise; another seed or other prompts can move them by several points."
    )


def usage_lines(repo: str) -> list[str]:
    return [
        "## Use",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")',
        "```",
        "",
    ]
