"""Training throughput: tokens/s of SFT and DPO steps, and DPO with and without precomputed reference log-probs.

Every run trains a fresh LoRA adapter with the reference hyperparameters (cpu-small preset: no activation
checkpointing) for one epoch at batch 4 on the same preference pairs, no eval split, through `run_sft`/`run_dpo`,
the code `selfalign train` runs. Tokens are the non-padding tokens fed to the model (TRL's `num_tokens`: prompt +
answer for SFT, prompt + chosen and prompt + rejected for DPO). The reference log-probabilities are computed in a
pass over the data before the first step when precomputed, so DPO is compared on its total time: that pass plus
the steps (the setup between building the trainer and the first step is timed in both runs). Each run starts with
the heap's free pages handed back to the system, as the pipeline hands them back between stages.

    python benchmarks/training.py [--model embedded:gemma-3-270m] [--data examples/preferences.jsonl]

Last line: dpo_precompute_speedup=<DPO total time without precompute / with precompute>.

    python benchmarks/training.py --speedups [--data ...] [--repeats 2]

TRL's path as selfalign ran it before these settings existed (the baseline: fp32, the LM head projected at every
position and again in the backward, the DPO reference computed every step) against the settings selfalign now uses
on CPU (training/cpu_speed.py: the answer positions only, projected once; the reference precomputed; products with
frozen weights in bf16 where the CPU has AMX or AVX-512 BF16; SFT's LoRA dropout masks from random bits), and the
fp32 part of those alone, each a fresh adapter on the same pairs, alternating the settings `--repeats` times; the
fastest run of each is kept (the least disturbed by a shared machine). Losses per step must agree: to 1e-3 for the
fp32 paths (the same computation up to summation order), within 2% where bf16 products round and SFT's dropout
draws other masks (LOSS_TOLERANCE_BF16). Last lines: sft_speedup= and
dpo_speedup=, baseline total time / selfalign's total time (DPO's precompute pass included).

    python benchmarks/training.py --fingerprint [--model ...]

What `datasets` pays to fingerprint each of TRL's tokenizing `map` calls: hashing the tokenizer as transformers loads
it (the baseline) and as selfalign loads it (`models.loading.tokenizer_from_pretrained`, without the Python copies
of the vocabulary and merges); best of 3 each. Last line: tokenizer_fingerprint_speedup=<baseline / selfalign>.

    python benchmarks/training.py --compare-allocator [--data ...]

DPO (reference computed every step) in two fresh processes, one with glibc's default allocator settings (the
baseline) and one with the settings `selfalign` sets at start (`keep_large_blocks_for_reuse`); allocator settings
hold for a whole process, hence the two children. Last line: dpo_allocator_speedup=<baseline steps / reuse steps>.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from selfalign.allocator import keep_large_blocks_for_reuse, release_free_memory
from selfalign.training.config import load_training_config
from selfalign.training.dpo import run_dpo
from selfalign.training.sft import run_sft

ROOT = Path(__file__).resolve().parents[1]


class SetupTimer(TrainerCallback):
    """Seconds from the end of the trainer's construction to its first step: DPO's precompute pass runs there."""

    def on_init_end(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.started


def run(stage: str, config, data: str, out: Path) -> dict:
    # Each run starts from the heap a pipeline stage starts from, the free pages of the runs before it handed back to
    # the system (the pipeline does this between stages). Inheriting them, DPO's fast path, which runs after TRL's,
    # found more than FREE_HEAP_LIMIT free after its first steps, handed it back and took it again by page faults.
    release_free_memory()
    timer = SetupTimer()
    train = (run_sft if stage == "sft" else run_dpo)(config, data, out, callbacks=[timer]).metrics["train"]
    return {**train, "setup_s": timer.seconds, "total_s": timer.seconds + train["runtime_s"]}


def describe(label: str, result: dict) -> str:
    rate = result["tokens"] / result["runtime_s"]
    total_rate = result["tokens"] / result["total_s"]
    return (
        f"{label}: {result['steps']} steps, {result['tokens']:.0f} tokens in {result['runtime_s']:.1f} s = "
        f"{rate:.1f} tok/s ({result['runtime_s'] / result['steps']:.2f} s/step); setup before the first step "
        f"{result['setup_s']:.1f} s; total {result['total_s']:.1f} s = {total_rate:.1f} tok/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:gemma-3-270m")
    parser.add_argument("--data", default=str(ROOT / "examples" / "preferences.jsonl"))
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument(
        "--allocator", choices=["reuse", "default"], default="reuse", help="glibc settings: selfalign's or glibc's."
    )
    parser.add_argument("--compare-allocator", action="store_true", help="DPO under both allocator settings.")
    parser.add_argument("--speedups", action="store_true", help="TRL's previous path against selfalign's CPU path.")
    parser.add_argument("--repeats", type=int, default=2, help="With --speedups: runs of each setting (fastest kept).")
    parser.add_argument("--fingerprint", action="store_true", help="datasets' hash of the tokenizer, both loads.")
    parser.add_argument("--dpo-only", action="store_true", help=argparse.SUPPRESS)  # one child of --compare-allocator
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.allocator == "reuse":
        keep_large_blocks_for_reuse()
    if args.compare_allocator:
        compare_allocators(args)
        return
    if args.fingerprint:
        compare_fingerprints(args.model)
        return

    base = ["eval_fraction=0", "save_steps=100000", "progress_bar=false", f"max_length={args.max_length}"]
    if args.speedups:
        compare_speedups(args, base)
        return
    config = load_training_config(None, base, preset="cpu-small")
    config.model = args.model
    precomputed = config.model_copy(deep=True)
    precomputed.dpo.precompute_ref_log_probs = True
    print(
        f"model={args.model} data={args.data} batch={config.batch_size} max_length={config.max_length} "
        f"epochs={config.epochs} lora_r={config.lora.r} torch threads={torch.get_num_threads()}"
    )
    if args.dpo_only:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(run("dpo", config, args.data, Path(folder) / "dpo")))
        return
    with tempfile.TemporaryDirectory() as folder:
        sft = run("sft", config, args.data, Path(folder) / "sft")
        dpo = run("dpo", config, args.data, Path(folder) / "dpo")
        dpo_pre = run("dpo", precomputed, args.data, Path(folder) / "dpo-precomputed")
    print(describe("SFT", sft))
    print(describe("DPO, reference (adapter disabled) computed every step", dpo))
    print(describe("DPO, reference log-probs precomputed", dpo_pre))
    print(f"dpo_step_speedup={dpo['runtime_s'] / dpo_pre['runtime_s']:.2f} (steps only, precompute pass left out)")
    print(f"dpo_precompute_speedup={dpo['total_s'] / dpo_pre['total_s']:.2f}")


# stage -> (label, overrides) of the baseline, of the fp32 part of the fast path alone, and of the fast path (what
# TrainingConfig defaults to on this machine)
SPEEDUP_SETTINGS = {
    "sft": [
        ("TRL's path (LM head at every position, fp32)",
         ["lm_head_answer_only=false", "bf16_matmuls=false", "lora_dropout_from_random_bits=false"]),
        ("LM head at answer positions, projected once, fp32",
         ["lm_head_answer_only=true", "bf16_matmuls=false", "lora_dropout_from_random_bits=false"]),
        ("selfalign's CPU path (that, frozen weights multiplied in bf16 where the CPU has bf16 units, and LoRA's "
         "dropout masks from random bits)",
         ["lm_head_answer_only=true", "bf16_matmuls=auto", "lora_dropout_from_random_bits=true"]),
    ],
    "dpo": [
        ("TRL's path (LM head at every position, reference every step, fp32)",
         ["lm_head_answer_only=false", "dpo.precompute_ref_log_probs=false", "bf16_matmuls=false"]),
        ("LM head at answer positions, projected once, reference precomputed, fp32",
         ["lm_head_answer_only=true", "dpo.precompute_ref_log_probs=true", "bf16_matmuls=false"]),
        ("selfalign's CPU path (that, and frozen weights multiplied in bf16 where the CPU has bf16 units)",
         ["lm_head_answer_only=true", "dpo.precompute_ref_log_probs=true", "bf16_matmuls=auto"]),
    ],
}  # fmt: skip
# Per logged step. fp32 sums in another order differ around 1e-6, so the fp32 paths must agree to 1e-3 absolute.
# bf16 rounds each product's inputs and result to 8 significant bits (relative error < 2^-8 each); the loss, a
# function of thousands of them, must stay within 2% of fp32's: about a fifth of what one DPO step moves it here.
LOSS_TOLERANCE = 1e-3
LOSS_TOLERANCE_BF16 = 0.02  # relative


def compare_speedups(args: argparse.Namespace, base: list[str]) -> None:
    from selfalign.training.common import bf16_matmuls

    speedups = {}
    for stage, settings in SPEEDUP_SETTINGS.items():
        results: dict[str, list[dict]] = {label: [] for label, _ in settings}
        bf16: dict[str, bool] = {}
        for _ in range(args.repeats):
            for label, overrides in settings:  # alternating, so that a slow spell of the machine hits all alike
                config = load_training_config(None, [*base, *overrides], preset="cpu-small")
                config.model = args.model
                bf16[label] = bf16_matmuls(config)
                with tempfile.TemporaryDirectory() as folder:
                    results[label].append(run(stage, config, args.data, Path(folder) / stage))
        fastest = {}
        for label, runs in results.items():
            fastest[label] = min(runs, key=lambda result: result["total_s"])
            print(describe(f"{stage.upper()}, {label}", fastest[label]), flush=True)
        baseline_label = settings[0][0]
        baseline = fastest[baseline_label]
        for label, _ in settings[1:]:
            losses = [(a["loss"], b["loss"]) for a, b in zip(baseline["per_step"], fastest[label]["per_step"])]
            worst = max(abs(a - b) for a, b in losses)
            worst_relative = max(abs(a - b) / abs(a) for a, b in losses)
            if bf16[label] and worst_relative > LOSS_TOLERANCE_BF16:
                sys.exit(f"{stage}, {label}: per-step losses differ from fp32's by up to {worst_relative:.1%} "
                         f"(> {LOSS_TOLERANCE_BF16:.0%})")  # fmt: skip
            if not bf16[label] and worst > LOSS_TOLERANCE:
                sys.exit(f"{stage}, {label}: per-step losses differ by up to {worst:.2e} (> {LOSS_TOLERANCE}): "
                         "not one computation")  # fmt: skip
            speedup = baseline["total_s"] / fastest[label]["total_s"]
            print(f"{stage}, {label}: {speedup:.2f}x TRL's path; bf16 products {'on' if bf16[label] else 'off'}; "
                  f"per-step losses within {worst:.1e} ({worst_relative:.2%}) of TRL's over {len(losses)} steps: "
                  f"{[round(b, 4) for _, b in losses]} against {[round(a, 4) for a, _ in losses]}")  # fmt: skip
            speedups[stage] = speedup  # the last setting is selfalign's path
        spread = {label: [round(r["total_s"], 1) for r in runs] for label, runs in results.items()}
        print(f"{stage}: total seconds of each run: {spread}", flush=True)
    print(f"sft_speedup={speedups['sft']:.2f}")
    print(f"dpo_speedup={speedups['dpo']:.2f}")


def compare_fingerprints(model: str) -> None:
    from datasets.fingerprint import Hasher
    from transformers import AutoTokenizer

    from selfalign.models.loading import local_folder_for, tokenizer_from_pretrained
    from selfalign.models.references import resolve_model_reference

    folder = local_folder_for(resolve_model_reference(model))
    best = {}
    for label, load in (("as transformers loads it", AutoTokenizer.from_pretrained),
                        ("as selfalign loads it", tokenizer_from_pretrained)):  # fmt: skip
        started = time.perf_counter()
        tokenizer = load(folder)
        loaded = time.perf_counter() - started
        seconds = []
        for _ in range(3):
            started = time.perf_counter()
            Hasher.hash({"processing_class": tokenizer})  # what TRL's map passes in fn_kwargs
            seconds.append(time.perf_counter() - started)
        best[label] = min(seconds)
        print(f"tokenizer {label}: loaded in {loaded:.1f} s; datasets' fingerprint {best[label]:.2f} s "
              f"(best of {', '.join(f'{x:.2f}' for x in seconds)})", flush=True)  # fmt: skip
    print(f"tokenizer_fingerprint_speedup={best['as transformers loads it'] / best['as selfalign loads it']:.1f}")


def compare_allocators(args: argparse.Namespace) -> None:
    results = {}
    for allocator in ("default", "reuse"):
        command = [sys.executable, __file__, "--dpo-only", "--allocator", allocator, "--model", args.model,
                   "--data", args.data, "--max-length", str(args.max_length)]  # fmt: skip
        finished = subprocess.run(command, capture_output=True, text=True, check=True)
        results[allocator] = json.loads(finished.stdout.strip().splitlines()[-1])
        print(describe(f"DPO, glibc allocator settings: {allocator}", results[allocator]), flush=True)
    speedup = results["default"]["runtime_s"] / results["reuse"]["runtime_s"]
    print(f"dpo_allocator_speedup={speedup:.2f} (steps only)")


if __name__ == "__main__":
    main()
