"""Generation throughput: selfalign's transformers backend against the reference experiment's way of generating.

Baseline (named): a transformers `pipeline("text-generation", batch_size=8)` in its default dtype, prompts in file
order, as the reference experiment's preference notebook ran. Both sides get the same 64 prompts (red-team and
everyday requests of varied length), the same prompt format, greedy decoding, max_new_tokens=128 and the same stop
strings. Useful tokens are tokens up to the stop (not padding, not the stop string). Also prints the model FLOPs
utilisation (MFU) of each against this machine's measured matmul throughput in the dtype each one used.

    python benchmarks/generation.py [--model embedded:gemma-3-270m] [--prompts 64] [--max-new-tokens 128]

Last line: ratio=<backend useful tok/s / baseline useful tok/s>.
"""

from __future__ import annotations

import argparse
import time

import torch

from selfalign.backends.base import GenerationParams, truncate_at_stop
from selfalign.backends.transformers_backend import TransformersBackend
from selfalign.data.loading import read_reference_rows
from selfalign.models.formats import get_prompt_format
from selfalign.models.loading import load_model


def benchmark_prompts(count: int) -> list[str]:
    """Alternate red-team and everyday requests, so lengths vary within every batch of the baseline."""
    harmful = [row["prompt"] for row in read_reference_rows("builtin:redteam:test")]
    helpful = [row["prompt"] for row in read_reference_rows("builtin:helpful:test")]
    mixed = [prompt for pair in zip(harmful, helpful) for prompt in pair]
    return mixed[:count]


def matmul_peak_gflops(dtype: torch.dtype, size: int = 2048, seconds: float = 2.0) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - started) / 1e9


def run_baseline(model_ref: str, prompts: list[str], params: GenerationParams) -> tuple[float, int, torch.dtype]:
    """The reference's way: pipeline, batch_size=8, default dtype, file order."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from selfalign.models.loading import local_folder_for
    from selfalign.models.references import resolve_model_reference

    folder = local_folder_for(resolve_model_reference(model_ref))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder)  # default dtype, as the reference
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, batch_size=8)
    started = time.perf_counter()
    outputs = generator(
        prompts,
        max_new_tokens=params.max_new_tokens,
        do_sample=False,
        stop_strings=params.stop,
        tokenizer=tokenizer,
        return_full_text=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    seconds = time.perf_counter() - started
    useful = 0
    for output in outputs:
        text, _ = truncate_at_stop(output[0]["generated_text"], params.stop)
        useful += len(tokenizer(text.rstrip(), add_special_tokens=False)["input_ids"])
    return seconds, useful, model.dtype


def run_backend(model_ref: str, prompts: list[str], params: GenerationParams, batch_size: int):
    loaded = load_model(model_ref)  # dtype auto: bf16 where the CPU has bf16 units
    backend = TransformersBackend(loaded.model, loaded.tokenizer, batch_size=batch_size, show_progress=False)
    backend.generate(prompts[:2], params.model_copy(update={"max_new_tokens": 4}))  # warm-up, as the baseline's
    started = time.perf_counter()
    completions = backend.generate(prompts, params)
    seconds = time.perf_counter() - started
    n_parameters = sum(p.numel() for p in loaded.model.parameters())
    return seconds, sum(c.completion_tokens for c in completions), loaded.model.dtype, n_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:gemma-3-270m")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    loaded = load_model(args.model, dtype="float32")
    prompt_format = get_prompt_format(loaded.tokenizer)
    del loaded
    prompts = [prompt_format.render_prompt(p) for p in benchmark_prompts(args.prompts)]
    params = GenerationParams(max_new_tokens=args.max_new_tokens, stop=list(prompt_format.stop))
    print(f"model={args.model} prompts={len(prompts)} max_new_tokens={params.max_new_tokens} stop={params.stop!r}")
    print(f"torch threads={torch.get_num_threads()}")

    (
        base_seconds,
        base_tokens,
        base_dtype,
    ) = run_baseline(args.model, prompts, params)
    base_rate = base_tokens / base_seconds
    print(
        f"baseline pipeline(batch_size=8, {base_dtype}): {base_tokens} useful tokens in {base_seconds:.1f} s = "
        f"{base_rate:.1f} tok/s"
    )
    ours_seconds, ours_tokens, ours_dtype, n_parameters = run_backend(args.model, prompts, params, args.batch_size)
    ours_rate = ours_tokens / ours_seconds
    print(
        f"selfalign backend(batch_size={args.batch_size}, {ours_dtype}): {ours_tokens} useful tokens in "
        f"{ours_seconds:.1f} s = {ours_rate:.1f} tok/s"
    )

    flops_per_token = 2 * n_parameters
    for label, rate, dtype in (("baseline", base_rate, base_dtype), ("selfalign", ours_rate, ours_dtype)):
        peak = matmul_peak_gflops(dtype)
        mfu = rate * flops_per_token / 1e9 / peak
        print(
            f"{label}: matmul peak {peak:,.0f} GFLOP/s in {dtype}; MFU {100 * mfu:.2f}% "
            f"({rate * flops_per_token / 1e9:.1f} GFLOP/s at {flops_per_token / 1e9:.2f} GFLOP/token)"
        )
    print(f"ratio={ours_rate / base_rate:.2f}")


if __name__ == "__main__":
    main()
