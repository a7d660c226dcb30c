"""End to end: the demo run's wall time and peak memory per stage, and how preference-data time grows with prompts.

demo: `selfalign run CONFIG` in a fresh run folder, as a child process. Wall time is measured here; per-stage
seconds, peak resident memory and tokens come from the run's run.json; the whole run's peak is the child's
ru_maxrss (what `/usr/bin/time -v` reports). Baseline: the demo's targets, 15 minutes and 8 GB (ratios > 1 miss).

scaling: the preference-data stage (respond, judge, revise, helpful mix, build: `selfalign.preferences.pipeline`,
the code the pipeline's preferences stage runs) on N prompts for each N, half red-team and half benign/helpful,
from the run config's prompt sets, each N in a fresh folder with the same seed and settings. The model is loaded
once, before any timing, so the times are the stage's work (its load time is printed apart). The judge is the one
`selfalign run` would use: tune-judge's choice (tune-judge runs once first, with the run config's settings) or
`--judge-file`. Baseline: linear growth from the smallest N; the last line is the log-log slope of seconds
against N (1.0 = linear, above 1 = worse than linear).

    python benchmarks/end_to_end.py demo [--config configs/demo.yaml] [key=value ...]
    python benchmarks/end_to_end.py scaling [--sizes 25 50 100 200] [--judge-file J] [key=value ...]

key=value settings apply to the run config, as with `selfalign run`.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from selfalign.pipeline.config import load_run_config
from selfalign.pipeline.engine import format_gb, format_tokens
from selfalign.pipeline.memory import measure_peak_memory

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 15 * 60
TARGET_GB = 8.0


def fresh_folder(out: Path | None, part: str) -> Path:
    """A new, empty folder: a benchmark that found cached stages would time the cache."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    # absolute: the run is a child process in ROOT, which need not be the folder this command was started in
    folder = out.resolve() if out else ROOT / "runs" / "end-to-end" / f"{part}-{stamp}"
    if folder.exists() and any(folder.iterdir()):
        sys.exit(f"{folder} is not empty; give a new --out")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ---- demo: the whole run as a child process ------------------------------------------------------------------


def run_demo(config: str, overrides: list[str], out: Path) -> None:
    command = [sys.executable, "-m", "selfalign", "run", config, f"out={out}", *overrides]
    print("command:", " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=ROOT)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        sys.exit(f"selfalign run failed with exit status {finished.returncode}")
    child_peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kB on Linux
    if sys.platform == "darwin":
        child_peak_kb //= 1024
    manifest = json.loads((out / "run.json").read_text(encoding="utf-8"))

    print(f"\n{'stage':<20} {'ran':<7} {'seconds':>9} {'RSS at start':>13} {'peak RSS':>10}  tokens")
    for name, stage in manifest["stages"].items():
        print(
            f"{name:<20} {'yes' if stage['ran'] else 'cached':<7} {stage.get('seconds', 0):>9.1f} "
            f"{format_gb(stage.get('rss_start_kb')):>13} {format_gb(stage.get('peak_rss_kb')):>10}  "
            f"{format_tokens(stage.get('tokens'))}"
        )
    staged = sum(stage.get("seconds", 0) for stage in manifest["stages"].values())
    peak_gb = child_peak_kb * 1024 / 1e9
    print(f"\nwall time {wall:.1f} s = {wall / 60:.1f} min (stages {staged:.1f} s, the rest is start-up and loading)")
    print(f"peak RSS of the run: {peak_gb:.2f} GB (child ru_maxrss {child_peak_kb} kB; run.json", end=" ")
    print(f"{manifest['peak_rss_kb']} kB)")
    print(f"target: {TARGET_SECONDS / 60:.0f} min, {TARGET_GB:.0f} GB")
    print(f"time_vs_target={wall / TARGET_SECONDS:.2f}")
    print(f"memory_vs_target={peak_gb / TARGET_GB:.2f}")


# ---- scaling: the preference-data stage on more and more prompts -------------------------------------------------


def prompt_sets_for(prompt_sets: list[Any], size: int) -> list[Any]:
    """The run config's prompt sets limited to `size` prompts in all: half (rounded up) red-team, shared evenly by
    the harmful sets, the rest shared evenly by the benign ones."""
    harmful = [s for s in prompt_sets if s.source == "harmful"]
    benign = [s for s in prompt_sets if s.source == "benign"]
    if not harmful or not benign:
        sys.exit("scaling needs at least one harmful and one benign prompt set in preferences.prompts")
    limited = []
    for group, total in ((harmful, (size + 1) // 2), (benign, size // 2)):
        for index, prompt_set in enumerate(group):
            limit = total // len(group) + (index < total % len(group))
            if limit:
                limited.append(prompt_set.model_copy(update={"limit": limit}))
    return limited


def log_log_slope(sizes: list[int], seconds: list[float]) -> float:
    xs, ys = [math.log(n) for n in sizes], [math.log(s) for s in seconds]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def choose_judge(run_config: Any, judge_file: str | None, out: Path, model: Any) -> Any:
    from selfalign.config import load_config
    from selfalign.judging.judge import JudgeConfig

    if judge_file is not None:
        return load_config(JudgeConfig, judge_file), judge_file
    if run_config.tune_judge is None:
        return run_config.judge, "the run config's judge (tune_judge is null)"
    from selfalign.judging.tuning import tune_judge

    started = time.perf_counter()
    tune = run_config.tune_judge.model_copy(update={"model": run_config.model})
    tune_judge(tune, out / "tune-judge", model)
    chosen = load_config(JudgeConfig, out / "tune-judge" / "judge.yaml")
    return chosen, f"tune-judge's choice ({time.perf_counter() - started:.1f} s, {out / 'tune-judge'})"


def run_scaling(config: str, overrides: list[str], sizes: list[int], judge_file: str | None, out: Path) -> None:
    from selfalign.backends.base import GenerationParams
    from selfalign.backends.language_model import load_language_model
    from selfalign.pipeline.stages import count_preference_tokens
    from selfalign.preferences.pipeline import run_preferences
    from selfalign.preferences.stage_files import Models

    run_config = load_run_config(config, overrides)
    started = time.perf_counter()
    model = load_language_model(run_config.model)
    model.answer(["Say hi."], GenerationParams(max_new_tokens=2))  # first-call costs stay out of the first size
    print(f"model {run_config.model.model} loaded and warmed up in {time.perf_counter() - started:.1f} s")
    judge, judge_origin = choose_judge(run_config, judge_file, out, model)
    print(f"judge: {judge.describe()} from {judge_origin}")
    generation = run_config.preferences.generation
    revision = run_config.preferences.revision
    print(
        f"respond max_new_tokens={generation.max_new_tokens}, revise {revision.strategy} x{revision.n_attempts} "
        f"max_new_tokens={revision.generation.max_new_tokens}, batch {run_config.model.batch_size}, "
        f"seed {run_config.seed}\n"
    )

    results = []
    for size in sorted(sizes):
        folder = out / f"preferences-{size}"
        preferences = run_config.preferences.model_copy(
            update={
                "prompts": prompt_sets_for(run_config.preferences.prompts, size),
                "policy": run_config.model,
                "judge": judge,
                "seed": run_config.seed,
                "out_dir": str(folder),
            }
        )
        began = time.perf_counter()
        with measure_peak_memory() as memory:
            dataset = run_preferences(preferences, folder, Models(preferences, policy=model))
        seconds = time.perf_counter() - began
        steps = json.loads((folder / "run.json").read_text(encoding="utf-8"))["stages"]
        tokens = (count_preference_tokens(folder) or {}).get("generated", 0)
        kept = json.loads((dataset / "funnel.json").read_text(encoding="utf-8"))["kept"]
        pairs = f"{sum(kept.values())} pairs kept (" + ", ".join(f"{n} {kind}" for kind, n in kept.items()) + ")"
        results.append((size, seconds))
        print(
            f"prompts={size}: {seconds:.1f} s, {seconds / size:.2f} s/prompt, {tokens} tokens generated "
            f"({tokens / seconds:.0f} tok/s), {pairs}, peak RSS {format_gb(memory.record['peak_rss_kb'])}; "
            + ", ".join(f"{step} {value['seconds']:.1f} s" for step, value in steps.items()),
            flush=True,
        )

    smallest, smallest_seconds = results[0]
    print(f"\nbaseline: linear growth from prompts={smallest} ({smallest_seconds:.1f} s)")
    for size, seconds in results[1:]:
        time_ratio, size_ratio = seconds / smallest_seconds, size / smallest
        print(
            f"prompts={size}: time x{time_ratio:.2f} for size x{size_ratio:.2f} "
            f"(time ratio / size ratio = {time_ratio / size_ratio:.2f}; above 1 is worse than linear)"
        )
    if len(results) > 1:
        print(f"scaling_exponent={log_log_slope(*map(list, zip(*results))):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["demo", "scaling", "both"], help="What to measure.")
    parser.add_argument("overrides", nargs="*", help="key=value settings for the run config.")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="The run config.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200], help="scaling: prompt counts.")
    parser.add_argument("--judge-file", help="scaling: a tune-judge judge.yaml to use instead of running tune-judge.")
    parser.add_argument("--out", type=Path, help="A new folder for the runs (default runs/end-to-end/PART-TIME).")
    args = parser.parse_intermixed_args()
    if any(size < 2 for size in args.sizes):
        parser.error("--sizes: every size needs at least one red-team and one benign prompt (2 or more)")
    if args.part in ("demo", "both"):
        run_demo(args.config, args.overrides, fresh_folder(args.out and args.out / "demo", "demo"))
    if args.part in ("scaling", "both"):
        out = fresh_folder(args.out and args.out / "scaling", "scaling")
        run_scaling(args.config, args.overrides, args.sizes, args.judge_file, out)


if __name__ == "__main__":
    main()
