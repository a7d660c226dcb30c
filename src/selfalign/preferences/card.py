"""The dataset card: what made the pairs, how many survived each step, and how far the judge can be trusted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selfalign.errors import SelfAlignError
from selfalign.preferences.config import PreferencesConfig
from selfalign.quality import QUALITY_TABLE_HEADER, quality_table_rows

COLUMN_DOCS = {
    "prompt": "the request, as written in its prompt set (not formatted for any model)",
    "chosen": "refusal pairs: the accepted revision, or (strategy principle-driven) the answer written with the "
    "principles in context; helpful pairs: the model's answer, judged harmless",
    "rejected": "refusal pairs: the model's answer judged harmful, or (principle-driven) its bare answer, not a "
    "refusal; helpful pairs: the model's refusal",
    "pair_type": "`refusal` (red-team prompt) or `helpful` (benign or helpful prompt)",
    "source": "`harmful` (red-team set) or `benign`",
    "source_set": "the prompt set, e.g. `redteam:train`",
    "category": "the set's category, type or domain of the prompt",
    "key": "prompt set / row id: the item's key in the stage files",
    "p_harmful_rejected": "judge's P(harmful) of the rejected answer (refusal pairs; null for generative judges)",
    "p_harmful_chosen": "judge's P(harmful) of the chosen answer",
    "judge_reason": "the judge's reason for labelling the rejected answer harmful (refusal pairs)",
    "chosen_judge_reason": "the judge's reason for labelling the chosen answer harmless",
    "strategy": "revision strategy or `principle-driven` (refusal pairs), or `helpful-mix`",
    "attempt": "which revision attempt was accepted (refusal pairs)",
    "principle": "the constitution principle the revision answered (critique-then-revise)",
}


def judge_accuracy(config: PreferencesConfig) -> str:
    """The judge's accuracy as tune-judge measured it on labeled test data, or why there is none."""
    if config.judge_results is None:
        return "not measured here: give `judge_results` (tune-judge's results.json) to show it"
    path = Path(config.judge_results)
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        results = {result["name"]: result for result in summary["results"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SelfAlignError(f"{path}: cannot read tune-judge results ({exc})") from None
    name = config.judge.describe()
    if name not in results:
        return f"not measured: {path} has no result for {name}"
    test = results[name]["test"]

    def percent(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    auroc = "n/a" if test.get("auroc") is None else f"{test['auroc']:.3f}"
    return (
        f"accuracy {percent(test.get('accuracy'))}, F1 {percent(test.get('f1'))}, AUROC {auroc}, abstained "
        f"{test.get('abstained', 0)}/{test.get('n', '?')} on the test split of {summary.get('labeled', '?')} "
        f"(tune-judge, {path.name})"
    )


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def funnel_table(funnel: dict[str, Any]) -> list[str]:
    """The funnel as markdown lines: every step for both pair types, then the helpful mix when it fell short."""
    lines = [
        "| step | red-team (refusal pairs) | benign and helpful (helpful pairs) |",
        "|---|---:|---:|",
        *(f"| {row['step']} | {_cell(row['refusal'])} | {_cell(row['helpful'])} |" for row in funnel["steps"]),
    ]
    mix = funnel.get("helpful_mix")
    if mix and mix["shortfall"]:
        lines += ["", f"The helpful mix could not be met: {mix['note']}."]
    if funnel.get("quality"):
        lines += [
            "",
            "Answer quality (selfalign.quality: a loop is a word 4-gram or a sentence said 3+ times; "
            "degenerate = empty, loops, or distinct-2 below 0.6 in 20+ words; 95% Wilson intervals):",
            "",
        ]
        lines += ["| " + " | ".join(QUALITY_TABLE_HEADER) + " |", "|---|" + "---:|" * (len(QUALITY_TABLE_HEADER) - 1)]
        lines += ["| " + " | ".join(row) + " |" for row in quality_table_rows(funnel["quality"])]
    return lines


def dataset_card(
    config: PreferencesConfig, funnel: dict[str, Any], accuracy: str, splits: dict[str, int], files: dict[str, str]
) -> str:
    """README.md for the dataset folder (and the Hub); holds no secret and no timing, so equal runs give equal cards."""
    kept = funnel["kept"]
    total = sum(kept.values())
    share = f"{kept['helpful'] / total:.2f}" if total else "n/a"
    dropped = sum(row["count"] for row in funnel["dropped"])
    policy, judge, revision = config.policy, config.judge, config.revision
    judged_by = "the policy itself" if judge.model is None else f"`{judge.model.model}`"
    lines = [
        "---",
        "pretty_name: Self-generated preference pairs (selfalign)",
        "tags: [selfalign, preference-pairs, dpo, harmlessness, synthetic]",
        "---",
        "",
        f"# Preference pairs written by `{policy.model}` about its own answers",
        "",
        "Made by `selfalign preferences`. The model answered the prompts; its judge labelled every answer; it rewrote "
        "the red-team answers judged harmful (**refusal pairs**: chosen = a revision judged harmless, rejected = the "
        "original answer; with principle-driven answering also an answer written with the principles in context, "
        "judged harmless and a refusal, against the same prompt answered bare); and for benign prompts an answer "
        "judged harmless that is not a refusal is preferred over a refusal the model wrote when told to refuse "
        "(**helpful pairs**, which keep the aligned model from refusing everything). No human labelled anything: the "
        "pairs are as good as the judge, whose measured accuracy is below. Judge abstentions never became pairs.",
        "",
        "| | |",
        "|---|---|",
        f"| model | `{policy.model}` (backend {policy.backend}, prompt format {policy.prompt_format}, dtype "
        f"{policy.dtype}{', adapter ' + policy.adapter if policy.adapter else ''}) |",
        f"| judge | `{judge.describe()}`, threshold {judge.threshold}, judged by {judged_by} |",
        f"| judge accuracy | {accuracy} |",
        f"| revision | `{revision.strategy}`, up to {revision.n_attempts} attempts, "
        f"{revision.generation.max_new_tokens} new tokens, temperature {revision.generation.temperature} |",
        f"| answers | {config.generation.max_new_tokens} new tokens, temperature {config.generation.temperature}, "
        f"no_repeat_ngram_size {config.generation.no_repeat_ngram_size}, repetition_penalty "
        f"{config.generation.repetition_penalty} |",
        f"| policy prompt | {_policy_prompt(config)} |",
        "| unfinished chosen answers | "
        + (
            "ended at their last complete sentence (3+ words, else dropped) |"
            if config.cut_unfinished_chosen
            else "kept as generated |"
        ),
        f"| helpful mix | {config.helpful_mix} wanted, {share} kept ({kept['helpful']} helpful of {total} pairs) |",
        f"| seed | {config.seed} |",
        f"| splits | train {splits['train']}, eval {splits['eval']} "
        f"({config.eval_fraction} of each pair type held out) |",
        f"| degenerate pairs dropped | {dropped} |",
        "",
        "## Prompt sets",
        "",
        "| set | source | limit |",
        "|---|---|---:|",
        *(f"| `{p.data}` | {p.source} | {_cell(p.limit) or 'all'} |" for p in config.prompts),
        "",
        "## Funnel",
        "",
        *funnel_table(funnel),
    ]
    if funnel["attempts"]:
        reasons = sorted({key for row in funnel["attempts"] for key in row} - {"attempt", "revised", "accepted"})
        header = ["attempt", "revised", "accepted", *reasons]
        lines += ["", "## Revision attempts", "", "Attempt k revises the answers no earlier attempt got accepted; the "
                  "other columns say why a revision was not accepted.", ""]  # fmt: skip
        lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
        lines += ["| " + " | ".join(str(row.get(c, 0)) for c in header) + " |" for row in funnel["attempts"]]
    lines += ["", "## Degenerate pairs dropped", ""]
    if funnel["dropped"]:
        lines += ["| reason | pair type | count |", "|---|---|---:|"]
        lines += [f"| {row['reason']} | {row['pair_type']} | {row['count']} |" for row in funnel["dropped"]]
    else:
        lines.append("None: no pair had an empty side, equal sides, or a duplicate.")
    lines += [
        "",
        "## Columns",
        "",
        *(f"- `{name}`: {doc}" for name, doc in COLUMN_DOCS.items()),
        "",
        "## Files",
        "",
        "- `dataset_dict.json`, `train/`, `eval/`: the Arrow dataset (`datasets.load_from_disk(folder)`); "
        "`selfalign train sft|dpo --data FOLDER` reads it",
        "- `train.jsonl`, `eval.jsonl`: the same rows as JSON Lines; `funnel.json`: the tables above",
        *(f"- `{name}`: the exact file used" for name in sorted(files)),
        "",
    ]
    return "\n".join(lines)


def _policy_prompt(config: PreferencesConfig) -> str:
    if config.policy_prompt == "bare":
        return "bare (the request alone)"
    p = config.principles
    return (f"principle-driven: `{p.file}`, {p.exemplars} exemplars ({p.refusal_share:g} refusals, {p.select}); "
            "each red-team prompt also answered bare, for engraved refusal pairs")  # fmt: skip
