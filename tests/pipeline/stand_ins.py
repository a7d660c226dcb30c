"""Stand-in stages for the pipeline's tests: each records that it ran and writes the files its typed outputs are read
from (pipeline/outputs.py), holding what it was given, so output hashes follow settings and inputs as real ones do."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfalign.models.adapter_files import ADAPTER_FILES
from selfalign.pipeline import stages as stages_module
from selfalign.pipeline.outputs import ADAPTER, Evaluation, PreferenceDataset, RunReport, TrainedAdapter, TunedJudge


def given(settings: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """What a stand-in stage was handed: its settings as its key sees them, and its inputs by name."""
    dumped = None if settings is None else settings.model_dump(mode="json", context=stages_module.CACHE_KEY)
    return {"settings": dumped, "inputs": sorted(inputs)}


def _write(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, default=str, sort_keys=True))


def _tuned_judge(out: Path, content: Any) -> None:
    (out / "judge.yaml").write_text("design: rule\n")
    _write(out / "results.json", content)


def _dataset(out: Path, content: Any) -> None:
    _write(out / "dataset" / "funnel.json", content)
    (out / "dataset" / "train.jsonl").write_text("")


def _adapter(out: Path, content: Any) -> None:
    _write(out / ADAPTER / "metrics.json", {"stage": out.parent.name, **content})  # run/<sft|dpo>/<name>-<key>
    for name in ADAPTER_FILES:  # what an evaluation hashes to know which adapter its answers came from
        _write(out / ADAPTER / name, {"file": name, **content})


WRITERS: dict[type, Callable[[Path, Any], None]] = {
    TunedJudge: _tuned_judge,
    PreferenceDataset: _dataset,
    TrainedAdapter: _adapter,
    Evaluation: lambda out, content: _write(out / "metrics.json", content),
    RunReport: lambda out, content: _write(out / "report.md", content),
}
STAGE_FUNCTIONS = {  # stages_module's function -> the outputs it returns
    "run_tune_judge": TunedJudge,
    "run_preferences": PreferenceDataset,
    "run_sft": TrainedAdapter,
    "run_dpo": TrainedAdapter,
    "run_evaluation": Evaluation,
    "run_report": RunReport,
}


def stand_in(outputs_type: type, calls: list[str], content: Callable[[Any, dict], Any] = given):
    """A stage function that appends its stage's name to `calls`, writes `content(settings, inputs)` where its
    outputs are read from, and returns them read back."""

    def run(settings: Any, inputs: dict[str, Any], out: Path) -> Any:
        calls.append(out.name.rsplit("-", 1)[0])
        WRITERS[outputs_type](out, content(settings, inputs))
        return outputs_type.from_folder(out)

    return run


def replace_stages(
    monkeypatch, calls: list[str], keep: tuple[str, ...] = (), **contents: Callable[[Any, dict], Any]
) -> None:
    """Every stage of `selfalign run` but those in `keep` (by function name) by a stand-in; `contents` gives some of
    them their own."""
    for function, outputs_type in STAGE_FUNCTIONS.items():
        if function not in keep:
            monkeypatch.setattr(stages_module, function, stand_in(outputs_type, calls, contents.get(function, given)))
