"""Stage 1, respond: the policy answers the training prompts, red-team and benign alike.

By default the prompt is the bare request in the policy's own format, with no example answers: a base model copies
in-context examples (NOTES: one refusal example made it refuse "What is the capital of France?"), so the answers
measure the model, not the prompt. `policy_prompt: principle-driven` puts principles and a balanced handful of worked
exemplars before it (Sun et al. 2023), and answers each red-team prompt a second time bare (`bare_response`); the rows
keep the bare request either way. Each item has a stable key (prompt set + row id), which is what resuming and every
later stage go by.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Any

from selfalign.data.loading import load_rows
from selfalign.errors import SelfAlignError
from selfalign.preferences.config import CATEGORY_COLUMNS, PreferencesConfig, PromptSet
from selfalign.preferences.stage_files import RESPONSES, Models, open_stage, process_in_fixed_chunks
from selfalign.preferences.templates import load_principles, policy_request

logger = logging.getLogger(__name__)


def settings(config: PreferencesConfig) -> dict[str, Any]:
    """What changes this stage's rows: the policy, the prompts, how it is prompted and generates, and the seed."""
    return {
        **principle_settings(config),
        "policy": config.policy.model_dump(mode="json"),
        "prompts": [prompt_set.model_dump(mode="json") for prompt_set in config.prompts],
        "generation": config.generation.model_dump(mode="json"),
        "seed": config.seed,
        "chunk_size": config.chunk_size,
    }


def principle_settings(config: PreferencesConfig) -> dict[str, Any]:
    """The policy prompt's part of a stage key: a bare run's keys stay as they were; an edited principles file
    reruns what read it."""
    if config.policy_prompt == "bare":
        return {}
    text = load_principles(config.principles.file).text
    return {
        "policy_prompt": config.policy_prompt,
        "principles": config.principles.model_dump(mode="json"),
        "principles_sha256": hashlib.sha256(text.encode()).hexdigest(),
    }


def load_prompt_items(config: PreferencesConfig) -> list[dict[str, Any]]:
    """Every prompt of every set (each limited to a seeded sample, kept in file order) as a keyed item."""
    items: list[dict[str, Any]] = []
    for prompt_set in config.prompts:
        rows = load_prompt_rows(prompt_set)
        if prompt_set.limit is not None and prompt_set.limit < len(rows):
            sampler = random.Random(f"{config.seed}/{prompt_set.name}")  # str seeds hash the same in every process
            rows = [rows[i] for i in sorted(sampler.sample(range(len(rows)), prompt_set.limit))]
        items.extend(_item(prompt_set, row, number) for number, row in enumerate(rows, start=1))
    keys = [item["key"] for item in items]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise SelfAlignError(f"two prompts share the key '{duplicate}': a prompt set's id_column must be unique")
    return items


def load_prompt_rows(prompt_set: PromptSet) -> list[dict[str, Any]]:
    """A prompt set's rows, its prompt column read as `prompt`. An id_column the config names must exist: a
    misspelt one would otherwise key the prompts by row number without a word (the reference configs once named
    `index`, which HuggingFaceH4/cai-conversation-harmless does not have)."""
    rows = load_rows(prompt_set.data, ["prompt"], column_map={"prompt": prompt_set.prompt_column}).to_list()
    named = "id_column" in prompt_set.model_fields_set
    if named and not any(prompt_set.id_column in row for row in rows):
        present = ", ".join(sorted({key for row in rows for key in row}))
        raise SelfAlignError(
            f"{prompt_set.data}: no column '{prompt_set.id_column}' (the prompt set's id_column); columns present: "
            f"{present}"
        )
    return rows


def _item(prompt_set: PromptSet, row: dict[str, Any], number: int) -> dict[str, Any]:
    row_id = row.get(prompt_set.id_column, number)
    category = next((row[c] for c in CATEGORY_COLUMNS if row.get(c) is not None), None)
    return {
        "key": f"{prompt_set.name}/{row_id}",
        "set": prompt_set.name,
        "source": prompt_set.source,
        "category": None if category is None else str(category),
        "prompt": row["prompt"],
    }


def run(config: PreferencesConfig, items: list[dict[str, Any]], stage_dir: Path, models: Models | None = None) -> Path:
    """Answer every item not answered yet, a chunk per model call; returns the responses file."""
    models = models or Models(config)
    store = open_stage(stage_dir, RESPONSES, settings(config))
    params = config.generation.model_copy(update={"seed": config.seed})
    logger.info("respond: %d prompts, %d already answered", len(items), sum(item["key"] in store for item in items))

    def answer_chunk(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        completions = models.policy.answer([policy_request(config, item["prompt"]) for item in chunk], params)
        rows = [
            {**item, "response": c.text, "finish_reason": c.finish_reason, "response_tokens": c.completion_tokens}
            for item, c in zip(chunk, completions)
        ]
        if config.policy_prompt == "principle-driven":
            # what the model says to a red-team prompt without the principles: the rejected side of an engraved
            # refusal pair (build.engraved_refusal_pairs), the same prompt answered with and without them
            harmful = [row for row in rows if row["source"] == "harmful"]
            bare = models.policy.answer([row["prompt"] for row in harmful], params) if harmful else []
            for row, completion in zip(harmful, bare):
                row["bare_response"], row["bare_response_tokens"] = completion.text, completion.completion_tokens
        return rows

    process_in_fixed_chunks(items, store, answer_chunk, config.chunk_size)
    return store.path
