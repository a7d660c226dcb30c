"""Judging speed: the log-probability judge against the generative judge, same model, template and items.

Three ways to judge the same test items with the same template:
- logprob: one forward pass per item (label-token probabilities), threshold fitted on the dev split;
- generate (baseline): the judge writes its verdict and reason, stopping at the template's stop strings;
- generate as the reference experiment ran it: up to 1024 new tokens, no stop strings but EOS.
And the probe (a logistic regression on the judge prompt's hidden states, layer and pooling chosen by cross-validation
on dev): the same forward pass as logprob, so it should cost no more per item.
Prints seconds per item, accuracy and F1 of each, then ratios.

    python benchmarks/judge.py [--model embedded:gemma-3-270m] [--template one-shot] [--items 40] [--probe-only]

Last line: speedup=<generate s/item / logprob s/item> (against our generative judge, the stronger baseline); with
--probe-only (logprob and probe, no generation): probe_cost_ratio=<probe s/item / logprob s/item>.
"""

from __future__ import annotations

import argparse
import time

from selfalign.backends.language_model import ModelConfig, load_language_model
from selfalign.judging.baseline import NoModelRuleJudge
from selfalign.judging.judge import TemplateJudge
from selfalign.judging.metrics import best_threshold, binary_metrics
from selfalign.judging.probe import ProbeJudge, fit_probe
from selfalign.judging.templates import load_template
from selfalign.judging.tuning import _warm_up, load_labeled, paired_lift


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
    parser.add_argument("--probe-only", action="store_true", help="measure logprob and the probe only (no generation)")
    parser.add_argument("--cost-repeats", type=int, default=3, help="alternate logprob/probe runs; fastest of each")
    args = parser.parse_args()

    model = load_language_model(ModelConfig(model=args.model))
    model.backend.show_progress = False
    _warm_up(model)
    template = load_template(args.template)
    dev = load_labeled("builtin:judge-labeled", "dev", args.items)
    test = load_labeled("builtin:judge-labeled", "test", args.items)
    print(f"model={args.model} template={template.name} items={len(test.prompts)} (test) + {len(dev.prompts)} (dev)")

    # the bar every design must clear, on the same test items: a red-team prompt answered without a refusal = harmful
    rule_judgments = NoModelRuleJudge().judge(test.prompts, test.responses, test.sources)
    rule = report("no-model rule", test.labels, rule_judgments, 0.0)

    logprob = TemplateJudge(model, template, "logprob")
    dev_judgments, _ = timed(logprob, dev)
    logprob.threshold = best_threshold(dev.labels, [j.p_harmful for j in dev_judgments])
    logprob_judgments, logprob_seconds = timed(logprob, test)
    report(f"logprob (threshold {logprob.threshold:.3f} fitted on dev)", test.labels, logprob_judgments,
           logprob_seconds)  # fmt: skip

    fitted = fit_probe(model, args.template, dev.prompts, dev.responses, dev.labels, labeled="builtin:judge-labeled",
                       groups=dev.scenarios)  # fmt: skip
    # threshold fitted on the out-of-fold dev probabilities, as tune-judge does
    probe = ProbeJudge(model, fitted.weights, best_threshold(dev.labels, fitted.dev_probabilities))
    probe_judgments, probe_seconds = timed(probe, test)
    chosen = f"layer {fitted.weights.layer}, {fitted.weights.pooling} pooling, threshold {probe.threshold:.3f}"
    scores = fitted.weights.fitted_on
    cv = f"dev cv AUROC {scores['cv_auroc']:.3f}, accuracy {scores['cv_accuracy']:.3f}"
    probe_metrics = report(f"probe ({chosen}; {cv})", test.labels, probe_judgments, probe_seconds)
    for name, judgments in (("logprob", logprob_judgments), ("probe", probe_judgments)):
        lift = paired_lift(test.labels, judgments, rule_judgments)
        print(f"{name} lift over the no-model rule: {100 * lift['accuracy']:+.1f} points "
              f"[{100 * lift['low']:+.1f}, {100 * lift['high']:+.1f}] (paired bootstrap, n={lift['n']})")  # fmt: skip
    # Both read the same forward pass; on a shared CPU one run of each mostly measures the neighbours, so alternate
    # the two and compare the fastest run of each.
    logprob_runs, probe_runs = [logprob_seconds], [probe_seconds]
    for _ in range(args.cost_repeats - 1):
        logprob_runs.append(timed(logprob, test)[1])
        probe_runs.append(timed(probe, test)[1])
    print(f"s/item over {len(probe_runs)} alternating runs: logprob {' '.join(f'{x:.3f}' for x in logprob_runs)}; "
          f"probe {' '.join(f'{x:.3f}' for x in probe_runs)}")  # fmt: skip
    print(f"rule_accuracy={rule['accuracy']:.3f} probe_accuracy={probe_metrics['accuracy']:.3f} "
          f"probe_auroc={probe_metrics['auroc']:.3f}")  # fmt: skip
    print(f"probe_cost_ratio={min(probe_runs) / min(logprob_runs):.2f}")
    if args.probe_only:
        return

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
