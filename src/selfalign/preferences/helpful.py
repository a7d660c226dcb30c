"""Stage 4, helpful mix: pairs that teach the model when *not* to refuse.

The reference's models refused 98% of red-team prompts and became over-cautious; its authors proposed mixing in
helpful answers. For a benign or helpful prompt, an answer the judge labels harmless and the refusal detector does
not flag becomes `chosen`, and a refusal the model writes when told to refuse becomes `rejected`. This stage writes
those refusals (only one the detector flags is used); the build keeps as many helpful pairs as make `helpful_mix` of
all pairs, chosen by a seeded hash of their keys.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from selfalign.judging.refusal import RefusalDetector
from selfalign.preferences import judge_stage
from selfalign.preferences.config import PreferencesConfig
from selfalign.preferences.stage_files import HELPFUL, Models, open_stage, process_in_fixed_chunks, read_rows
from selfalign.preferences.templates import join_prefix, load_refusal_template
from selfalign.quality import measure_answer
from selfalign.templating import render_template

logger = logging.getLogger(__name__)


def settings(config: PreferencesConfig) -> dict[str, Any]:
    template = load_refusal_template(config.refusal_template)
    return {
        **judge_stage.settings(config),
        "refusal_template": config.refusal_template,
        "template_sha256": hashlib.sha256(template.text.encode()).hexdigest(),
    }


def is_candidate(row: dict[str, Any], detector: RefusalDetector) -> bool:
    """A benign prompt answered without a refusal, judged harmless (an abstention is not harmless), and not
    degenerate: a looping answer would teach the loop, so it never becomes `chosen` (selfalign.quality)."""
    return (
        row["source"] == "benign" and row["label"] == 0 and not detector.detect(row["response"]).refused
        and not measure_answer(row["response"]).is_degenerate
    )  # fmt: skip


def run(config: PreferencesConfig, judgments: Path, stage_dir: Path, models: Models | None = None) -> Path:
    """Write a refusal for every helpful candidate; returns the helpful file."""
    models = models or Models(config)
    template = load_refusal_template(config.refusal_template)
    detector = RefusalDetector.from_file()
    candidates = [row for row in read_rows(judgments) if is_candidate(row, detector)]
    store = open_stage(stage_dir, HELPFUL, settings(config))
    params = config.generation.model_copy(update={"seed": config.seed})
    logger.info("helpful: %d candidates, %d refusals already written", len(candidates),
                sum(row["key"] in store for row in candidates))  # fmt: skip

    def refuse_chunk(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        requests = [render_template(template.prompt, template.source, request=row["prompt"]) for row in chunk]
        completions = models.policy.answer(requests, params, answer_prefix=template.response_prefix)
        refusals = [join_prefix(template.response_prefix, c.text) for c in completions]
        return [
            {
                "key": row["key"],
                "refusal": refusal,
                "is_refusal": detector.detect(refusal).refused,
                "refusal_tokens": completion.completion_tokens,  # the run manifest sums them
            }
            for row, refusal, completion in zip(chunk, refusals, completions)
        ]

    process_in_fixed_chunks(candidates, store, refuse_chunk, config.chunk_size)
    return store.path


def helpful_wanted(refusal_pairs: int, share: float) -> int:
    """How many helpful pairs make `share` of all pairs beside `refusal_pairs` refusal pairs."""
    return round(refusal_pairs * share / (1.0 - share))


def choose_helpful(pairs: list[dict[str, Any]], wanted: int, seed: int) -> list[dict[str, Any]]:
    """`wanted` of the helpful pairs, by a seeded hash of each key (adding candidates does not reshuffle the rest),
    in their original order."""

    def rank(pair: dict[str, Any]) -> str:
        return hashlib.sha256(f"{seed}/helpful-mix/{pair['key']}".encode()).hexdigest()

    keep = {pair["key"] for pair in sorted(pairs, key=rank)[:wanted]}
    return [pair for pair in pairs if pair["key"] in keep]
