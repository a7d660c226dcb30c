"""A stand-in for vLLM's offline API (LLM, SamplingParams, LoRARequest), so the vllm backend's own logic is tested
on machines without CUDA. It answers deterministically and says which GPUs and adapter it ran with.

It is as strict as vLLM where the backend could go wrong unseen: `LLM` takes only the keyword arguments vLLM's
`LLM`/`EngineArgs` take (llm_arguments.txt, from vLLM 0.32.0; the tests put real vLLM's own names in
REAL_ARGUMENTS_ENV where it is installed); it fails as vLLM's V1 engine does inside a daemonic process, where the
engine-core process it starts is refused (vllm#18308); prompt log-probabilities are refused with prefix caching on
(vllm#42019 reports them order-dependent); and a LoRA request needs enable_lora."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm.lora.request import LoRARequest

CONSTRUCTED: list[dict[str, Any]] = []  # each engine's keyword arguments, model included
SCORED: list[Any] = []  # enable_prefix_caching of the engine, per generate call with prompt_logprobs
REAL_ARGUMENTS_ENV = "SELFALIGN_REAL_VLLM_LLM_ARGUMENTS"  # comma-separated; inherited by spawned workers


def accepted_arguments() -> frozenset[str]:
    real = os.environ.get(REAL_ARGUMENTS_ENV)
    if real:
        return frozenset(real.split(","))
    lines = (Path(__file__).parent / "llm_arguments.txt").read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None
    prompt_logprobs: int | None = None


@dataclass
class Logprob:
    logprob: float


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: Any = None


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    calls: list[Any] = field(default_factory=list)


class LLM:
    """generate: the answer is ' gpu <CUDA_VISIBLE_DEVICES> adapter <name> seed <seed> len <prompt length>', one
    token per word, then EOS (id 1, as in the tiny test tokenizer) if it fits in max_tokens. Prompt log-probabilities
    of the token at position k: -k/10."""

    def __init__(self, model: str, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - accepted_arguments())
        if unknown:  # EngineArgs(**kwargs) raises this in vLLM
            raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument '{unknown[0]}'")
        if int(kwargs.get("data_parallel_size", 1)) > 1:
            raise ValueError(f"LLM(data_parallel_size={kwargs['data_parallel_size']}) is not supported for single-"
                             "process usage and may hang.")  # fmt: skip
        self.kwargs = {"model": model, **kwargs}
        CONSTRUCTED.append(self.kwargs)
        self.devices = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        self.in_daemon = multiprocessing.current_process().daemon
        if self.in_daemon and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0":
            # vLLM V1 starts its engine core in a child process here; multiprocessing refuses it with this
            raise AssertionError("daemonic processes are not allowed to have children")

    def generate(self, prompts, sampling_params, *, use_tqdm=True, lora_request=None):
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        loras = lora_request if isinstance(lora_request, Sequence) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError("the lengths of prompts and lora_request must be the same")
        names = {lora.lora_name for lora in loras if lora is not None}
        if names and not self.kwargs.get("enable_lora"):
            raise ValueError("LoRA is not enabled")
        if len(names) > self.kwargs.get("max_loras", 1):
            raise ValueError(f"{len(names)} adapters in one batch, max_loras {self.kwargs.get('max_loras', 1)}")
        if any(not isinstance(lora, (LoRARequest, type(None))) for lora in loras):
            raise TypeError("lora_request must be LoRARequest objects")
        outputs = []
        for prompt, param, lora in zip(prompts, params, loras):
            ids = prompt["prompt_token_ids"]
            if param.prompt_logprobs is not None:
                SCORED.append(self.kwargs.get("enable_prefix_caching"))
                if self.kwargs.get("enable_prefix_caching") is not False:  # vLLM's default is on
                    raise ValueError("prompt_logprobs with prefix caching on: order-dependent (vllm#42019)")
                logprobs = [None] + [{token: Logprob(-position / 10), 0: Logprob(-9.0)} for position, token in
                                     enumerate(ids) if position > 0]  # fmt: skip
                outputs.append(RequestOutput(ids, [CompletionOutput("x", [5], "length")], logprobs))
                continue
            adapter = lora.lora_name if lora is not None else "none"
            text = f" gpu {self.devices} adapter {adapter} seed {param.seed} len {len(ids)}"
            stop_reason = None
            if param.stop and any(s in text for s in param.stop):
                stop = next(s for s in param.stop if s in text)
                text, stop_reason = text[: text.index(stop)], stop
            tokens = [10 + i for i in range(len(text.split()))] + ([7] if stop_reason else [])  # 7 spelled the stop
            finish = "stop"
            if len(tokens) >= param.max_tokens:
                tokens, finish = tokens[: param.max_tokens], "length"
            elif stop_reason is None:
                tokens.append(1)  # EOS of the tiny test tokenizer
            outputs.append(RequestOutput(ids, [CompletionOutput(text, tokens, finish, stop_reason)]))
        return outputs
