"""What the stages share: their progress files, fixed chunks, and the models, loaded once and only when needed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfalign.backends.language_model import LanguageModel, load_language_model
from selfalign.data.resumable import ResumableJsonl, process_resumably
from selfalign.errors import SelfAlignError
from selfalign.judging.judge import Judge, build_judge
from selfalign.preferences.config import PreferencesConfig
from selfalign.stage_settings import check_settings

RESPONSES, JUDGMENTS, REVISIONS, HELPFUL = "responses", "judgments", "revisions", "helpful"


class Models:
    """The policy and its judge for one run, loaded on first use: a resumed run whose stages are done loads nothing."""

    def __init__(self, config: PreferencesConfig, policy: LanguageModel | None = None, judge: Judge | None = None):
        self.config, self._policy, self._judge = config, policy, judge
        self._loaded: list[LanguageModel] = []  # what close() releases

    @property
    def policy(self) -> LanguageModel:
        if self._policy is None:
            self._policy = load_language_model(self.config.policy)
            self._loaded.append(self._policy)
        return self._policy

    @property
    def judge(self) -> Judge:
        if self._judge is None:
            separate = self.config.judge.model
            judge_model = self.policy if separate is None else load_language_model(separate)
            if separate is not None:
                self._loaded.append(judge_model)
            self._judge = build_judge(self.config.judge, judge_model)
        return self._judge

    def close(self) -> None:
        """Release the models this object loaded (a server's registered adapter, a vLLM engine), not those given."""
        for model in self._loaded:
            model.close()
        self._loaded.clear()


def stage_path(stage_dir: Path, name: str) -> Path:
    return Path(stage_dir) / f"{name}.jsonl"


def open_stage(stage_dir: Path, name: str, settings: dict[str, Any]) -> ResumableJsonl:
    """A stage's progress file, refused when it was started with other settings (its rows would answer another run).

    `settings` holds exactly what changes the stage's rows, as JSON; it is stored beside the rows on first use
    (`<name>.settings.json`) and compared with the stored ones on every later use (selfalign.stage_settings).
    """
    path = stage_path(stage_dir, name)
    remedy = "use another --out, or delete it and the stage files after it to redo them"
    check_settings(path, settings, path.with_suffix(".settings.json"), remedy)
    return ResumableJsonl(path)


def process_in_fixed_chunks(
    items: list[dict[str, Any]], store: ResumableJsonl, work: Callable[[list[dict]], list[dict]], chunk_size: int
) -> list[dict[str, Any]]:
    """`process_resumably` over chunks fixed by position, so that a resumed run batches each item with the same
    neighbours as an uninterrupted one: a batched model's output (padding, sampling) can depend on its batch."""
    rows: list[dict[str, Any]] = []
    for start in range(0, len(items), chunk_size):
        chunk = items[start : start + chunk_size]
        rows.extend(process_resumably(chunk, store, work, chunk_size=len(chunk)))
    return rows


def read_rows(path: Path) -> list[dict[str, Any]]:
    """A stage's rows in the order written, read as a resumed stage reads them: a torn last line is not a row."""
    if not Path(path).exists():
        raise SelfAlignError(f"{path}: not found; run the stage that writes it first")
    return list(ResumableJsonl(path).rows())
