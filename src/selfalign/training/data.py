"""Preference pairs for training: load them, hold out an eval split, render them in the model's prompt format.

Input rows have `prompt` (the raw user request, not formatted), `chosen` and `rejected` (raw answers) and optional
metadata such as `pair_type` ("refusal" or "helpful"). Prompts are rendered by `PromptFormat.render_prompt` and
answers by `render_completion`, the same functions generation uses, and handed to TRL as plain (non-conversational)
prompt/completion (SFT) or prompt/chosen/rejected (DPO) text, so TRL adds the tokenizer's special tokens once.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from selfalign.data.loading import load_rows
from selfalign.errors import SelfAlignError
from selfalign.models.formats import PromptFormat

logger = logging.getLogger(__name__)

PAIR_COLUMNS = ["prompt", "chosen", "rejected"]
PAIR_TYPES = ("refusal", "helpful")  # selfalign's pair_type values (preferences.build)


def load_pairs(reference: str) -> Any:
    """A data reference (see `selfalign.data.loading`) or a `Dataset.save_to_disk` folder -> a `datasets.Dataset`."""
    path = Path(reference).expanduser()
    if not path.is_dir():
        return load_rows(reference, PAIR_COLUMNS)
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise SelfAlignError(f"{path}: a folder, but not one written by datasets' save_to_disk") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise SelfAlignError(f"{path}: a DatasetDict without a 'train' split; splits: {', '.join(loaded)}")
        loaded = loaded["train"]
    missing = [column for column in PAIR_COLUMNS if column not in loaded.column_names]
    if missing:
        present = ", ".join(loaded.column_names)
        raise SelfAlignError(f"{path}: no column '{missing[0]}'; columns present: {present}")
    if len(loaded) == 0:
        raise SelfAlignError(f"{path}: no rows")
    return loaded


def split_pairs(pairs: Any, eval_fraction: float, seed: int, eval_reference: str | None = None) -> tuple[Any, Any]:
    """(train, eval): a separate eval set if given, else a seeded held-out share; the same for SFT and DPO."""
    if eval_reference:
        return pairs, load_pairs(eval_reference)
    if eval_fraction <= 0 or len(pairs) < 2:
        return pairs, None
    split = pairs.train_test_split(test_size=eval_fraction, seed=seed)
    return split["train"], split["test"]


def sft_examples(
    pairs: Any, prompt_format: PromptFormat, source: str, system_prompt: str | None = None,
    pair_types: tuple[str, ...] = PAIR_TYPES,
) -> Any:  # fmt: skip
    """(prompt, chosen) rows -> TRL prompt/completion examples, of the pair types asked for (a row without a
    pair_type is always kept: a user's own pairs)."""
    import datasets

    examples, skipped = [], Counter()
    for row in pairs:
        if row.get("pair_type") in PAIR_TYPES and row["pair_type"] not in pair_types:
            skipped[f"{row['pair_type']} pairs left out"] += 1
        elif not (_has_text(row["prompt"]) and _has_text(row["chosen"])):
            skipped["empty 'prompt' or 'chosen'"] += 1
        else:
            examples.append(
                {
                    "prompt": prompt_format.render_prompt(row["prompt"], system_prompt),
                    "completion": prompt_format.render_completion(row["chosen"]),
                }
            )
    _report(skipped, source, "SFT", len(examples))
    return datasets.Dataset.from_list(examples)


def dpo_examples(
    pairs: Any, prompt_format: PromptFormat, source: str, system_prompt: str | None = None,
    pair_types: tuple[str, ...] = PAIR_TYPES,
) -> Any:  # fmt: skip
    """(prompt, chosen, rejected) rows -> TRL preference examples of the pair types asked for; pairs with nothing to
    prefer are dropped."""
    import datasets

    examples, skipped = [], Counter()
    for row in pairs:
        if row.get("pair_type") in PAIR_TYPES and row["pair_type"] not in pair_types:
            skipped[f"{row['pair_type']} pairs left out"] += 1
        elif not all(_has_text(row[column]) for column in PAIR_COLUMNS):
            skipped["empty 'prompt', 'chosen' or 'rejected'"] += 1
        elif row["chosen"].strip() == row["rejected"].strip():
            skipped["'chosen' equal to 'rejected'"] += 1
        else:
            examples.append(
                {
                    "prompt": prompt_format.render_prompt(row["prompt"], system_prompt),
                    "chosen": prompt_format.render_completion(row["chosen"]),
                    "rejected": prompt_format.render_completion(row["rejected"]),
                }
            )
    _report(skipped, source, "DPO", len(examples))
    return datasets.Dataset.from_list(examples)


def check_prompts_fit(examples: Any, prompt_format: PromptFormat, max_length: int, source: str, stage: str) -> int:
    """Count prompts that alone fill `max_length`: truncation leaves them no answer token and TRL drops them."""
    too_long = sum(len(prompt_format.encode(prompt)) >= max_length for prompt in examples["prompt"])
    if too_long == len(examples):
        raise SelfAlignError(
            f"{source}: every {stage} prompt is at least max_length={max_length} tokens long, so truncation leaves "
            "no answer to train on; raise max_length"
        )
    if too_long:
        logger.warning("%s: %d %s prompts fill max_length=%d and are left out", source, too_long, stage, max_length)
    return too_long


def store_examples(examples: Any, folder: Path, write: bool) -> Any:
    """Write examples as Arrow (when `write`) and read them back memory-mapped, so TRL's preprocessing caches beside
    them, in one folder all processes of a multi-process run share (in-memory sets cache in per-process temp dirs)."""
    import datasets

    if write:
        shutil.rmtree(folder, ignore_errors=True)
        examples.save_to_disk(str(folder))
    return datasets.load_from_disk(str(folder))


def _has_text(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, list) and bool(value)  # a prompt given as a list of chat messages


def _report(skipped: Counter, source: str, stage: str, kept: int) -> None:
    reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.items())
    if not kept:
        raise SelfAlignError(f"{source}: no {stage} examples left after formatting ({reasons or 'no rows'})")
    if skipped:
        logger.warning("%s: %d %s examples; skipped %s", source, kept, stage, reasons)
