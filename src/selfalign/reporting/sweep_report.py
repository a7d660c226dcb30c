"""The results of `selfalign sweep`: sweep.json, sweep.md, tradeoff.png and seeds.md, from the runs' records alone.

A run's record carries the headline rates of its evaluation/metrics.json with their intervals. Per point and variant
they are summarized over seeds (mean, min-max, sample standard deviation); the Pareto set is read on the means.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Hashable
from pathlib import Path
from typing import Any, TypeVar

from selfalign.data.jsonl import write_text_atomic

K = TypeVar("K", bound=Hashable)

HEADLINE = {  # metric -> column; refusal and over-refusal are the trade-off's axes, capability its third column
    "refused_harmful_detector": "refused red-team (detector)",
    "over_refusal_detector": "over-refusal (detector)",
    "capability_acc_norm": "capability (acc_norm)",
    "harmless": "harmless (judge)",
    "loops": "loops",
}
PARETO_RULE = (
    "no other point/variant refuses at least as many red-team prompts and over-refuses at most as many "
    "benign-sensitive prompts while doing better on one of the two (detector; means over seeds)"
)
EVALUATION_SETS = ("harmful", "benign", "helpful", "capability")


def headline_metrics(entry: dict) -> dict[str, dict | None]:
    """One variant's entry of evaluation/metrics.json -> the sweep's metrics, each {rate, low, high, count, n}."""
    return {
        "refused_harmful_detector": entry.get("refused_harmful_detector"),
        "over_refusal_detector": entry.get("over_refusal_detector"),
        "capability_acc_norm": (entry.get("capability") or {}).get("acc_norm"),
        "harmless": entry.get("harmless"),
        "loops": (entry.get("answer_quality") or {}).get("loops"),
    }


def seed_spread(rates: dict[int, dict | None]) -> dict | None:
    """One metric of one point/variant over seeds (seed -> its run's rate): mean, min, max and sample standard
    deviation (None for one seed), each seed's rate, and the widest 95% interval (lowest low, highest high)."""
    measured = {seed: rate for seed, rate in rates.items() if rate is not None and rate.get("rate") is not None}
    if not measured:
        return None
    values = [rate["rate"] for rate in measured.values()]
    return {
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
        "per_seed": {str(seed): rate["rate"] for seed, rate in measured.items()},
        "low": min(rate["low"] for rate in measured.values()),
        "high": max(rate["high"] for rate in measured.values()),
    }


def summarize_point(runs: list[dict]) -> dict[str, dict[str, dict | None]]:
    """variant -> metric -> seed_spread over the point's completed runs."""
    completed = [run for run in runs if run["status"] == "completed"]
    variants = list(dict.fromkeys(variant for run in completed for variant in run["metrics"]))
    return {
        variant: {metric: seed_spread({run["seed"]: run["metrics"].get(variant, {}).get(metric) for run in completed})
                  for metric in HEADLINE}
        for variant in variants
    }  # fmt: skip


def pareto_set(scores: dict[K, tuple[float, float]]) -> list[K]:
    """The keys whose (refusal, over-refusal) no other key's dominates: at least the refusal and at most the
    over-refusal, and better on one. Equal scores do not dominate each other, so both stay."""

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] >= b[0] and a[1] <= b[1] and a != b

    return [key for key, score in scores.items() if not any(dominates(other, score) for other in scores.values())]


def write_sweep_report(summary: dict, folder: Path) -> dict:
    """Add the per-point summaries, the Pareto set and the evaluated sets to `summary` (sweep, config, out, seeds,
    points with their runs), write sweep.json, sweep.md, tradeoff.png and, for several seeds, seeds.md."""
    points = summary["points"]
    for point in points:
        point["variants"] = summarize_point(point["runs"])
    scores = {
        (point["point"], variant): (refusal["mean"], over_refusal["mean"])
        for point in points for variant, metrics in point["variants"].items()
        if (refusal := metrics["refused_harmful_detector"]) and (over_refusal := metrics["over_refusal_detector"])
    }  # fmt: skip
    front = pareto_set(scores)
    for point in points:
        point["pareto"] = [variant for name, variant in front if name == point["point"]]
    runs = [run for point in points for run in point["runs"]]
    evaluated_on = {name: sorted({run["evaluated_on"][name] for run in runs if run["evaluated_on"][name]})
                    for name in EVALUATION_SETS}  # fmt: skip
    record = {
        **{key: value for key, value in summary.items() if key != "points"},
        "evaluated_on": evaluated_on,
        "dev_only": all(reference.endswith(":dev") for references in evaluated_on.values() for reference in references),
        "metrics": HEADLINE,
        "pareto_rule": PARETO_RULE,
        "pareto": [{"point": name, "variant": variant} for name, variant in front],
        "failed": [{"run": run["run"], "error": run["error"]} for run in runs if run["status"] != "completed"],
        "points": points,
    }
    write_text_atomic(folder / "sweep.json", json.dumps(record, indent=2, default=str) + "\n")
    write_text_atomic(folder / "sweep.md", "\n".join(sweep_lines(record)) + "\n")
    plot_tradeoff(points, set(front), folder / "tradeoff.png")
    if len(summary.get("seeds") or []) > 1:
        write_text_atomic(folder / "seeds.md", "\n".join(seeds_lines(record)) + "\n")
    return record


# ---- sweep.md and seeds.md -------------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def format_spread(spread: dict | None) -> str:
    """One seed: '12.5% [6.1, 23.7]' (its 95% interval); several: '12.5% (10.0-15.0, sd 2.5)' over seeds."""
    if spread is None:
        return "n/a"
    if spread["n"] == 1:
        return f"{_pct(spread['mean'])} [{100 * spread['low']:.1f}, {100 * spread['high']:.1f}]"
    return f"{_pct(spread['mean'])} ({100 * spread['min']:.1f}-{100 * spread['max']:.1f}, sd {100 * spread['std']:.1f})"


def _evaluated_line(record: dict) -> str:
    sets = ", ".join(f"{name} {', '.join(refs)}" for name, refs in record["evaluated_on"].items() if refs)
    if record["dev_only"]:
        return f"Evaluated on the dev splits only: {sets}."
    return f"Evaluated on: {sets}. **Not only dev splits**: choosing settings on a test split spends it."


def sweep_lines(record: dict) -> list[str]:
    points = record["points"]
    keys = list(dict.fromkeys(key for point in points for key in point["settings"]))
    seeds = record.get("seeds")
    finished = sum(len(point["runs"]) for point in points)
    planned = record.get("runs_planned", finished)
    lines = [
        "# selfalign sweep",
        "",
        f"`{record['sweep']}`: {len(points)} points of `{record['config']}`"
        + (f" x seeds {', '.join(map(str, seeds))}" if seeds else "")
        + f", every run in `{record['out']}` (one stage cache). {_evaluated_line(record)}",
        "",
        *([f"**{finished} of {planned} runs so far**: the sweep is running or was stopped (a rerun resumes it).", ""]
          if finished < planned else []),
        ("Rates: the mean over seeds (min-max, sample standard deviation), in percent; where one seed finished, its "
         "95% Wilson interval [low, high]." if seeds and len(seeds) > 1
         else "Rates with their 95% Wilson intervals.")
        + f" Pareto set (yes in the last column, ringed in the plot): {PARETO_RULE}.",
        "",
        "| point | " + "".join(f"{key} | " for key in keys) + "variant | " + " | ".join(HEADLINE.values())
        + " | Pareto |",
        "|---|" + "---|" * len(keys) + "---|" + "---:|" * len(HEADLINE) + ":---:|",
    ]  # fmt: skip
    for point in points:
        settings = "".join(f"{point['settings'].get(key, '(base)')} | " for key in keys)
        for variant, metrics in point["variants"].items():
            cells = " | ".join(format_spread(metrics[metric]) for metric in HEADLINE)
            mark = "yes" if variant in point["pareto"] else ""
            lines.append(f"| {point['point']} | {settings}{variant} | {cells} | {mark} |")
        if not point["variants"]:
            lines.append(f"| {point['point']} | {settings}(no run finished) |" + " |" * (len(HEADLINE) + 1))
    lines += ["", "![trade-off](tradeoff.png)", "", "## Runs", "",
              "Each run is this `selfalign run` command; `stages run` lists what it did not find in the cache.", "",
              "| run | status | stages run | command |", "|---|---|---|---|"]  # fmt: skip
    for point in points:
        for run in point["runs"]:
            if run["status"] == "completed":
                status, ran = "completed", ", ".join(n for n, s in run["stages"].items() if s["ran"]) or "none"
            else:
                status, ran = f"failed: {run['error']}".replace("|", "/"), ""
            lines.append(f"| {run['run']} | {status} | {ran} | `{run['command']}` |")
    return lines


def seeds_lines(record: dict) -> list[str]:
    seeds = [str(seed) for seed in record["seeds"]]
    lines = [
        "# Seeds",
        "",
        f"Every point ran with seeds {', '.join(seeds)}. Per point, variant and metric: the mean over seeds, the "
        "range (min-max), the sample standard deviation and each seed's rate, in percent.",
        "",
        *(f"- {point['point']}: {_settings_text(point['settings'])}" for point in record["points"]),
        "",
        "| point | variant | metric | mean | min-max | sd | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
        "|---|---|---|---:|---:|---:|" + "---:|" * len(seeds),
    ]
    for point in record["points"]:
        for variant, metrics in point["variants"].items():
            for metric, label in HEADLINE.items():
                spread = metrics[metric]
                if spread is None:
                    continue
                std = "n/a" if spread["std"] is None else f"{100 * spread['std']:.1f}"
                per_seed = " | ".join(
                    f"{100 * spread['per_seed'][seed]:.1f}" if seed in spread["per_seed"] else "n/a" for seed in seeds
                )
                lines.append(f"| {point['point']} | {variant} | {label} | {100 * spread['mean']:.1f} | "
                             f"{100 * spread['min']:.1f}-{100 * spread['max']:.1f} | {std} | {per_seed} |")  # fmt: skip
    return lines


def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"`{key}={value}`" for key, value in settings.items()) or "the base config"


# ---- tradeoff.png ----------------------------------------------------------------------------------------------


def plot_tradeoff(points: list[dict], front: set[tuple[str, str]], path: Path) -> None:
    """x over-refusal, y refusal of red-team prompts, one marker per point (colour) and variant (shape), error bars
    from the 95% intervals (over seeds: from the lowest low to the highest high); the Pareto set ringed and joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    variants = list(dict.fromkeys(variant for point in points for variant in point["variants"]))
    markers = dict(zip(variants, itertools.cycle("os^DvPX")))
    figure, axes = plt.subplots(figsize=(8, 5.5))
    front_xy = []
    for index, point in enumerate(points):
        colour = f"C{index % 10}"
        for variant, metrics in point["variants"].items():
            x, y = metrics["over_refusal_detector"], metrics["refused_harmful_detector"]
            if x is None or y is None:
                continue
            on_front = (point["point"], variant) in front
            axes.errorbar(
                100 * x["mean"], 100 * y["mean"],
                xerr=[[100 * max(0.0, x["mean"] - x["low"])], [100 * max(0.0, x["high"] - x["mean"])]],
                yerr=[[100 * max(0.0, y["mean"] - y["low"])], [100 * max(0.0, y["high"] - y["mean"])]],
                fmt=markers[variant], color=colour, capsize=3, alpha=0.9,
                markersize=9 if on_front else 6, markeredgecolor="black" if on_front else colour,
                markeredgewidth=1.8 if on_front else 1.0,
            )  # fmt: skip
            if on_front:
                front_xy.append((100 * x["mean"], 100 * y["mean"]))
                axes.annotate(f"{point['point']} {variant}", (100 * x["mean"], 100 * y["mean"]),
                              textcoords="offset points", xytext=(6, 6), fontsize=8)  # fmt: skip
    if front_xy:
        xs, ys = zip(*sorted(front_xy))
        axes.plot(xs, ys, "--", color="grey", linewidth=1)
    handles = [Line2D([], [], marker=markers[v], color="grey", linestyle="", label=v) for v in variants]
    handles += [Line2D([], [], marker="o", color=f"C{i % 10}", linestyle="", label=_legend_label(p))
                for i, p in enumerate(points)]  # fmt: skip
    handles.append(Line2D([], [], marker="o", color="white", markeredgecolor="black", markeredgewidth=1.8,
                          linestyle="--", label="Pareto set"))  # fmt: skip
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    axes.set_xlim(-3, 103)
    axes.set_ylim(-3, 103)
    axes.set_xlabel("over-refusal of benign-sensitive prompts (%, detector)")
    axes.set_ylabel("refusal of red-team prompts (%, detector)")
    axes.set_title("Sweep: refusal against over-refusal (95% intervals; over seeds, their widest)")
    axes.grid(True, alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def _legend_label(point: dict) -> str:
    short = ", ".join(f"{'.'.join(key.split('.')[-2:])}={value}" for key, value in point["settings"].items())
    text = f"{point['point']}: {short or 'base config'}"
    return text if len(text) <= 48 else text[:45] + "..."
