"""What each stage of `selfalign run` hands the next: small typed values, each read back from its stage folder.

A stage that runs returns its outputs; a cached stage's outputs are read from its finished folder by `from_folder`,
so the stages after it get the same values whether it ran now or earlier. Every file named here is one its library
entry point writes (judging.tuning, preferences.build, training.common.save_outputs, evaluation.run).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfalign.errors import SelfAlignError
from selfalign.judging.judge import JudgeConfig, load_judge_file

ADAPTER = "training"  # a training stage's adapter, tokenizer, metrics and checkpoints, under its folder


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SelfAlignError(f"{path}: not found; the stage that writes it did not finish") from None
    except json.JSONDecodeError as exc:
        raise SelfAlignError(f"{path}: line {exc.lineno}: not JSON ({exc.msg})") from None


@dataclass(frozen=True)
class TunedJudge:
    """tune-judge's choice: the judge the later stages judge with (it judges with the run's model)."""

    folder: Path
    judge: JudgeConfig  # judge.yaml, read by the one judge.yaml loader
    results: Path  # results.json: every design's measured accuracy, which the dataset card quotes

    @classmethod
    def from_folder(cls, folder: Path) -> TunedJudge:
        results = folder / "results.json"
        if not results.is_file():
            raise SelfAlignError(f"{results}: not found; the stage that writes it did not finish")
        return cls(folder, load_judge_file(folder / "judge.yaml"), results)


@dataclass(frozen=True)
class PreferenceDataset:
    """The preferences stage's pairs, split, with the funnel of how many items each step kept."""

    folder: Path
    train: Path  # dataset/train.jsonl
    eval: Path | None  # dataset/eval.jsonl; None where nothing was held out
    funnel: dict[str, Any]  # dataset/funnel.json

    @property
    def dataset(self) -> Path:
        """The dataset folder: both splits, the Arrow DatasetDict, the card and the templates used."""
        return self.train.parent

    @classmethod
    def from_folder(cls, folder: Path) -> PreferenceDataset:
        dataset = folder / "dataset"
        funnel = _read_json(dataset / "funnel.json")  # written with the splits, so its presence means they exist
        held_out = dataset / "eval.jsonl"
        has_eval = held_out.is_file() and held_out.stat().st_size > 0
        return cls(folder, dataset / "train.jsonl", held_out if has_eval else None, funnel)


@dataclass(frozen=True)
class TrainedAdapter:
    """An SFT or DPO stage's LoRA adapter."""

    folder: Path
    adapter: Path  # the PEFT adapter folder (training/), which evaluation and a DPO that continues from it load
    method: str  # "sft" or "dpo", as metrics.json records it
    metrics: dict[str, Any]  # training/metrics.json: losses, held-out rewards, tokens

    @classmethod
    def from_folder(cls, folder: Path) -> TrainedAdapter:
        adapter = folder / ADAPTER
        metrics = _read_json(adapter / "metrics.json")
        return cls(folder, adapter, str(metrics.get("stage")), metrics)


@dataclass(frozen=True)
class Evaluation:
    """The evaluation of the base model and every adapter."""

    folder: Path
    metrics: dict[str, Any]  # metrics.json, from which report.md and report.html were written

    @classmethod
    def from_folder(cls, folder: Path) -> Evaluation:
        return cls(folder, _read_json(folder / "metrics.json"))


@dataclass(frozen=True)
class RunReport:
    """The run's report.md (and report.html where the evaluation wrote one)."""

    folder: Path
    files: tuple[Path, ...]

    @classmethod
    def from_folder(cls, folder: Path) -> RunReport:
        if not (folder / "report.md").is_file():
            raise SelfAlignError(f"{folder / 'report.md'}: not found; the stage that writes it did not finish")
        return cls(folder, tuple(folder / name for name in ("report.md", "report.html") if (folder / name).is_file()))


StageOutputs = TunedJudge | PreferenceDataset | TrainedAdapter | Evaluation | RunReport
