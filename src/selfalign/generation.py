"""`selfalign generate`: answer every prompt of a file with one model, one output row per input row, in order."""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import Field

from selfalign.backends.base import GenerationParams
from selfalign.backends.language_model import ModelConfig, load_language_model
from selfalign.data.jsonl import write_jsonl_atomic
from selfalign.data.loading import load_rows
from selfalign.errors import SelfAlignError


class GenerateConfig(ModelConfig):
    prompt_column: str = Field("prompt", description="Column of the input file that holds the prompt.")
    params: GenerationParams = Field(default_factory=GenerationParams)


def generate_file(config: GenerateConfig, prompts_path: Path, out_path: Path) -> str:
    """Generate for every row of `prompts_path` and write `out_path` atomically; returns a one-line summary."""
    rows = load_rows(str(prompts_path), [config.prompt_column], clean=False).to_list()
    for number, row in enumerate(rows, start=1):
        if not isinstance(row[config.prompt_column], str) or not row[config.prompt_column].strip():
            raise SelfAlignError(f"{prompts_path}: row {number}: '{config.prompt_column}' is empty or not text")
    model_config = ModelConfig.model_validate(config.model_dump(include=set(ModelConfig.model_fields)))
    model = load_language_model(model_config)
    try:
        started = time.perf_counter()
        completions = model.answer([row[config.prompt_column] for row in rows], config.params)
        seconds = time.perf_counter() - started
    finally:
        model.close()  # a server's registered adapter, a vLLM engine
    write_jsonl_atomic(
        out_path,
        (
            {
                **row,
                "completion": completion.text,
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "finish_reason": completion.finish_reason,
            }
            for row, completion in zip(rows, completions)
        ),
    )
    tokens = sum(c.completion_tokens for c in completions)
    rate = tokens / max(seconds, 1e-9)
    return f"wrote {len(rows)} completions to {out_path} ({tokens} tokens in {seconds:.1f} s, {rate:.0f} tok/s)"
