"""Generation throughput: selfalign's transformers backend against the reference experiment's way of generating.

Baseline (named): a transformers `pipeline("text-generation", batch_size=8)` in its default dtype, prompts in file
order, as the reference experiment's preference notebook ran. Both sides get the same 64 prompts (red-team and
everyday requests of varied length), the same prompt format, greedy decoding, max_new_tokens=128 and the same stop
strings. Useful tokens are tokens up to the stop (not padding, not the stop string). Also prints the model FLOPs
utilisation (MFU) of each against this machine's measured matmul throughput in the dtype each one used.

    python benchmarks/generation.py [--model embedded:gemma-3-270m] [--prompts 64] [--max-new-tokens 128]

Last line: ratio=<backend useful tok/s / baseline useful tok/s>.

With --openai: the openai backend's `generate` against llama.cpp's server (llama-cpp-python, the server's default
threads unless --server-threads) serving the model's GGUF on 127.0.0.1, the same prompts in the `plain` format sent
at each --concurrency level (default 1, 4, 8 requests in flight per server), the levels run in turn in every round,
in reverse order every other round, so that a drift in machine load favours none. Prints useful tok/s per level over
all rounds (useful: tokens of the answer up to the stop, counted with the model's tokenizer), the ratio to the first
level, and how many first-round answers were identical to the first level's. --servers N puts N servers behind the
one backend, as replicas of one engine (on one machine they share its cores).

    python benchmarks/generation.py --openai --prompts 8 --max-new-tokens 48 [--concurrency 1 4 8] [--rounds 2]

Last lines: ratio_c<level>_vs_c1=<useful tok/s at that level / at concurrency 1>.

With --adapter [PATH]: the transformers backend generating through a PEFT LoRA adapter (PATH, or a freshly
initialised r=16 adapter on every projection when no PATH is given), as `selfalign evaluate` runs SFT and DPO
adapters, against the same backend with its contiguous-rows hook on the output projection removed (baseline, named:
PyTorch's own `matmul` path, which with the adapter's frozen base weight copies the output weight once per row at
every prefill). Both sides answer the same prompts in the same batches, greedy; prints tok/s, peak resident memory
and whether the answers are identical.

    python benchmarks/generation.py --adapter [PATH] --prompts 64 --max-new-tokens 48

Last line: ratio=<tok/s with the hook / tok/s without>.

With --greedy-choice [--adapter PATH]: the transformers backend's greedy choice of the next token, each row's first
maximum by `max(dim).indices`, against `argmax` over the same bf16 logits (baseline, named: what the backend did
before), in alternating rounds (--rounds) on the same prompts and batches; prints tok/s of each and whether the
answers are identical (they must be: both take the first maximum).

    python benchmarks/generation.py --greedy-choice --prompts 96 --max-new-tokens 48 [--adapter PATH]

Last line: ratio=<tok/s with max(dim).indices / tok/s with argmax>.

With --continuous [--adapter PATH]: the transformers backend's continuous batching (rows join the running batch as
others finish) against static batches (baseline, named: what the backend did before; the next batch starts when the
last row of one has finished), `--chunk` prompts per `generate` call as `selfalign evaluate`'s chunk_size, in
alternating rounds; prints tok/s of each, how full the decoding steps were and how long the prefills took, and how
many answers are the same (not all: rows share other steps).

    python benchmarks/generation.py --continuous --prompts 901 --max-new-tokens 48 --batch-size 64 [--adapter PATH]

Last line: ratio=<tok/s continuous / tok/s static>.

With --prepacked [--adapter PATH]: the output projection computed from a copy of its bf16 weight laid out once for
oneDNN (what the backend does on CPUs with bf16 units) against `nn.Linear`'s own forward (baseline, named: oneDNN
reorders the 262k x 640 weight at every call), alternating; prints tok/s of each and how many answers are the same.

    python benchmarks/generation.py --prepacked --prompts 256 --max-new-tokens 48 --batch-size 64

With --merge --adapter PATH: the adapter merged into the bf16 weights (as `selfalign evaluate` answers with
`merge_adapters: true`) against PEFT's unmerged LoRA layers (baseline, named), alternating; then the same adapter
unmerged in float32 answers once, and how many answers of each side are identical to its answers is printed (the
fidelity each side pays for its rounding).

    python benchmarks/generation.py --merge --adapter PATH --prompts 256 --max-new-tokens 48 --batch-size 64

With --scoring: judge prompts (the `complies` template over the backend's own answers to the prompts) scored in passes
of at most PREFILL_TOKENS tokens (what the backend does) against passes of --batch-size rows (baseline, named: what
it did before), alternating; prints seconds of each and the largest difference between their scores.

    python benchmarks/generation.py --scoring --prompts 256 --max-new-tokens 48 --batch-size 64

With --grouped-attention: the same judge prompts scored with the backend's attention (`grouped_attention`: grouped
key/value heads read as such under a mask) against transformers' `sdpa` (baseline, named: each key/value head
repeated for its query heads), alternating; prints seconds of each and the largest difference (0: the same values).

    python benchmarks/generation.py --grouped-attention --prompts 256 --max-new-tokens 48 --batch-size 128

Last line (each): ratio=<selfalign's rate / the baseline's>.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from selfalign.backends.base import GenerationParams, truncate_at_stop
from selfalign.backends.transformers_backend import TransformersBackend
from selfalign.data.loading import read_reference_rows
from selfalign.models.formats import get_prompt_format
from selfalign.models.loading import load_model, load_tokenizer


def benchmark_prompts(count: int) -> list[str]:
    """Alternate red-team and everyday requests, so lengths vary within every batch of the baseline."""
    harmful = [row["prompt"] for row in read_reference_rows("builtin:redteam:test")]
    helpful = [row["prompt"] for row in read_reference_rows("builtin:helpful:test")]
    mixed = [prompt for pair in zip(harmful, helpful) for prompt in pair]
    # past the pairs (176), the rest of the red-team test set and the benign-sensitive one: the evaluation's prompts
    rest = harmful[len(helpful) :] + [row["prompt"] for row in read_reference_rows("builtin:benign-sensitive:test")]
    return (mixed + rest)[:count]


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
    if tokenizer.pad_token is None:  # Mistral's and Llama's have none; a batching pipeline needs one
        tokenizer.pad_token = tokenizer.eos_token
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


def gguf_for(model_ref: str) -> Path:
    """The GGUF file llama.cpp serves: the embedded model's, or a .gguf path."""
    from selfalign.models.gguf_cache import embedded_gguf_path
    from selfalign.models.references import resolve_model_reference

    reference = resolve_model_reference(model_ref)
    if reference.kind == "embedded":
        return embedded_gguf_path(reference.location)
    if reference.kind == "gguf":
        return Path(reference.location)
    raise SystemExit(f"--openai serves a GGUF file: give --model embedded:NAME or a .gguf path, not {model_ref}")


def run_openai(args: argparse.Namespace) -> None:
    """The openai backend against llama.cpp's server at several concurrency levels, in the same run."""
    from selfalign.backends.llama_server import llama_server, server_missing
    from selfalign.backends.openai_backend import OpenAIBackend, OpenAIOptions

    if server_missing():
        raise SystemExit(server_missing())
    # The server tokenizes and adds BOS itself, as it does for the pipeline's openai backend.
    prompt_format = get_prompt_format(None, "plain")
    prompts = [prompt_format.render_prompt(p) for p in benchmark_prompts(args.prompts)]
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=0.0, stop=list(prompt_format.stop))
    tokenizer = load_tokenizer(args.model)  # counts useful tokens of the answers: same vocabulary as the GGUF
    server_args = ["--n_ctx", "2048"]
    if args.server_threads is not None:  # else the server's defaults: half the cores to decode, all to prefill
        server_args += ["--n_threads", str(args.server_threads), "--n_threads_batch", str(args.server_threads)]
    print(f"model={args.model} prompts={len(prompts)} max_new_tokens={params.max_new_tokens} stop={params.stop!r}")
    print(f"llama.cpp server (llama-cpp-python) x{args.servers}: {' '.join(server_args)}; "
          f"concurrency per server {args.concurrency}, rounds {args.rounds}")  # fmt: skip

    def backend_at(concurrency: int, urls: list[str]) -> OpenAIBackend:
        options = OpenAIOptions(base_urls=urls, concurrency=concurrency, timeout_s=600.0, show_progress=False,
                                repetition_penalty_field="repeat_penalty")  # fmt: skip
        return OpenAIBackend(args.model, options)  # llama-cpp-python serves its one model under any name

    def useful_tokens(texts: list[str]) -> int:
        return sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)

    runs: dict[int, list[tuple[float, int, int]]] = {level: [] for level in args.concurrency}  # s, useful, generated
    answers: dict[int, list[str]] = {}
    with tempfile.TemporaryDirectory() as logs, contextlib.ExitStack() as stack:
        gguf = gguf_for(args.model)
        servers = [
            stack.enter_context(llama_server(gguf, Path(logs) / f"server-{rank}.log", extra_args=server_args))
            for rank in range(args.servers)
        ]
        urls = [server.url for server in servers]
        backend_at(1, urls).generate(prompts[: len(urls)], params.model_copy(update={"max_new_tokens": 4}))  # warm-up
        for round_index in range(args.rounds):
            # Every other round runs the levels in reverse, so that a drift in machine load favours none of them.
            for level in args.concurrency if round_index % 2 == 0 else reversed(args.concurrency):
                backend = backend_at(level, urls)
                started = time.perf_counter()
                completions = backend.generate(prompts, params)
                seconds = time.perf_counter() - started
                texts = [c.text for c in completions]
                answers.setdefault(level, texts)  # the first round's
                runs[level].append((seconds, useful_tokens(texts), sum(c.completion_tokens for c in completions)))
                print(f"  round {round_index + 1}, concurrency {level}: {runs[level][-1][1]} useful tokens in "
                      f"{seconds:.1f} s = {runs[level][-1][1] / seconds:.1f} tok/s, requests per server "
                      f"{list(backend.last_run.requests.values())}")  # fmt: skip

    reference = args.concurrency[0]
    rates = {}
    for level in args.concurrency:
        seconds, useful, generated = (sum(values) for values in zip(*runs[level]))
        rates[level] = useful / seconds
        same = sum(a == b for a, b in zip(answers[level], answers[reference]))
        print(f"openai backend, concurrency {level} x {args.servers} server(s), {args.rounds} rounds: {useful} useful "
              f"tokens ({generated} generated, stop strings included) in {seconds:.1f} s = {rates[level]:.1f} tok/s; "
              f"first-round answers identical to concurrency {reference}'s: {same}/{len(prompts)}")  # fmt: skip
    for level in args.concurrency[1:]:
        print(f"ratio_c{level}_vs_c{reference}={rates[level] / rates[reference]:.2f}")


def fresh_adapter(model_ref: str, folder: Path) -> Path:
    """A LoRA adapter as `selfalign train` starts one (r=16, every projection), saved without training."""
    from peft import LoraConfig, get_peft_model

    loaded = load_model(model_ref)
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    get_peft_model(loaded.model, LoraConfig(r=16, lora_alpha=16, target_modules=projections)).save_pretrained(folder)
    return folder


def loaded_backend(args: argparse.Namespace) -> tuple[TransformersBackend, list[str], GenerationParams]:
    """The transformers backend as `selfalign evaluate` loads a variant (with --adapter, through it; `fresh`: a new
    r=16 adapter), warmed up, and the rendered prompts and greedy settings to answer them with."""
    from selfalign.backends import transformers_backend
    from selfalign.backends.language_model import ModelConfig

    with tempfile.TemporaryDirectory() as scratch:
        adapter = args.adapter
        if adapter == "fresh":
            adapter = str(fresh_adapter(args.model, Path(scratch)))
        backend = transformers_backend.create_transformers_backend(
            ModelConfig(model=args.model, adapter=adapter, batch_size=args.batch_size)
        )
    backend.show_progress = False
    prompt_format = get_prompt_format(backend.tokenizer)
    prompts = [prompt_format.render_prompt(p) for p in benchmark_prompts(args.prompts)]
    params = GenerationParams(max_new_tokens=args.max_new_tokens, stop=list(prompt_format.stop))
    print(f"model={args.model} adapter={args.adapter} prompts={len(prompts)} batch_size={args.batch_size} "
          f"max_new_tokens={params.max_new_tokens} dtype={next(backend.model.parameters()).dtype}")  # fmt: skip
    backend.generate(prompts[:2], params.model_copy(update={"max_new_tokens": 4}))  # warm-up
    return backend, prompts, params


def measured_generation(
    backend: TransformersBackend, prompts: list[str], params: GenerationParams, label: str, chunk: int | None = None
) -> tuple[float, list[str]]:
    """tok/s of generating the prompts (printed with its peak resident memory), and the answers; `chunk` prompts per
    `generate` call, as a stage's `chunk_size` (default: all in one)."""
    from selfalign.pipeline.engine import format_gb
    from selfalign.pipeline.memory import measure_peak_memory

    chunk = chunk or len(prompts)
    started = time.perf_counter()
    with measure_peak_memory() as memory:
        completions = [
            completion
            for start in range(0, len(prompts), chunk)
            for completion in backend.generate(prompts[start : start + chunk], params)
        ]
    seconds = time.perf_counter() - started
    tokens = sum(c.completion_tokens for c in completions)
    print(f"{label}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s, "
          f"peak resident memory {format_gb(memory.record['peak_rss_kb'])}")  # fmt: skip
    return tokens / seconds, [c.text for c in completions]


def run_adapter(args: argparse.Namespace) -> None:
    """Adapter generation with and without the contiguous-rows hook, in the same run."""
    from selfalign.backends import transformers_backend

    backend, prompts, params = loaded_backend(args)
    ours, our_texts = measured_generation(
        backend, prompts, params, "selfalign backend (contiguous rows into the output projection)"
    )
    getattr(backend.model.get_output_embeddings(), transformers_backend.CONTIGUOUS_ROWS_HOOK).remove()
    baseline, baseline_texts = measured_generation(
        backend, prompts, params, "baseline (hook removed: PyTorch's matmul on the frozen output weight)"
    )
    same = sum(a == b for a, b in zip(our_texts, baseline_texts))
    print(f"identical answers: {same}/{len(prompts)}")
    print(f"ratio={ours / baseline:.2f}")


def compare_in_rounds(
    args: argparse.Namespace, backend: TransformersBackend, prompts: list[str], params: GenerationParams,
    settings: dict[str, Callable[[], contextlib.AbstractContextManager]], chunk: int | None = None,
) -> dict[str, list[str]]:  # fmt: skip
    """Generate under each setting (first: selfalign's; last: the baseline) in alternating rounds on the same prompts;
    print each one's mean tok/s, how many answers the first and the last share, and their ratio; return the answers
    under each setting."""
    rates: dict[str, list[float]] = {label: [] for label in settings}
    answers: dict[str, list[str]] = {}
    for round_number in range(args.rounds):
        for label, setting in settings.items() if round_number % 2 == 0 else reversed(settings.items()):
            with setting():
                rate, answers[label] = measured_generation(backend, prompts, params, label, chunk)
            rates[label].append(rate)
    ours, theirs = list(settings)[0], list(settings)[-1]
    first, baseline = (sum(rates[label]) / len(rates[label]) for label in (ours, theirs))
    same = sum(a == b for a, b in zip(answers[ours], answers[theirs]))
    print(f"mean over {args.rounds} rounds: {first:.1f} against {baseline:.1f} tok/s; identical answers: "
          f"{same}/{len(prompts)}")  # fmt: skip
    print(f"ratio={first / baseline:.2f}")
    return answers


@contextlib.contextmanager
def replaced(owner: object, name: str, value: object) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def run_greedy_choice(args: argparse.Namespace) -> None:
    """The greedy choice block by block against argmax and against max(dim).indices (the choice before; the
    baseline the ratio is taken against), alternating, in the same run."""
    from selfalign.backends import transformers_backend

    backend, prompts, params = loaded_backend(args)
    compare_in_rounds(args, backend, prompts, params, {
        "selfalign backend (first maximum block by block)": contextlib.nullcontext,
        "argmax": lambda: replaced(transformers_backend, "_first_max", lambda scores: scores.argmax(dim=-1)),
        "baseline (max(dim).indices)": lambda: replaced(transformers_backend, "_first_max",
                                                         lambda scores: scores.max(dim=-1).indices),
    })  # fmt: skip


def run_cache_rows(args: argparse.Namespace) -> None:
    """Finished rows leaving the KV cache by index_select against the cache's own batch_select_indices (advanced
    indexing), alternating, in the same run."""
    from selfalign.backends import transformers_backend

    backend, prompts, params = loaded_backend(args)
    compare_in_rounds(args, backend, prompts, params, {
        "selfalign backend (rows kept by index_select)": contextlib.nullcontext,
        "baseline (DynamicCache.batch_select_indices)": lambda: replaced(
            transformers_backend, "_select_cache_rows", lambda cache, rows: cache.batch_select_indices(rows)),
    }, chunk=args.chunk)  # fmt: skip


def run_continuous(args: argparse.Namespace) -> None:
    """Continuous batching against static batches (rows join only an empty batch), alternating, in the same run."""
    backend, prompts, params = loaded_backend(args)

    @contextlib.contextmanager
    def static_batches() -> Iterator[None]:
        with replaced(backend, "_takes_more", lambda batch, *rest: batch is None), occupancy(backend, "static"):
            yield

    compare_in_rounds(args, backend, prompts, params, {
        f"selfalign backend (continuous batching, chunks of {args.chunk})": lambda: occupancy(backend, "continuous"),
        f"baseline (static batches: the next starts when the last row of one finishes, chunks of {args.chunk})":
            static_batches,
    }, chunk=args.chunk)  # fmt: skip


def run_prepacked(args: argparse.Namespace) -> None:
    """The output projection from its prepacked weight against a plain bf16 linear, alternating, in the same run."""
    backend, prompts, params = loaded_backend(args)
    projection = backend.model.get_output_embeddings()
    compare_in_rounds(args, backend, prompts, params, {
        "selfalign backend (output projection from its prepacked weight)": contextlib.nullcontext,
        "baseline (plain bf16 linear, oneDNN reorders the weight at every call)":
            lambda: replaced(projection, "forward", torch.nn.Linear.forward.__get__(projection)),
    }, chunk=args.chunk)  # fmt: skip


def run_merge(args: argparse.Namespace) -> None:
    """An adapter merged into the bf16 weights (as `selfalign evaluate` answers; first) against PEFT's unmerged LoRA
    layers (the baseline), alternating, in the same run; then how many answers of each match float32's."""
    from selfalign.backends import transformers_backend
    from selfalign.backends.language_model import ModelConfig

    if args.adapter in (None, "fresh"):
        raise SystemExit("--merge needs --adapter PATH, a trained adapter (a fresh one adds zero)")
    backend, prompts, params = loaded_backend(args)
    merged = transformers_backend.create_transformers_backend(
        ModelConfig(model=args.model, adapter=args.adapter, batch_size=args.batch_size)
    )
    merged.merge_adapter()
    answers = compare_in_rounds(args, backend, prompts, params, {
        "merged": lambda: replaced(backend, "model", merged.model),
        "unmerged": contextlib.nullcontext,
    }, chunk=args.chunk)  # fmt: skip
    # Fidelity: the same adapter unmerged in float32, which neither bf16 model rounds
    reference = transformers_backend.create_transformers_backend(
        ModelConfig(model=args.model, adapter=args.adapter, batch_size=args.batch_size, dtype="float32")
    )
    reference.show_progress = False
    _, truth = measured_generation(reference, prompts, params, "float32 reference (unmerged)", args.chunk)
    for label, texts in answers.items():
        print(f"{label}: {sum(a == b for a, b in zip(texts, truth))}/{len(prompts)} answers identical to float32's")


def run_scoring(args: argparse.Namespace) -> None:
    """Judge prompts (the `complies` template over the backend's own answers) scored in passes of at most
    PREFILL_TOKENS tokens against passes of batch_size rows (--scoring), with log-probabilities normalised by a
    logsumexp a few positions at a time against a whole log_softmax (--normalising), or with grouped key/value heads
    against repeated ones (--grouped-attention), alternating, in the same run."""
    from selfalign.backends import transformers_backend
    from selfalign.backends.language_model import LanguageModel, ModelConfig
    from selfalign.judging.judge import render_judge_prompts
    from selfalign.judging.templates import load_template

    backend, prompts, params = loaded_backend(args)
    judge = LanguageModel(ModelConfig(model=args.model), backend, get_prompt_format(backend.tokenizer))
    answers = [c.text for c in backend.generate(prompts, params)]
    template = load_template("complies")
    texts = [judge.render(text, template.response_prefix)
             for text in render_judge_prompts(template, benchmark_prompts(args.prompts), answers)]  # fmt: skip
    if args.grouped_attention:
        settings = {
            "selfalign backend (grouped key/value heads read as such)": contextlib.nullcontext,
            "baseline (transformers' sdpa: key/value heads repeated)": lambda: attention(backend.model, "sdpa"),
        }  # fmt: skip
    elif args.normalising:
        settings = {
            "selfalign backend (logsumexp a few positions at a time)": contextlib.nullcontext,
            "baseline (log_softmax over all the kept logits)": lambda: replaced(
                transformers_backend, "_summed_log_probs", summed_log_probs_by_log_softmax),
        }  # fmt: skip
    else:
        settings = {
            f"selfalign backend (at most {transformers_backend.PREFILL_TOKENS} tokens a pass)": contextlib.nullcontext,
            f"baseline ({args.batch_size} rows a pass)": lambda: replaced(
                transformers_backend, "PREFILL_TOKENS", 10**9
            ),
        }
    seconds: dict[str, list[float]] = {label: [] for label in settings}
    scores: dict[str, list[float]] = {}
    for round_number in range(args.rounds):
        for label, setting in settings.items() if round_number % 2 == 0 else reversed(settings.items()):
            with setting():
                started = time.perf_counter()
                scores[label] = backend.score(texts, [" 1"] * len(texts))
                seconds[label].append(time.perf_counter() - started)
            print(f"{label}: {len(texts)} judge prompts in {seconds[label][-1]:.1f} s")
    ours, baseline = (sum(values) / len(values) for values in seconds.values())
    largest = max(abs(a - b) for a, b in zip(*scores.values()))
    print(f"mean over {args.rounds} rounds: {ours:.1f} against {baseline:.1f} s; largest score difference "
          f"{largest:.3g}")  # fmt: skip
    print(f"ratio={baseline / ours:.2f}")


@contextlib.contextmanager
def attention(model: torch.nn.Module, implementation: str) -> Iterator[None]:
    """The model attending with another of transformers' attention implementations for a while."""
    own = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(own)


def summed_log_probs_by_log_softmax(logits, targets: list[list[list[int]]]) -> list[list[float]]:
    """`_summed_log_probs` as it was before 2026-12-03: a float32 log_softmax over every kept logit, then a gather."""
    import torch

    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return [[float(log_probs[row, logits.shape[1] - len(target) :, :].gather(-1, torch.tensor(target)[:, None]).sum())
             for target in row_targets] for row, row_targets in enumerate(targets)]  # fmt: skip


@contextlib.contextmanager
def occupancy(backend: TransformersBackend, label: str) -> Iterator[None]:
    """Print, after the block, how full the decoding steps were and how long the prefills took."""
    steps, rows, prefill_seconds, prefills = 0, 0, 0.0, 0
    decode_step, prefill = backend._decode_step, backend._prefill

    def counted_step(batch, *rest):
        nonlocal steps, rows
        steps, rows = steps + 1, rows + batch.size
        return decode_step(batch, *rest)

    def timed_prefill(*arguments, **keywords):
        nonlocal prefill_seconds, prefills
        started = time.perf_counter()
        try:
            return prefill(*arguments, **keywords)
        finally:
            prefill_seconds, prefills = prefill_seconds + time.perf_counter() - started, prefills + 1

    with replaced(backend, "_decode_step", counted_step), replaced(backend, "_prefill", timed_prefill):
        yield
    print(f"  {label}: {steps} decoding steps, {rows / max(steps, 1):.1f} rows a step on average (batch "
          f"{backend.batch_size}); {prefills} prefills, {prefill_seconds:.1f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:gemma-3-270m")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--openai", action="store_true", help="The openai backend against llama.cpp's server.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8], help="With --openai: levels.")
    parser.add_argument("--rounds", type=int, default=2, help="Runs of each side (all but --adapter and the default).")
    parser.add_argument("--servers", type=int, default=1, help="With --openai: server replicas.")
    parser.add_argument("--server-threads", type=int, help="With --openai: --n_threads of each server.")
    parser.add_argument("--adapter", nargs="?", const="fresh", help="Adapter generation, with and without the hook.")
    parser.add_argument("--greedy-choice", action="store_true", help="max(dim).indices against argmax.")
    parser.add_argument("--continuous", action="store_true", help="Continuous batching against static batches.")
    parser.add_argument("--chunk", type=int, default=256, help="Prompts per generate call (--continuous, ...).")
    parser.add_argument("--prepacked", action="store_true", help="Prepacked output projection against plain.")
    parser.add_argument("--merge", action="store_true", help="With --adapter PATH: merged against unmerged LoRA.")
    parser.add_argument("--scoring", action="store_true", help="Token-capped scoring passes against row-capped.")
    parser.add_argument(
        "--normalising",
        action="store_true",
        help="Scoring with logsumexp a few positions at a time against a whole log_softmax.",
    )
    parser.add_argument("--cache-rows", action="store_true", help="Rows leaving the KV cache by index_select.")
    parser.add_argument(
        "--grouped-attention", action="store_true", help="Scoring with grouped key/value heads against repeated ones."
    )
    args = parser.parse_args()
    modes = (
        ("prepacked", run_prepacked), ("merge", run_merge), ("scoring", run_scoring), ("normalising", run_scoring),
        ("grouped_attention", run_scoring),
        ("continuous", run_continuous), ("greedy_choice", run_greedy_choice), ("cache_rows", run_cache_rows),
        ("adapter", run_adapter),
    )  # fmt: skip
    for flag, run in modes:  # --adapter last: the other modes take it as their model's adapter
        if getattr(args, flag):
            run(args)
            return
    if args.openai:
        # SIGTERM (`timeout`, a CI limit) must unwind too, so that the servers this run started are stopped.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        run_openai(args)
        return

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
