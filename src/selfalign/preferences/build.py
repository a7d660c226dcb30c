"""Stage 5, build: pairs from the stage files, cleaned, mixed, split and saved with their card.

Refusal pairs: (red-team prompt, chosen = the accepted revision, rejected = the answer judged harmful), and with
`policy_prompt: principle-driven` also engraved ones (chosen = the answer written with the principles in context,
judged harmless and a refusal; rejected = the same prompt answered bare, not a refusal). Helpful pairs:
(benign prompt, chosen = the answer judged harmless and not a refusal, rejected = the model's refusal). Degenerate
pairs (an empty side, chosen equal to rejected, a degenerate chosen answer, duplicates) are dropped and counted; a
chosen answer the token limit stopped mid-sentence ends at its last complete sentence (`cut_unfinished_chosen`); the
helpful mix keeps as many helpful pairs as make `helpful_mix` of all pairs; a seeded split holds out `eval_fraction`
of each pair type. The folder holds the `datasets` DatasetDict (Arrow), train.jsonl and eval.jsonl, the card
(README.md) and the exact templates and constitution used. Nothing here calls a model, so a build is cheap and
repeats exactly.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from selfalign.data.jsonl import write_jsonl_atomic, write_text_atomic
from selfalign.errors import SelfAlignError
from selfalign.hub import hub_error, hub_token
from selfalign.judging.refusal import RefusalDetector
from selfalign.preferences import helpful, revise
from selfalign.preferences.card import dataset_card, judge_accuracy
from selfalign.preferences.config import PreferencesConfig
from selfalign.preferences.stage_files import HELPFUL, JUDGMENTS, RESPONSES, REVISIONS, read_rows, stage_path
from selfalign.preferences.templates import load_refusal_template
from selfalign.quality import cut_to_last_sentence, measure_answer, summarize_answers

logger = logging.getLogger(__name__)

COLUMNS = {  # name -> Arrow type; every value may be null except the first four
    "prompt": "string", "chosen": "string", "rejected": "string", "pair_type": "string", "source": "string",
    "source_set": "string", "category": "string", "key": "string", "p_harmful_rejected": "float64",
    "p_harmful_chosen": "float64", "judge_reason": "string", "chosen_judge_reason": "string", "strategy": "string",
    "attempt": "int64", "principle": "string", "chosen_finish_reason": "string", "chosen_cut": "bool",
}  # fmt: skip
PAIR_TYPES = ("refusal", "helpful")
MIN_CUT_WORDS = 3  # "I can't." (i, can, t) is the shortest refusal worth keeping; "Steps:" is not an answer


def run(config: PreferencesConfig, stage_dir: Path, dataset_dir: Path) -> Path:
    """Build the dataset folder from the four stage files; returns the folder."""
    # ---- read what the stages wrote ---------------------------------------------------------------------------
    responses = read_rows(stage_path(stage_dir, RESPONSES))
    judgments = read_rows(stage_path(stage_dir, JUDGMENTS))
    revisions = _optional_rows(stage_dir, REVISIONS)
    refusals = _optional_rows(stage_dir, HELPFUL)

    # ---- pairs, cleaned, mixed, split ---------------------------------------------------------------------------
    formed = refusal_pairs(judgments, revisions) + engraved_refusal_pairs(judgments, responses)
    formed += helpful_pairs(judgments, refusals)
    order = {row["key"]: index for index, row in enumerate(responses)}
    formed.sort(key=lambda pair: order[pair["key"]])
    if config.cut_unfinished_chosen:
        formed = [end_chosen_at_sentence(pair) for pair in formed]
    clean, dropped = drop_degenerate(formed)
    refusal_kept = [pair for pair in clean if pair["pair_type"] == "refusal"]
    helpful_clean = [pair for pair in clean if pair["pair_type"] == "helpful"]
    helpful_wanted = helpful.helpful_wanted(len(refusal_kept), config.helpful_mix)
    helpful_kept = helpful.choose_helpful(helpful_clean, helpful_wanted, config.seed)
    kept = sorted(refusal_kept + helpful_kept, key=lambda pair: order[pair["key"]])
    train, held_out = split_pairs(kept, config.eval_fraction, config.seed)

    # ---- the funnel; a dataset that cannot teach what it is for stops the stage here ----------------------------
    stages = {"responses": responses, "judgments": judgments, "revisions": revisions, "refusals": refusals}
    funnel = count_funnel(stages, formed, dropped, kept)
    funnel["helpful_mix"] = mix_summary(config.helpful_mix, helpful_wanted, len(helpful_kept), len(kept))
    problem = one_sided(funnel, config)
    if problem is not None:
        # the funnel lands beside the stage files, so the numbers behind the message can be read after the failure
        write_text_atomic(dataset_dir.parent / "funnel.json", json.dumps(funnel, indent=2) + "\n")
        raise SelfAlignError(f"preferences: {problem} (funnel: {dataset_dir.parent / 'funnel.json'})")
    if funnel["helpful_mix"]["shortfall"]:
        logger.warning("build: %s", funnel["helpful_mix"]["note"])
    files = template_files(config)
    card = dataset_card(config, funnel, judge_accuracy(config), {"train": len(train), "eval": len(held_out)}, files)
    files.update({"README.md": card, "funnel.json": json.dumps(funnel, indent=2) + "\n"})
    write_dataset(dataset_dir, {"train": train, "eval": held_out}, files)
    logger.info("build: %d pairs (%d refusal, %d helpful) in %s", len(kept), len(refusal_kept), len(helpful_kept),
                dataset_dir)  # fmt: skip
    return dataset_dir


def template_files(config: PreferencesConfig) -> dict[str, str]:
    """The exact revision template, constitution (where the strategy reads one) and refusal template used."""
    template, constitution = revise.strategy_files(config)
    refusal_template = load_refusal_template(config.refusal_template)
    files = {f"templates/revise/{template.name}.yaml": template.text}
    if constitution is not None:
        files["templates/constitution.yaml"] = constitution.text
    files[f"templates/{refusal_template.name}.yaml"] = refusal_template.text
    return files


def _optional_rows(stage_dir: Path, name: str) -> list[dict[str, Any]]:
    """revise and helpful leave no file when they had nothing to do."""
    return read_rows(stage_path(stage_dir, name)) if stage_path(stage_dir, name).exists() else []


# ---- pairs ------------------------------------------------------------------------------------------------------


def refusal_pairs(judgments: list[dict], revisions: list[dict]) -> list[dict[str, Any]]:
    """(red-team prompt, accepted revision, original answer) where the judge said harmful, then harmless: never an
    abstention on either side."""
    accepted = {row["item_key"]: row for row in revisions if row["accepted"] and row["revision_label"] == 0}
    pairs = []
    for row in judgments:
        revision = accepted.get(row["key"])
        if row["source"] != "harmful" or row["label"] != 1 or revision is None:
            continue
        pairs.append(
            _pair(row, revision["revision"], row["response"], "refusal", p_harmful_rejected=row["p_harmful"],
                  p_harmful_chosen=revision["revision_p_harmful"], judge_reason=row["reason"],
                  chosen_judge_reason=revision["revision_reason"], strategy=revision["strategy"],
                  attempt=revision["attempt"], principle=revision["principle"],
                  chosen_finish_reason=revision.get("revision_finish_reason"))
        )  # fmt: skip
    return pairs


def engraved_refusal_pairs(judgments: list[dict], responses: list[dict]) -> list[dict[str, Any]]:
    """Principle engraving as preference pairs (Sun et al. 2023's context distillation, paired as in RLCD, Yang et
    al. 2023): (red-team prompt, the answer written with the principles in context, judged harmless, a refusal and not
    degenerate; the same prompt answered bare, where that is not a refusal). Training keeps the bare prompt, so the
    adapters learn to refuse without the principles. Only principle-driven runs have bare answers."""
    bare = {row["key"]: row["bare_response"] for row in responses if row.get("bare_response") is not None}
    detector = RefusalDetector.from_file()
    pairs = []
    for row in judgments:
        rejected = bare.get(row["key"])
        if rejected is None or row["source"] != "harmful" or row["label"] != 0:
            continue
        if not is_engraving_chosen(row, detector):
            continue
        if detector.detect(rejected).refused:  # the model refuses bare too: nothing to engrave
            continue
        pairs.append(
            _pair(row, row["response"], rejected, "refusal", p_harmful_rejected=None, p_harmful_chosen=row["p_harmful"],
                  judge_reason=None, chosen_judge_reason=row["reason"], strategy="principle-driven", attempt=None,
                  principle=None, chosen_finish_reason=row.get("finish_reason"))
        )  # fmt: skip
    return pairs


def is_engraving_chosen(row: dict, detector: RefusalDetector) -> bool:
    """A principled red-team answer worth engraving: a refusal that does not loop or ramble."""
    return detector.detect(row["response"]).refused and not measure_answer(row["response"]).is_degenerate


def helpful_pairs(judgments: list[dict], refusals: list[dict]) -> list[dict[str, Any]]:
    """(benign prompt, answer judged harmless and not a refusal, the model's refusal where the detector flags it)."""
    written = {row["key"]: row["refusal"] for row in refusals if row["is_refusal"]}
    detector = RefusalDetector.from_file()
    pairs = []
    for row in judgments:
        if row["key"] not in written or not helpful.is_candidate(row, detector):
            continue
        pairs.append(
            _pair(row, row["response"], written[row["key"]], "helpful", p_harmful_rejected=None,
                  p_harmful_chosen=row["p_harmful"], judge_reason=None, chosen_judge_reason=row["reason"],
                  strategy="helpful-mix", attempt=None, principle=None, chosen_finish_reason=row.get("finish_reason"))
        )  # fmt: skip
    return pairs


def _pair(row: dict, chosen: str, rejected: str, pair_type: str, **metadata: Any) -> dict[str, Any]:
    pair = {
        "prompt": row["prompt"], "chosen": chosen, "rejected": rejected, "pair_type": pair_type,
        "source": row["source"], "source_set": row["set"], "category": row["category"], "key": row["key"],
        "chosen_cut": False, **metadata,
    }  # fmt: skip
    return {column: pair[column] for column in COLUMNS}


def end_chosen_at_sentence(pair: dict[str, Any]) -> dict[str, Any]:
    """The pair with its chosen answer ended at its last complete sentence when the token limit stopped it
    mid-sentence (an unknown finish reason, as in stage files from before it was recorded, is read from the text)."""
    chosen = pair["chosen"] or ""
    cut = cut_to_last_sentence(chosen, pair["chosen_finish_reason"])
    return {**pair, "chosen": cut, "chosen_cut": cut != chosen.strip()}


def drop_degenerate(pairs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter]:
    """Pairs with nothing to learn from never reach the dataset; returns the rest and (reason, pair_type) counts."""
    kept, dropped, seen = [], Counter(), set()
    for pair in pairs:
        chosen, rejected = revise.normalized(pair["chosen"] or ""), revise.normalized(pair["rejected"] or "")
        identity = (revise.normalized(pair["prompt"]), chosen, rejected)
        quality = measure_answer(pair["chosen"] or "")
        if pair.get("chosen_cut") and quality.words < MIN_CUT_WORDS:
            reason = "chosen cut off before a sentence of 3+ words ended"
        elif not chosen:
            reason = "chosen empty"
        elif not rejected:
            reason = "rejected empty"
        elif chosen == rejected:
            reason = "chosen equals rejected"
        elif quality.is_degenerate:  # the stages already keep these out; a user's own stage files may not
            reason = f"chosen degenerate ({quality.degenerate_reason})"
        elif identity in seen:
            reason = "duplicate"
        else:
            seen.add(identity)
            kept.append(pair)
            continue
        dropped[(reason, pair["pair_type"])] += 1
    return kept, dropped


def split_pairs(pairs: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): `fraction` of each pair type held out, chosen by the seed; both keep the pairs' order."""
    sampler = random.Random(f"{seed}/split")
    held_out: set[str] = set()
    for pair_type in PAIR_TYPES:
        keys = [pair["key"] for pair in pairs if pair["pair_type"] == pair_type]
        held_out |= set(sampler.sample(keys, round(len(keys) * fraction)))
    return [p for p in pairs if p["key"] not in held_out], [p for p in pairs if p["key"] in held_out]


# ---- the funnel -------------------------------------------------------------------------------------------------


def count_funnel(stages: dict[str, list[dict]], formed: list[dict], dropped: Counter, kept: list[dict]) -> dict:
    """From prompts to kept pairs, red-team (harmful source) and benign apart, plus revision attempts and drops."""
    detector = RefusalDetector.from_file()
    responses, judgments = stages["responses"], stages["judgments"]
    revisions, refusals = stages["revisions"], stages["refusals"]

    def count(rows: list[dict], source: str, test: Any = lambda row: True) -> int:
        return sum(1 for row in rows if row["source"] == source and test(row))

    def both(rows: list[dict], test: Any = lambda row: True) -> tuple[int, int]:
        return count(rows, "harmful", test), count(rows, "benign", test)

    def per_type(pairs: list[dict]) -> list[int]:
        return [sum(pair["pair_type"] == pair_type for pair in pairs) for pair_type in PAIR_TYPES]

    revised = count(judgments, "harmful", lambda row: row["label"] == 1)
    bare = {row["key"] for row in responses if row.get("bare_response") is not None}
    accepted = len({row["item_key"] for row in revisions if row["accepted"]})
    # what the refusal detector alone would have accepted: with a forced refusal prefix, every usable revision
    usable = [row for row in revisions if row["why_not_accepted"] not in ("empty", "same as original")]
    detector_would = len({row["item_key"] for row in usable if detector.detect(row["revision"]).refused})
    over_refused = count(judgments, "benign", lambda r: r["label"] == 0 and detector.detect(r["response"]).refused)
    degenerate = both(responses, lambda row: measure_answer(row["response"]).is_degenerate)
    formed_by_type = per_type(formed)
    dropped_by_type = [sum(n for (_, t), n in dropped.items() if t == pair_type) for pair_type in PAIR_TYPES]
    steps = [
        ("prompts", *both(responses)),
        ("answered (non-empty)", *both(responses, lambda row: bool(row["response"].strip()))),
        ("answer degenerate (loops, repeats itself or empty: never chosen)", *degenerate),
        ("judged harmful", *both(judgments, lambda row: row["label"] == 1)),
        ("judged harmless", *both(judgments, lambda row: row["label"] == 0)),
        ("judge abstained", *both(judgments, lambda row: row["label"] is None)),
        ("revised (red-team answers judged harmful)", revised, None),
        ("revision accepted (judged harmless)", accepted, None),
        ("revision a refusal (what the refusal detector alone would accept)", detector_would, None),
        ("no revision accepted", revised - accepted, None),
        (
            "principled answer judged harmless, a refusal, not degenerate (principle-driven)",
            count(
                judgments,
                "harmful",
                lambda r: r["key"] in bare and r["label"] == 0 and is_engraving_chosen(r, detector),
            )
            if bare
            else None,
            None,
        ),
        (
            "... and the bare answer not a refusal (engraved pairs)",
            sum(p["strategy"] == "principle-driven" for p in formed) if bare else None,
            None,
        ),
        ("judged harmless but a refusal (over-refusal)", None, over_refused),
        ("helpful candidates (judged harmless, not a refusal, not degenerate)", None, len(refusals)),
        ("refusal written (the detector flags it)", None, sum(row["is_refusal"] for row in refusals)),
        ("pairs formed", *formed_by_type),
        (
            "chosen ended at its last complete sentence (the token limit stopped it mid-sentence)",
            *per_type([pair for pair in formed if pair["chosen_cut"]]),
        ),
        ("degenerate pairs dropped", *dropped_by_type),
        ("pairs after cleaning", *(f - d for f, d in zip(formed_by_type, dropped_by_type))),
        ("pairs kept (helpful mix)", *per_type(kept)),
    ]
    attempts = []
    for attempt in sorted({row["attempt"] for row in revisions}):
        reasons = Counter(row["why_not_accepted"] for row in revisions if row["attempt"] == attempt)
        attempts.append({"attempt": attempt, "revised": sum(reasons.values()), "accepted": reasons.pop(None, 0),
                         **dict(sorted(reasons.items()))})  # fmt: skip
    return {
        "steps": [{"step": label, "refusal": a, "helpful": b} for label, a, b in steps],
        "attempts": attempts,
        "dropped": [{"reason": r, "pair_type": t, "count": n} for (r, t), n in sorted(dropped.items())],
        "kept": dict(zip(PAIR_TYPES, per_type(kept))),
        # how the answers the adapters will learn from read: loops, token-limit hits, length (selfalign.quality)
        "quality": {
            "answers (red-team)": summarize_answers(_qualities(responses, "harmful")),
            "answers (benign)": summarize_answers(_qualities(responses, "benign")),
            **{
                f"chosen ({pair_type} pairs)": summarize_answers(
                    measure_answer(p["chosen"]) for p in kept if p["pair_type"] == pair_type
                )
                for pair_type in PAIR_TYPES
            },
        },  # fmt: skip
    }


def _qualities(responses: list[dict], source: str) -> list[Any]:
    return [
        measure_answer(row["response"], row.get("finish_reason"), row.get("response_tokens"))
        for row in responses
        if row["source"] == source
    ]


def mix_summary(share: float, wanted: int, kept_helpful: int, kept: int) -> dict[str, Any]:
    """What the helpful mix asked for and what it got. A mix that cannot be met keeps every helpful pair it has and
    says so here (the card and the run report show this note): fewer good helpful pairs beat padding with bad ones."""
    shortfall = kept_helpful < wanted
    actual = kept_helpful / kept if kept else 0.0
    note = (
        f"helpful_mix={share} wanted {wanted} helpful pairs, {kept_helpful} were available: the helpful share is "
        f"{actual:.2f}, not {share}"
        if shortfall
        else f"helpful_mix={share}: {kept_helpful} helpful pairs kept, as asked"
    )
    return {"asked": share, "wanted": wanted, "kept": kept_helpful, "share": round(actual, 4), "shortfall": shortfall,
            "note": note}  # fmt: skip


def one_sided(funnel: dict, config: PreferencesConfig) -> str | None:
    """Why the pairs cannot train what the run is for, from the funnel's own counts; None when they can.

    No refusal pair means nothing teaches harmlessness, and the helpful mix, a share of the refusal pairs, then keeps
    nothing either; with a helpful mix asked for, no helpful pair means the adapters learn only to refuse. Both are
    errors of this stage rather than of training, which would fail later on an empty file or learn the wrong thing.
    """
    steps = {step["step"]: step for step in funnel["steps"]}
    kept = funnel["kept"]
    judge = config.judge.describe()
    red_team = steps["prompts"]["refusal"]
    if kept["refusal"] == 0:
        harmful = steps["judged harmful"]["refusal"]
        abstained = steps["judge abstained"]["refusal"]
        why = f"{harmful} of {red_team} red-team answers judged harmful by {judge}"
        why += f" ({abstained} abstentions)" if abstained else ""
        if harmful:
            accepted = steps["revision accepted (judged harmless)"]["refusal"]
            why += f", {accepted} of their revisions accepted, {steps['pairs after cleaning']['refusal']} pairs left"
            why += " after cleaning"
        why += "; no refusal pairs"
        if config.helpful_mix > 0:
            why += f", so helpful_mix={config.helpful_mix} keeps no helpful pair either"
        return why
    if funnel["helpful_mix"]["wanted"] > 0 and kept["helpful"] == 0:
        candidates = steps["helpful candidates (judged harmless, not a refusal, not degenerate)"]["helpful"]
        written = steps["refusal written (the detector flags it)"]["helpful"]
        benign = steps["prompts"]["helpful"]
        return (
            f"{kept['refusal']} refusal pairs but no helpful pair for helpful_mix={config.helpful_mix}: "
            f"{candidates} of {benign} benign answers judged harmless by {judge}, not refusals and not degenerate, "
            f"{written} refusals written for them, {steps['pairs after cleaning']['helpful']} helpful pairs left "
            "after cleaning"
        )
    return None


# ---- writing --------------------------------------------------------------------------------------------------


def write_dataset(folder: Path, splits: dict[str, list[dict]], files: dict[str, str]) -> None:
    """Write the whole folder beside its final place, then swap it in: readers never see half a dataset."""
    import datasets

    folder = Path(folder)
    # a run killed while building (kill -9) leaves its half-built or replaced copy, named by its process id: the
    # output folder belongs to one run at a time, so whatever an earlier process left is removed before building
    for leftover in [*folder.parent.glob(f".{folder.name}.building-*"), *folder.parent.glob(f".{folder.name}.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    building = folder.with_name(f".{folder.name}.building-{os.getpid()}")
    features = datasets.Features({name: datasets.Value(kind) for name, kind in COLUMNS.items()})
    dataset = datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict({c: [row[c] for row in rows] for c in COLUMNS}, features=features)
            for name, rows in splits.items()
        }
    )
    datasets.disable_progress_bars()
    try:  # one shard each, also for an empty split: datasets cannot load a split saved as zero shards
        dataset.save_to_disk(str(building), num_shards=dict.fromkeys(splits, 1))
    finally:
        datasets.enable_progress_bars()
    for name, rows in splits.items():
        write_jsonl_atomic(building / f"{name}.jsonl", rows)
    for relative, text in files.items():
        write_text_atomic(building / relative, text)
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    building.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def push_to_hub(dataset_dir: Path, repo: str) -> str:
    """Upload the dataset and its card to the Hub; the token comes from HF_TOKEN and is never printed or stored."""
    import datasets

    token = hub_token()
    try:
        datasets.load_from_disk(str(dataset_dir)).push_to_hub(repo, token=token)
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.upload_file(path_or_fileobj=str(dataset_dir / "README.md"), path_in_repo="README.md", repo_id=repo,
                        repo_type="dataset")  # fmt: skip
        api.upload_folder(folder_path=str(dataset_dir / "templates"), path_in_repo="templates", repo_id=repo,
                          repo_type="dataset")  # fmt: skip
    except Exception as exc:  # network, auth and repo errors arrive as many types; never echo the token
        raise hub_error(f"push to hub repo {repo}", exc, token) from None
    return f"https://huggingface.co/datasets/{repo}"
