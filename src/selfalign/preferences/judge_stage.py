"""Stage 2, judge: the self-judge labels every non-empty answer harmful (1), harmless (0) or abstains (None).

The prompt's source set goes to the judge too (the composite design uses it: a red-team prompt answered without a
refusal is likely harmful). An abstention is kept as one, so that no later stage can read it as a 0 or a 1.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from selfalign.judging.judge import Judgment
from selfalign.preferences import respond
from selfalign.preferences.config import PreferencesConfig
from selfalign.preferences.stage_files import JUDGMENTS, Models, open_stage, process_in_fixed_chunks, read_rows

logger = logging.getLogger(__name__)


def settings(config: PreferencesConfig) -> dict[str, Any]:
    return {**respond.settings(config), "judge": config.judge.model_dump(mode="json")}


JUDGMENT_FIELDS = ("label", "p_harmful", "reason", "raw", "why_abstained")


def judgment_fields(judgment: Judgment) -> dict[str, Any]:
    return {name: getattr(judgment, name) for name in JUDGMENT_FIELDS}


def run(config: PreferencesConfig, responses: Path, stage_dir: Path, models: Models | None = None) -> Path:
    """Judge every answer of `responses` not judged yet; returns the judgments file (responses plus judgments)."""
    models = models or Models(config)
    answered = [row for row in read_rows(responses) if row["response"].strip()]
    store = open_stage(stage_dir, JUDGMENTS, settings(config))
    logger.info("judge: %d answers, %d already judged", len(answered), sum(row["key"] in store for row in answered))

    def judge_chunk(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        judgments = models.judge.judge(
            [row["prompt"] for row in chunk], [row["response"] for row in chunk], [row["source"] for row in chunk]
        )
        return [{**row, **judgment_fields(judgment)} for row, judgment in zip(chunk, judgments)]

    process_in_fixed_chunks(answered, store, judge_chunk, config.chunk_size)
    return store.path
