"""The vLLM backend: its own logic against a stand-in engine (any machine), and the real vLLM where CUDA is.

The stand-in (tests/backends/fake_vllm) has vLLM's offline API shape; it checks tokenization, token counting,
stop strings, seeds, score summation, LoRA requests and data-parallel splitting without a GPU. The real-engine tests
compare with the transformers backend on the embedded model and record throughput on the same prompts.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import json
import multiprocessing
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
from pydantic import ValidationError

from selfalign.backends.base import BACKENDS, GenerationParams
from selfalign.backends.language_model import ModelConfig
from selfalign.backends.vllm_backend import VLLMOptions, create_vllm_backend, device_groups, split_evenly
from selfalign.errors import SelfAlignError
from selfalign.models.loading import load_tokenizer

FAKE_VLLM = Path(__file__).parent / "fake_vllm"
PROMPTS = ["Question: What is the capital of France?\nAnswer:", "Hi", "0 1 2", "How do I kill a Python process?", "x"]


def forget_vllm() -> None:
    for name in [name for name in sys.modules if name == "vllm" or name.startswith("vllm.")]:
        del sys.modules[name]


@functools.cache
def real_vllm_arguments() -> str | None:
    """The keyword arguments the installed vLLM's LLM takes (its named parameters and EngineArgs' fields)."""
    if importlib.util.find_spec("vllm") is None:
        return None
    import vllm

    names = {name for name in inspect.signature(vllm.LLM.__init__).parameters if name not in ("self", "kwargs")}
    names |= {field_.name for field_ in dataclasses.fields(vllm.EngineArgs)}
    forget_vllm()
    return ",".join(sorted(names))


@pytest.fixture
def fake_vllm(monkeypatch):
    forget_vllm()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    real = real_vllm_arguments()  # before the stand-in shadows it
    if real:
        monkeypatch.setenv("SELFALIGN_REAL_VLLM_LLM_ARGUMENTS", real)  # the stand-in checks these instead of its list
    monkeypatch.syspath_prepend(str(FAKE_VLLM))  # spawned data-parallel workers inherit sys.path too
    import vllm

    vllm.CONSTRUCTED.clear()
    vllm.SCORED.clear()
    yield vllm
    forget_vllm()


def make_adapter(folder: Path, rank: int) -> str:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def vllm_backend(model_dir, **options):
    config = ModelConfig(model=str(model_dir), backend="vllm", options={"show_progress": False, **options})
    return BACKENDS.create("vllm", config)


def words(text: str) -> list[str]:
    return text.split()


def field(text: str, name: str) -> str:
    """The word after `name` in the stand-in's answer."""
    return words(text)[words(text).index(name) + 1]


# ---- the backend's own logic, on the stand-in engine ------------------------------------------------------------


def test_engine_arguments_come_from_the_config(fake_vllm, tiny_model_dir):
    config = ModelConfig(
        model=str(tiny_model_dir),
        backend="vllm",
        dtype="bfloat16",
        options={"tensor_parallel_size": 2, "max_model_len": 512, "engine_args": {"max_num_batched_tokens": 4096}},
    )
    BACKENDS.create("vllm", config)
    assert fake_vllm.CONSTRUCTED[-1] == {
        "model": str(tiny_model_dir.resolve()), "tensor_parallel_size": 2, "dtype": "bfloat16", "seed": 0,
        "gpu_memory_utilization": 0.9, "enforce_eager": False, "trust_remote_code": False,
        "enable_prefix_caching": False, "max_model_len": 512, "max_num_batched_tokens": 4096,
    }  # fmt: skip


def test_the_stand_in_takes_only_what_vllm_llm_takes(fake_vllm, tiny_model_dir):
    # swap_space was an EngineArgs field once; vLLM 0.32 has none, and an unknown argument is a TypeError there
    with pytest.raises(TypeError, match="unexpected keyword argument 'swap_space'"):
        vllm_backend(tiny_model_dir, engine_args={"swap_space": 4})
    with pytest.raises(ValueError, match="not supported for single-process usage"):
        fake_vllm.LLM("m", data_parallel_size=2)  # vLLM's offline LLM: data parallelism is ours to do
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        fake_vllm.LLM("m").generate([{"prompt_token_ids": [1]}], fake_vllm.SamplingParams(),
                                    lora_request=fake_vllm.lora.request.LoRARequest("a", 1, "/a"))  # fmt: skip


def test_unknown_options_are_errors(tiny_model_dir):
    with pytest.raises(ValidationError, match="tensor_paralel_size: unknown option"):
        vllm_backend(tiny_model_dir, tensor_paralel_size=2)


def test_generation_tokenizes_once_counts_tokens_without_eos_and_keeps_order(fake_vllm, tiny_model_dir, tokenizer):
    completions = vllm_backend(tiny_model_dir).generate(PROMPTS, GenerationParams(max_new_tokens=32))
    for prompt, completion in zip(PROMPTS, completions):
        length = len(tokenizer(prompt)["input_ids"])  # BOS included, once
        assert words(completion.text) == ["gpu", "adapter", "none", "seed", "None", "len", str(length)]
        assert completion.prompt_tokens == length
        assert completion.completion_tokens == 7  # the EOS token is not counted
        assert completion.finish_reason == "stop"
    short = vllm_backend(tiny_model_dir).generate(PROMPTS[:1], GenerationParams(max_new_tokens=3))[0]
    assert short.finish_reason == "length" and short.completion_tokens == 3


def test_stop_strings_and_per_item_seeds(fake_vllm, tiny_model_dir, tokenizer):
    backend = vllm_backend(tiny_model_dir)
    stopped = backend.generate(PROMPTS[:2], GenerationParams(stop=["seed"]))
    assert [words(c.text) for c in stopped] == [["gpu", "adapter", "none"]] * 2
    assert stopped[0].completion_tokens == min(
        4, len(tokenizer(" gpu  adapter none ", add_special_tokens=False)["input_ids"])
    )
    sampled = backend.generate(PROMPTS[:3], GenerationParams(temperature=0.8, seed=10))
    assert [field(c.text, "seed") for c in sampled] == ["10", "11", "12"]  # seed + item index, whatever the split
    with pytest.raises(SelfAlignError, match="no_repeat_ngram_size is transformers-only"):
        backend.generate(PROMPTS[:1], GenerationParams(no_repeat_ngram_size=4))


def test_score_sums_prompt_log_probabilities_of_the_continuation(fake_vllm, tiny_model_dir, tokenizer):
    prompts, continuations = [PROMPTS[0], PROMPTS[1]], [" Paris", " 1 2"]
    scores = vllm_backend(tiny_model_dir).score(prompts, continuations)
    for prompt, continuation, score in zip(prompts, continuations, scores):
        start = len(tokenizer(prompt)["input_ids"])
        count = len(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        assert score == pytest.approx(-sum(range(start, start + count)) / 10)


def test_score_runs_on_an_engine_without_prefix_caching(fake_vllm, tiny_model_dir):
    vllm_backend(tiny_model_dir).score(PROMPTS[:2], [" Paris", " 1"])
    assert fake_vllm.SCORED == [False, False]  # vllm#42019: prompt log-probabilities depend on order with it on
    cached = vllm_backend(tiny_model_dir, engine_args={"enable_prefix_caching": True})
    with pytest.raises(SelfAlignError, match="prefix caching on"):
        cached.score(PROMPTS[:1], [" Paris"])
    assert cached.generate(PROMPTS[:1], GenerationParams())[0].text  # generation alone may use it


def test_an_adapter_is_sent_with_every_request_unmerged(fake_vllm, tiny_model_dir, tmp_path):
    adapter = make_adapter(tmp_path / "adapter", 12)
    config = ModelConfig(model=str(tiny_model_dir), backend="vllm", adapter=adapter, options={"show_progress": False})
    backend = BACKENDS.create("vllm", config)
    assert fake_vllm.CONSTRUCTED[-1]["enable_lora"] is True
    assert fake_vllm.CONSTRUCTED[-1]["max_lora_rank"] == 16  # r=12 rounded up to a rank vLLM accepts
    assert field(backend.generate(["Hi"], GenerationParams())[0].text, "adapter") == "selfalign-adapter-1"


def test_one_engine_serves_the_base_model_and_every_adapter_until_closed(fake_vllm, tiny_model_dir, tmp_path):
    sft, dpo = make_adapter(tmp_path / "sft", 8), make_adapter(tmp_path / "dpo", 32)
    config = ModelConfig(model=str(tiny_model_dir), backend="vllm", options={"show_progress": False})
    base = create_vllm_backend(config, adapters=[sft, dpo])
    kwargs = fake_vllm.CONSTRUCTED[-1]
    assert (kwargs["enable_lora"], kwargs["max_loras"], kwargs["max_lora_rank"]) == (True, 2, 32)
    answers = {name: base.with_adapter(path).generate(["Hi"], GenerationParams())[0].text
               for name, path in (("base", None), ("sft", sft), ("dpo", dpo), ("sft again", sft))}  # fmt: skip
    assert {name: field(text, "adapter") for name, text in answers.items()} == {
        "base": "none", "sft": "selfalign-adapter-1", "dpo": "selfalign-adapter-2", "sft again": "selfalign-adapter-1"
    }  # fmt: skip
    assert len(fake_vllm.CONSTRUCTED) == 1
    with pytest.raises(SelfAlignError, match="not started for adapter"):
        base.with_adapter(make_adapter(tmp_path / "wide", 64))  # above the engine's max_lora_rank
    engine = weakref.ref(base._engine.local)
    view = base.with_adapter(dpo)
    view.close()  # closes the engine of every view
    assert engine() is None
    with pytest.raises(SelfAlignError, match="the engine was closed"):
        base.generate(["Hi"], GenerationParams())


def test_data_parallel_replicas_split_the_items_and_keep_their_order(fake_vllm, tiny_model_dir, tokenizer):
    backend = vllm_backend(tiny_model_dir, data_parallel_size=2, gpus=[3, 5])
    try:
        completions = backend.generate(PROMPTS, GenerationParams(temperature=0.5, seed=0))
        scores = backend.score(PROMPTS[:1], [" Paris"])
        single = backend.generate(PROMPTS[:1], GenerationParams())  # one replica has nothing to do
    finally:
        backend.close()
    assert [field(c.text, "gpu") for c in completions] == ["3", "3", "3", "5", "5"]  # CUDA_VISIBLE_DEVICES
    assert [field(c.text, "seed") for c in completions] == ["0", "1", "2", "3", "4"]
    assert [field(c.text, "len") for c in completions] == [str(len(tokenizer(p)["input_ids"])) for p in PROMPTS]
    assert scores[0] < 0 and len(single) == 1


def test_data_parallel_workers_are_not_daemonic_and_are_stopped(fake_vllm, tiny_model_dir):
    # vLLM's engine starts a child process in each worker: a daemonic worker cannot (vllm#18308)
    backend = vllm_backend(tiny_model_dir, data_parallel_size=2, gpus=[0, 1])
    processes = list(backend._engine.replicas.processes)
    assert backend.generate(PROMPTS[:2], GenerationParams())[1].text
    backend.close()
    backend.close()  # twice is harmless
    assert [(p.daemon, p.is_alive(), p.exitcode) for p in processes] == [(False, False, 0)] * 2
    with pytest.raises(SelfAlignError, match="did not start: TypeError: .* unexpected keyword argument"):
        vllm_backend(tiny_model_dir, data_parallel_size=2, gpus=[0, 1], engine_args={"not_an_argument": 1})
    assert multiprocessing.active_children() == []  # a failed start leaves no worker behind


def test_workers_left_running_do_not_keep_python_from_exiting(fake_vllm):
    # Python joins non-daemonic children at exit: the workers must be told to stop first, or it waits forever
    script = "from selfalign.backends.vllm_backend import _Replicas\nreplicas = _Replicas({'model': 'm'}, ['0'])\n"
    paths = [str(FAKE_VLLM), *sys.path]
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path[:0] = {paths!r}\n{script}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_gpu_groups_for_tensor_and_data_parallelism(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert device_groups(VLLMOptions(tensor_parallel_size=2, data_parallel_size=2)) == ["4,5", "6,7"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert device_groups(VLLMOptions(data_parallel_size=3)) == ["0", "1", "2"]
    with pytest.raises(SelfAlignError, match="needs 4 GPUs, but only 2 are listed"):
        device_groups(VLLMOptions(tensor_parallel_size=2, data_parallel_size=2, gpus=[0, 1]))
    assert split_evenly(5, 2) == [range(0, 3), range(3, 5)]
    assert split_evenly(1, 3) == [range(0, 1), range(1, 1), range(1, 1)]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_the_error_says_how_to_install_it(tiny_model_dir):
    with pytest.raises(SelfAlignError, match=r"pip install 'selfalign\[vllm\]'"):
        vllm_backend(tiny_model_dir)


# ---- the real engine (CUDA) ------------------------------------------------------------------------------------


def cuda_and_vllm_missing() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install 'selfalign[vllm]', CUDA machines only)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    return None


needs_gpu = pytest.mark.skipif(cuda_and_vllm_missing() is not None, reason=cuda_and_vllm_missing() or "")
EMBEDDED = "embedded:gemma-3-270m"
GPU_PROMPTS = [f"Question: {q}\nAnswer:" for q in (
    "What is the capital of France?", "Name three primary colours.", "How many legs does a spider have?",
    "Write one sentence about the sea.", "What is 12 times 12?", "Who wrote Hamlet?", "What is photosynthesis?",
    "Give me a tip for sleeping better.",
)]  # fmt: skip


@pytest.fixture(scope="module")
def real_backends():
    from selfalign.backends.language_model import load_language_model

    config = ModelConfig(model=EMBEDDED, dtype="float32")
    transformers_model = load_language_model(config)
    vllm_model = load_language_model(
        config.model_copy(
            update={"backend": "vllm", "options": {"gpu_memory_utilization": 0.5, "show_progress": False}}
        )
    )
    return transformers_model.backend, vllm_model.backend


@pytest.mark.slow
@needs_gpu
def test_vllm_agrees_with_transformers_on_greedy_text_and_scores(real_backends):
    transformers_backend, vllm_backend_ = real_backends
    params = GenerationParams(max_new_tokens=24, stop=["\nQuestion:"])
    expected = transformers_backend.generate(GPU_PROMPTS, params)
    actual = vllm_backend_.generate(GPU_PROMPTS, params)
    same = sum(a.text == e.text for a, e in zip(actual, expected))
    assert same >= len(GPU_PROMPTS) * 3 // 4, [(a.text, e.text) for a, e in zip(actual, expected)]
    assert [a.prompt_tokens for a in actual] == [e.prompt_tokens for e in expected]
    continuations = [" Paris", " red", " eight", " It", " 144", " Shakespeare", " It", " Go"]
    for a, e in zip(
        vllm_backend_.score(GPU_PROMPTS, continuations), transformers_backend.score(GPU_PROMPTS, continuations)
    ):
        assert a == pytest.approx(e, abs=0.05)


@pytest.mark.slow
@needs_gpu
def test_a_lora_adapter_is_applied_without_merging(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from selfalign.backends.language_model import load_language_model
    from selfalign.models.loading import load_model

    loaded = load_model(EMBEDDED, dtype="float32")
    peft_model = get_peft_model(
        loaded.model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    torch.manual_seed(0)
    peft_model.save_pretrained(tmp_path / "adapter")
    config = ModelConfig(model=EMBEDDED, dtype="float32", adapter=str(tmp_path / "adapter"))
    with_transformers = load_language_model(config).backend
    with_vllm = load_language_model(
        config.model_copy(
            update={"backend": "vllm", "options": {"gpu_memory_utilization": 0.3, "show_progress": False}}
        )
    ).backend
    continuations = [" Paris"] * len(GPU_PROMPTS)
    adapted = with_vllm.score(GPU_PROMPTS, continuations)
    for a, e in zip(adapted, with_transformers.score(GPU_PROMPTS, continuations)):
        assert a == pytest.approx(e, abs=0.05)


@pytest.mark.slow
@needs_gpu
def test_record_throughput_against_transformers_on_the_same_prompts(real_backends, record_property, capsys):
    transformers_backend, vllm_backend_ = real_backends
    prompts = (GPU_PROMPTS * 8)[:64]
    params = GenerationParams(max_new_tokens=128)
    rates = {}
    for name, backend in (("transformers", transformers_backend), ("vllm", vllm_backend_)):
        backend.generate(prompts[:4], GenerationParams(max_new_tokens=8))  # warm-up
        started = time.perf_counter()
        completions = backend.generate(prompts, params)
        seconds = time.perf_counter() - started
        rates[name] = sum(c.completion_tokens for c in completions) / seconds
        record_property(f"{name}_tokens_per_s", round(rates[name], 1))
    with capsys.disabled():
        print(f"\nthroughput, 64 prompts x 128 new tokens, greedy, fp32: {rates}")
    assert all(rate > 0 for rate in rates.values())
