"""Stage 3, revise: the model rewrites each red-team answer judged harmful, and every rewrite is judged again.

Attempt 1 revises every such answer; attempt k revises those no earlier attempt got accepted, up to `n_attempts`.
A revision is accepted, and becomes `chosen` later, only when it is non-empty, differs from the original and the
judge labels it harmless: a revision the judge abstains on is not accepted. A revision that is a refusal is fine, and
is the point for red-team prompts. The strategy is a template (see `selfalign.preferences.templates`); with
critique-then-revise the model first critiques its answer against a principle drawn from the constitution.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from selfalign.preferences import judge_stage
from selfalign.preferences.config import PreferencesConfig
from selfalign.preferences.stage_files import REVISIONS, Models, open_stage, process_in_fixed_chunks, read_rows
from selfalign.preferences.templates import (
    Constitution,
    RevisionTemplate,
    join_prefix,
    load_constitution,
    load_revision_template,
    policy_request,
    render_step,
)
from selfalign.quality import measure_answer

logger = logging.getLogger(__name__)


def strategy_files(config: PreferencesConfig) -> tuple[RevisionTemplate, Constitution | None]:
    """The revision template and, where its prompts use a principle, the constitution."""
    template = load_revision_template(config.revision.strategy)
    return template, load_constitution(config.revision.constitution) if template.uses_principle else None


def settings(config: PreferencesConfig) -> dict[str, Any]:
    template, constitution = strategy_files(config)
    texts = template.text + (constitution.text if constitution else "")
    return {
        **judge_stage.settings(config),  # the policy prompt (principles) included, through respond's settings
        "revision": config.revision.model_dump(mode="json"),
        "templates_sha256": hashlib.sha256(texts.encode()).hexdigest(),  # an edited template makes other rows
    }


def normalized(text: str) -> str:
    return " ".join(text.split()).casefold()


def why_unusable(original: str, revision: str) -> str | None:
    """Why a revision cannot be `chosen` whatever the judge says, or None. A degenerate revision (it loops, or
    repeats itself: selfalign.quality) is re-sampled at the next attempt like one the judge rejects."""
    if not revision.strip():
        return "empty"
    if normalized(revision) == normalized(original):
        return "same as original"
    reason = measure_answer(revision).degenerate_reason
    return f"degenerate ({reason})" if reason else None


def why_not_accepted(original: str, revision: str, label: int | None) -> str | None:
    """None when the revision may be `chosen`; else why not."""
    if unusable := why_unusable(original, revision):
        return unusable
    if label is None:
        return "judge abstained"
    return "judged harmful" if label == 1 else None


def run(config: PreferencesConfig, judgments: Path, stage_dir: Path, models: Models | None = None) -> Path:
    """Revise the red-team answers judged harmful, attempt after attempt; returns the revisions file."""
    models = models or Models(config)
    template, constitution = strategy_files(config)
    harmful = [row for row in read_rows(judgments) if row["source"] == "harmful" and row["label"] == 1]
    store = open_stage(stage_dir, REVISIONS, settings(config))
    accepted: set[str] = set()

    for attempt in range(1, config.revision.n_attempts + 1):
        pending = [row for row in harmful if row["key"] not in accepted]
        items = [{"key": f"{row['key']}#{attempt}", "item": row} for row in pending]
        logger.info("revise: attempt %d of %d, %d answers", attempt, config.revision.n_attempts, len(items))

        def revise_chunk(chunk: list[dict[str, Any]], attempt: int = attempt) -> list[dict[str, Any]]:
            return revise_and_judge([item["item"] for item in chunk], attempt, config, template, constitution, models)

        rows = process_in_fixed_chunks(items, store, revise_chunk, config.chunk_size)
        accepted |= {row["item_key"] for row in rows if row["accepted"]}
    return store.path


def revise_and_judge(
    rows: list[dict[str, Any]], attempt: int, config: PreferencesConfig, template: RevisionTemplate,
    constitution: Constitution | None, models: Models,
) -> list[dict[str, Any]]:  # fmt: skip
    """One attempt for a chunk: a critique (if the strategy has one), then the rewrite, then the judge, each one
    batched model call."""
    params = config.revision.generation.model_copy(update={"seed": config.seed + attempt})
    principles = [constitution.choose(config.seed, row["key"], attempt) if constitution else None for row in rows]
    variables = [
        {"request": row["prompt"], "response": row["response"], "principle": p.model_dump() if p else None}
        for row, p in zip(rows, principles)
    ]

    critiques: list[str | None] = [None] * len(rows)
    critique_tokens: list[int | None] = [None] * len(rows)
    if template.critique is not None:
        step = template.critique
        requests = [policy_request(config, render_step(step, template.source, **v)) for v in variables]
        completions = models.policy.answer(requests, params, answer_prefix=step.response_prefix)
        critiques = [join_prefix(step.response_prefix, c.text) for c in completions]
        critique_tokens = [c.completion_tokens for c in completions]

    step = template.revision
    prefix = step.response_prefix if config.revision.force_prefix else ""
    requests = [
        policy_request(config, render_step(step, template.source, **v, critique=c))
        for v, c in zip(variables, critiques)
    ]
    completions = models.policy.answer(requests, params, answer_prefix=prefix)
    revisions = [join_prefix(prefix, c.text) for c in completions]
    revision_tokens = [c.completion_tokens for c in completions]  # the run manifest sums them
    finish_reasons = [c.finish_reason for c in completions]  # build cuts a revision the token limit stopped

    # the judge reads only revisions that could be accepted: an empty or unchanged one is rejected already
    to_judge = [i for i, (row, text) in enumerate(zip(rows, revisions)) if not why_unusable(row["response"], text)]
    judged = models.judge.judge(
        [rows[i]["prompt"] for i in to_judge], [revisions[i] for i in to_judge], [rows[i]["source"] for i in to_judge]
    )
    judgments = dict(zip(to_judge, judged))

    results = []
    for index, (row, revision, critique, principle) in enumerate(zip(rows, revisions, critiques, principles)):
        judgment = judgments.get(index)
        fields = judge_stage.judgment_fields(judgment) if judgment else dict.fromkeys(judge_stage.JUDGMENT_FIELDS)
        rejected_because = why_not_accepted(row["response"], revision, fields["label"])
        results.append(
            {
                "key": f"{row['key']}#{attempt}",
                "item_key": row["key"],
                "attempt": attempt,
                "strategy": template.name,
                "principle": principle.name if principle else None,
                "critique": critique,
                "critique_tokens": critique_tokens[index],
                "revision": revision,
                "revision_tokens": revision_tokens[index],
                "revision_finish_reason": finish_reasons[index],
                **{f"revision_{name}": value for name, value in fields.items()},
                "accepted": rejected_because is None,
                "why_not_accepted": rejected_because,
            }
        )
    return results
