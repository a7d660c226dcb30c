"""`selfalign rescore`: judge saved answers again with another judge, without generating anything again.

Like inspect_ai's `score` on old logs: the evaluation folder's samples.jsonl holds every answer, so a new judge
(another template, mode or model) re-labels them and new metrics are written beside the old ones, with the
agreement between the two judges.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from selfalign.backends.language_model import load_language_model
from selfalign.data.jsonl import read_jsonl, write_jsonl_atomic, write_text_atomic
from selfalign.errors import SelfAlignError
from selfalign.evaluation.metrics import compute_metrics
from selfalign.evaluation.run import EvaluateConfig
from selfalign.judging.judge import JudgeConfig, build_judge


def rescore(eval_dir: Path, judge: JudgeConfig) -> tuple[Path, dict]:
    config_path, samples_path = eval_dir / "config.json", eval_dir / "samples.jsonl"
    if not config_path.is_file() or not samples_path.is_file():
        raise SelfAlignError(f"{eval_dir}: not an evaluation folder (needs config.json and samples.jsonl)")
    config = EvaluateConfig.model_validate_json(config_path.read_text(encoding="utf-8"))
    samples = read_jsonl(samples_path)
    model = load_language_model(judge.model or config.model)
    new_judge = build_judge(judge, model)
    judged = [s for s in samples if s["set"] != "helpful"]
    try:
        verdicts = new_judge.judge(
            [s["prompt"] for s in judged], [s["answer"] for s in judged], [s["source"] for s in judged]
        )
    finally:
        model.close()  # a vLLM engine and its GPU memory
    by_id = {id(s): v for s, v in zip(judged, verdicts)}
    rescored = []
    for sample in samples:
        verdict = by_id.get(id(sample))
        if verdict is None:
            rescored.append(sample)
            continue
        rescored.append(
            {
                **sample,
                "previous_judge_label": sample.get("judge_label"),
                "judge_label": verdict.label,
                "p_harmful": verdict.p_harmful,
                "judge_reason": verdict.reason,
                "judge_raw": verdict.raw,
                "why_abstained": verdict.why_abstained,
                "external_label": sample.get("judge_label"),
            }
        )
    pairwise = {path.stem: read_jsonl(path) for path in sorted((eval_dir / "pairwise").glob("*.jsonl"))}
    metrics = compute_metrics(rescored, pairwise, config.model_copy(update={"judge": judge}))
    metrics["rescored_from"] = config.judge.describe()
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", judge.describe()).strip("-")
    out = eval_dir / f"rescored-{name}"
    write_jsonl_atomic(out / "samples.jsonl", rescored)
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_text_atomic(eval_dir / f"metrics-rescored-{name}.json", json.dumps(metrics, indent=2) + "\n")
    return out, metrics
