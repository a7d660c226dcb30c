"""report.md and a self-contained report.html (plots inlined as PNG), written from metrics and samples alone."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from selfalign.data.jsonl import write_text_atomic


def _pct(rate: dict) -> str:
    if rate.get("rate") is None:
        return "n/a"
    return f"{100 * rate['rate']:.1f}% [{100 * rate['low']:.1f}, {100 * rate['high']:.1f}]"


def _pct_n(rate: dict) -> str:
    """A rate with the n behind it: a category of 4 prompts should read as thin as it is."""
    return "n/a" if rate.get("rate") is None else f"{_pct(rate)} (n={rate['n']})"


def _difference(paired: dict) -> str:
    """'+85.0 [72.5, 95.0] pts, p<0.001 (n=40)': a variant minus the base on the same prompts."""
    if paired.get("difference") is None:
        return "n/a"
    p = paired["p_value"]
    p_text = "p<0.001" if p < 0.001 else f"p={p:.3f}"
    return (
        f"{100 * paired['difference']:+.1f} [{100 * paired['low']:+.1f}, {100 * paired['high']:+.1f}] pts, "
        f"{p_text} (n={paired['n']})"
    )


DIFFERENCE_RATES = {  # metrics key -> column of the paired-difference table
    "harmless": "harmless (judge)",
    "refused_harmful_detector": "refused harmful (detector)",
    "over_refusal_detector": "over-refusal (detector)",
    "over_refusal_judge": "over-refusal (judge)",
}


def quality_lines(metrics: dict) -> list[str]:
    """How every variant's answers read: loops, empty answers, token-limit hits, length (selfalign.quality)."""
    from selfalign.quality import QUALITY_TABLE_HEADER, quality_table_rows

    summaries = {v: metrics["models"][v]["answer_quality"] for v in metrics["variants"]
                 if "answer_quality" in metrics["models"][v]}  # fmt: skip
    if not summaries:
        return []
    return [
        "## Answer quality",
        "",
        "A loop is a word 4-gram or a sentence said 3+ times; degenerate = empty, loops, or distinct-2 below 0.6 in "
        "20+ words; 95% Wilson intervals.",
        "",
        "| " + " | ".join(QUALITY_TABLE_HEADER) + " |",
        "|---|" + "---:|" * (len(QUALITY_TABLE_HEADER) - 1),
        *("| " + " | ".join(row) + " |" for row in quality_table_rows(summaries)),
        "",
    ]


def helpfulness_lines(metrics: dict) -> list[str]:
    """The pairwise judge's verdicts on the helpful prompts, and how much it prefers whichever answer comes first."""
    rows = [(v, metrics["models"][v]) for v in metrics["variants"] if "win_rate_vs_base" in metrics["models"][v]]
    if not rows:
        return []
    lines = ["## Helpfulness against the base (pairwise judge)", "",
             "Per prompt, P(adapter's answer better) averaged over both orders of the two answers; identical answers "
             "count 0.5 unjudged, and an item within 1e-6 of 0.5 leans neither way. Position bias: the judge's mean "
             "P(first answer better) over both orders (0.5: none); "
             "consistent: both orders prefer the same answer.", "",
             "| model | win-rate [95% CI] | lean better / neither / lean worse | P(first better) | consistent |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for variant, m in rows:
        w, bias = m["win_rate_vs_base"], m.get("pairwise_position_bias", {})
        first = "n/a" if bias.get("p_first_better") is None else f"{bias['p_first_better']:.3f}"
        consistent = "n/a" if bias.get("consistent") is None else f"{100 * bias['consistent']:.1f}% (n={bias['n']})"
        lines.append(f"| {variant} | {_pct(w)} | {w['wins']} / {w['ties']} / {w['losses']} | {first} | {consistent} |")
    return [*lines, ""]


def refusal_class_lines(metrics: dict) -> list[str]:
    """Answers to the benign prompts in XSTest's three classes, by the detector and by the judge, and their
    agreement. Reads metrics only (reporting imports nothing from evaluation)."""
    rows = [(v, metrics["models"][v]["refusal_classes"]) for v in metrics["variants"]
            if "refusal_classes" in metrics["models"][v]]  # fmt: skip
    if not rows:
        return []
    classes_in_order = list(rows[0][1]["detector"])  # evaluation.refusal_classes.CLASSES, as metrics.json holds them
    names = [name.replace("_", " ") for name in classes_in_order]
    lines = ["## Over-refusal in XSTest's three classes (benign prompts)", "",
             "| model | read by | " + " | ".join(names) + " | agreement (kappa) |",
             "|---|---|" + "---:|" * (len(classes_in_order) + 1)]  # fmt: skip
    for variant, classes in rows:
        a = classes["agreement"]
        kappa = "n/a" if a["cohen_kappa"] is None else f"{a['cohen_kappa']:.2f}"
        agreement = "n/a" if a["agreement"] is None else f"{100 * a['agreement']:.1f}% ({kappa}, n={a['n']})"
        for reader in ("detector", "judge"):
            cells = [_pct(classes[reader][name]) for name in classes_in_order]
            last = agreement if reader == "judge" else ""
            lines.append(f"| {variant} | {reader} | " + " | ".join(cells) + f" | {last} |")
    return [*lines, ""]


def difficulty_lines(metrics: dict) -> list[str]:
    """Red-team results per difficulty (plain, implicit, wrapped, grey-zone) where the prompt set names it."""
    variants = [v for v in metrics["variants"] if metrics["models"][v].get("by_difficulty")]
    if not variants:
        return []
    lines = ["## Red-team prompts by difficulty", "",
             "| difficulty | " + " | ".join(f"{v}: harmless (judge) | {v}: refused (detector)" for v in variants)
             + " |",
             "|---|" + "---|" * (2 * len(variants))]  # fmt: skip
    levels = sorted({d for v in variants for d in metrics["models"][v]["by_difficulty"]["harmless"]})
    for level in levels:
        cells = []
        for v in variants:
            by = metrics["models"][v]["by_difficulty"]
            cells += [_pct_n(by["harmless"].get(level, {})), _pct_n(by["refused_harmful_detector"].get(level, {}))]
        lines.append(f"| {level} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def capability_lines(metrics: dict) -> list[str]:
    """Multiple-choice accuracy per variant (lm-evaluation-harness's acc and acc_norm) beside chance."""
    scored = [v for v in metrics["variants"] if "capability" in metrics["models"][v]]
    if not scored:
        return []
    lines = ["## Capability retained (multiple choice, log-likelihood)", "",
             "| model | acc | acc_norm | chance | questions |", "|---|---|---|---|---|"]  # fmt: skip
    for variant in scored:
        c = metrics["models"][variant]["capability"]
        lines.append(f"| {variant} | {_pct(c['acc'])} | {_pct(c['acc_norm'])} | {100 * c['chance']:.1f}% | "
                     f"{c['acc']['n']} |")  # fmt: skip
    return [*lines, ""]


def difference_lines(metrics: dict) -> list[str]:
    """Each adapter minus the base, prompt by prompt: paired bootstrap interval and McNemar's exact p-value."""
    adapters = [v for v in metrics["variants"] if "vs_base" in metrics["models"][v]]
    if not adapters:
        return []
    lines = [
        "Difference from the base on the same prompts (percentage points; 95% paired bootstrap interval; McNemar's "
        "exact test on the prompts where the two disagree):",
        "",
        "| model | " + " | ".join(DIFFERENCE_RATES.values()) + " |",
        "|---|" + "---|" * len(DIFFERENCE_RATES),
    ]
    has_capability = any("acc_norm_vs_base" in metrics["models"][v].get("capability", {}) for v in adapters)
    if has_capability:
        lines[2] = lines[2].rstrip() + " capability (acc_norm) |"
        lines[3] += "---|"
    for variant in adapters:
        paired = metrics["models"][variant]["vs_base"]
        cells = [_difference(paired[key]) for key in DIFFERENCE_RATES]
        if has_capability:
            cells.append(_difference(metrics["models"][variant].get("capability", {}).get("acc_norm_vs_base", {})))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def summary_rows(metrics: dict) -> list[list[str]]:
    rows = []
    for variant in metrics["variants"]:
        m = metrics["models"][variant]
        win = _pct(m["win_rate_vs_base"]) if "win_rate_vs_base" in m else "(reference)"
        capability = _pct(m["capability"]["acc_norm"]) if "capability" in m else "n/a"
        rows.append(
            [
                variant,
                _pct(m["harmless"]),
                _pct(m["refused_harmful_detector"]),
                _pct(m["over_refusal_detector"]),
                _pct(m["over_refusal_judge"]),
                win,
                capability,
                f"{m['judge_abstained']['harmful']} / {m['judge_abstained']['benign']}",
            ]
        )
    return rows


HEADERS = [
    "model",
    "harmless (judge)",
    "refused harmful (detector)",
    "over-refusal (detector)",
    "over-refusal (judge: did not comply)",
    "helpful win-rate vs base",
    "capability (acc_norm)",
    "judge abstained (harmful / benign)",
]


def markdown_report(metrics: dict, samples: list[dict], examples: int) -> str:
    lines = [
        "# selfalign evaluation",
        "",
        f"Judge: `{metrics['judge']}`. Rates are shares of the items the judge or detector decided, with 95% "
        "Wilson intervals (which hold at 0% and 100%); judge abstentions are counted apart and never counted as "
        "harmless.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
        *("| " + " | ".join(row) + " |" for row in summary_rows(metrics)),
        "",
        *difference_lines(metrics),
        "",
        *capability_lines(metrics),
        *quality_lines(metrics),
        *helpfulness_lines(metrics),
        *refusal_class_lines(metrics),
        *difficulty_lines(metrics),
        "## Harmlessness by category (judge)",
        "",
    ]
    categories = sorted({c for v in metrics["variants"] for c in metrics["models"][v]["by_category"]["harmless"]})
    lines += ["| category | " + " | ".join(metrics["variants"]) + " |", "|---|" + "---|" * len(metrics["variants"])]
    for category in categories:
        cells = [_pct_n(metrics["models"][v]["by_category"]["harmless"].get(category, {})) for v in metrics["variants"]]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    lines += ["", "## Where the refusal detector and the judge disagree", ""]
    keys = list(next(iter(metrics["models"].values()))["detector_vs_judge"])
    lines += ["| model | " + " | ".join(k.replace("_", " ") for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for variant in metrics["variants"]:
        table = metrics["models"][variant]["detector_vs_judge"]
        lines.append(f"| {variant} | " + " | ".join(str(table[k]) for k in keys) + " |")
    agreement = {
        v: m["external_judge_agreement"] for v, m in metrics["models"].items() if "external_judge_agreement" in m
    }
    if agreement:
        lines += [
            "",
            "## Agreement with the external judge",
            "",
            "| model | items | agreement | Cohen's kappa |",
            "|---|---|---|---|",
        ]
        for variant, a in agreement.items():
            kappa = "n/a" if a["cohen_kappa"] is None else f"{a['cohen_kappa']:.3f}"
            share = "n/a" if a["agreement"] is None else f"{100 * a['agreement']:.1f}%"
            lines.append(f"| {variant} | {a['n']} | {share} | {kappa} |")
    lines += ["", "## Example answers", ""]
    for prompt, answers in example_answers(samples, metrics["variants"], examples):
        lines.append(f"**{prompt}**\n")
        lines += [f"- *{variant}*: {answer.replace(chr(10), ' ')}" for variant, answer in answers]
        lines.append("")
    return "\n".join(lines) + "\n"


def example_answers(samples: list[dict], variants: list[str], count: int) -> list[tuple[str, list[tuple[str, str]]]]:
    """The first `count` prompts of each set, with every variant's answer."""
    by_key: dict[str, dict[str, dict]] = {}
    for sample in samples:
        by_key.setdefault(sample["key"], {})[sample["variant"]] = sample
    chosen, seen_per_set = [], {}
    for answers in by_key.values():
        set_name = next(iter(answers.values()))["set"]
        if seen_per_set.get(set_name, 0) < count:
            seen_per_set[set_name] = seen_per_set.get(set_name, 0) + 1
            prompt = next(iter(answers.values()))["prompt"]
            chosen.append((f"[{set_name}] {prompt}", [(v, answers[v]["answer"]) for v in variants if v in answers]))
    return chosen


def _figure_png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plots(metrics: dict) -> dict[str, str]:
    """The report's plots as base64 PNGs: the trade-off, the paired differences from the base, harmlessness per
    category, win-rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = metrics["variants"]
    models = metrics["models"]
    images = {}

    figure, axes = plt.subplots(figsize=(6, 4.5))
    for variant in variants:
        x, y = models[variant]["over_refusal_detector"], models[variant]["harmless"]
        if x["rate"] is None or y["rate"] is None:
            continue
        axes.errorbar(
            100 * x["rate"],
            100 * y["rate"],
            xerr=[[100 * (x["rate"] - x["low"])], [100 * (x["high"] - x["rate"])]],
            yerr=[[100 * (y["rate"] - y["low"])], [100 * (y["high"] - y["rate"])]],
            fmt="o",
            capsize=4,
            label=variant
            + (
                f" (capability {100 * models[variant]['capability']['acc_norm']['rate']:.1f}%)"
                if "capability" in models[variant]
                else ""
            ),
        )
    axes.set_xlim(-3, 103)
    axes.set_ylim(-3, 103)
    axes.set_xlabel("over-refusal on benign-sensitive prompts (%, detector)")
    axes.set_ylabel("harmless answers to red-team prompts (%, judge)")
    axes.set_title("Harmlessness against over-refusal (95% intervals)")
    axes.legend()
    axes.grid(True, alpha=0.3)
    images["tradeoff"] = _figure_png(figure)

    # the same trade-off as paired differences from the base on the same prompts, capability beside it
    adapters = [v for v in variants if "vs_base" in models[v]]
    if adapters:
        measures = [("refused harmful (detector)", lambda m: m["vs_base"]["refused_harmful_detector"]),
                    ("over-refusal (detector)", lambda m: m["vs_base"]["over_refusal_detector"]),
                    ("capability (acc_norm)",
                     lambda m: m.get("capability", {}).get("acc_norm_vs_base", {}))]  # fmt: skip
        figure, axes = plt.subplots(figsize=(7, 1.2 + 0.9 * len(measures)))
        for offset, variant in enumerate(adapters):
            for row, (_, paired_of) in enumerate(measures):
                paired = paired_of(models[variant])
                if paired.get("difference") is None:
                    continue
                d = 100 * paired["difference"]
                axes.errorbar(d, row + 0.2 * offset, xerr=[[d - 100 * paired["low"]], [100 * paired["high"] - d]],
                              fmt="o", capsize=4, color=f"C{offset + 1}",
                              label=variant if row == 0 else None)  # fmt: skip
        axes.axvline(0, color="grey", linestyle="--")
        axes.set_yticks(range(len(measures)), [name for name, _ in measures])
        axes.set_xlabel("difference from the base (percentage points, 95% paired bootstrap)")
        axes.legend()
        images["differences"] = _figure_png(figure)

    categories = sorted({c for v in variants for c in models[v]["by_category"]["harmless"]})
    figure, axes = plt.subplots(figsize=(max(6, 0.7 * len(categories) * max(1, len(variants))), 4.5))
    width = 0.8 / max(1, len(variants))
    for position, variant in enumerate(variants):
        values = [models[variant]["by_category"]["harmless"].get(c, {}).get("rate") or 0 for c in categories]
        axes.bar(
            [i + position * width for i in range(len(categories))], [100 * v for v in values], width, label=variant
        )
    axes.set_xticks(
        [i + width * (len(variants) - 1) / 2 for i in range(len(categories))],
        categories,
        rotation=40,
        ha="right",
        fontsize=8,
    )
    axes.set_ylabel("harmless (%)")
    axes.set_title("Harmlessness per hazard category")
    axes.legend()
    images["categories"] = _figure_png(figure)

    adapters = [
        v for v in variants if "win_rate_vs_base" in models[v] and models[v]["win_rate_vs_base"]["rate"] is not None
    ]
    if adapters:
        figure, axes = plt.subplots(figsize=(6, 3.5))
        for i, variant in enumerate(adapters):
            w = models[variant]["win_rate_vs_base"]
            axes.errorbar(
                [100 * w["rate"]],
                [i],
                xerr=[[100 * (w["rate"] - w["low"])], [100 * (w["high"] - w["rate"])]],
                fmt="o",
                capsize=4,
            )
        axes.axvline(50, color="grey", linestyle="--")
        axes.set_yticks(range(len(adapters)), adapters)
        axes.set_xlabel("helpful win-rate against the base model (%, P(better) averaged over both orders)")
        axes.set_xlim(0, 100)
        images["win_rates"] = _figure_png(figure)
    return images


def html_report(metrics: dict, samples: list[dict], examples: int) -> str:
    images = plots(metrics)
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS) + "</tr>"
    for row in summary_rows(metrics):
        table += "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
    table += "</table>"
    captions = {
        "tradeoff": "Harmless answers to red-team prompts against over-refusal of safe prompts: up and to the left is "
        "better.",
        "differences": "Each adapter minus the base on the same prompts, with 95% paired bootstrap intervals: red-team "
        "refusals should rise, over-refusal and lost capability should not.",
        "categories": "Share of harmless answers per hazard category.",
        "win_rates": "Each adapter's answer to an everyday request against the base model's: P(better) averaged over "
        "both orders of the two answers.",
    }
    figures = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{captions[name]}</figcaption>'
        "</figure>"
        for name, data in images.items()
    )
    example_html = ""
    for prompt, answers in example_answers(samples, metrics["variants"], examples):
        cells = "".join(f"<td><b>{html.escape(v)}</b><br>{html.escape(a)}</td>" for v, a in answers)
        example_html += f"<h4>{html.escape(prompt)}</h4><table><tr>{cells}</tr></table>"
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:14px}"
        "img{max-width:100%}figure{margin:1em 0}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>selfalign evaluation</title><style>{style}</style>"
        f"</head><body><h1>selfalign evaluation</h1><p>Judge: <code>{html.escape(metrics['judge'])}</code>. "
        "Rates with 95% Wilson intervals; judge abstentions counted apart.</p>"
        f"{table}{figures}<h2>Example answers</h2>{example_html}</body></html>\n"
    )


def write_report(out_dir: Path, metrics: dict, samples: list[dict], examples: int) -> None:
    write_text_atomic(out_dir / "report.md", markdown_report(metrics, samples, examples))
    write_text_atomic(out_dir / "report.html", html_report(metrics, samples, examples))
