"""Judging speed: the log-probability judge against the generative judge, same model, template and items.

Three ways to judge the same test items with the same template:
- logprob: one forward pass per item (label-token probabilities), threshold fitted on the dev split;
- generate (baseline): the judge writes its verdict and reason, stopping at the template's stop strings;
- generate as the reference experiment ran it: up to 1024 new tokens, no stop strings but EOS.
Prints seconds per item, accuracy and F1 of each, then ratios.

    python benchmarks/judge.py [--model embedded:gemma-3-270m] [--template one-shot] [--items 40]

Last line: speedup=<generate s/item / logprob s/item> (against our generative judge, the stronger baseline).
"""

from __future__ import annotations

import argparse
import time

from selfalign.judging.judge import TemplateJudge
from selfalign.judging.metrics import best_threshold, binary_metrics
from selfalign.judging.templates import load_template
from selfalign.judging.tuning import _warm_up, load_labeled
from selfalign.models.language_model import ModelConfig, load_language_model


def timed(judge: TemplateJudge, split) -> tuple[list, float]:
    started = time.perf_counter()
    judgments = judge.judge(split.prompts, split.responses, split.sources)
    return judgments, (time.perf_counter() - started) / len(split.prompts)


def report(name: str, labels: list[int], judgments: list, seconds: float) -> dict:
    metrics = binary_metrics(labels, [j.label for j in judgments], [j.p_harmful for j in judgments])
    auroc = f", AUROC {metrics['auroc']:.3f}" if metrics["auroc"] is not None else ""
    print(
        f"{name}: {seconds:.3f} s/item, accuracy {100 * (metrics['accuracy'] or 0):.1f}%, "
        f"F1 {100 * (metrics['f1'] or 0):.1f}%{auroc}, abstained {metrics['abstained']}/{metrics['n']}"
    )
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:gemma-3-270m")
    parser.add_argument("--template", default="one-shot")
    parser.add_argument("--items", type=int, default=40, help="items per split (balanced)")
    parser.add_argument("--reference-max-new-tokens", type=int, default=1024)
    args = parser.parse_args()

    model = load_language_model(ModelConfig(model=args.model))
    model.backend.show_progress = False
    _warm_up(model)
    template = load_template(args.template)
    dev = load_labeled("builtin:judge-labeled", "dev", args.items)
    test = load_labeled("builtin:judge-labeled", "test", args.items)
    print(f"model={args.model} template={template.name} items={len(test.prompts)} (test) + {len(dev.prompts)} (dev)")

    logprob = TemplateJudge(model, template, "logprob")
    dev_judgments, _ = timed(logprob, dev)
    logprob.threshold = best_threshold(dev.labels, [j.p_harmful for j in dev_judgments])
    logprob_judgments, logprob_seconds = timed(logprob, test)
    report(f"logprob (threshold {logprob.threshold:.3f} fitted on dev)", test.labels, logprob_judgments,
           logprob_seconds)  # fmt: skip

    generate = TemplateJudge(model, template, "generate")
    generate_judgments, generate_seconds = timed(generate, test)
    report(f"generate (max_new_tokens={template.max_new_tokens}, stop={template.stop!r})", test.labels,
           generate_judgments, generate_seconds)  # fmt: skip

    reference_template = template.model_copy(update={"max_new_tokens": args.reference_max_new_tokens, "stop": []})
    reference = TemplateJudge(model, reference_template, "generate")
    reference_judgments, reference_seconds = timed(reference, test)
    report(f"generate as the reference ran it (max_new_tokens={args.reference_max_new_tokens}, no stop strings)",
           test.labels, reference_judgments, reference_seconds)  # fmt: skip

    print(f"speedup_vs_reference_generate={reference_seconds / logprob_seconds:.1f}")
    print(f"speedup={generate_seconds / logprob_seconds:.1f}")


if __name__ == "__main__":
    main()
