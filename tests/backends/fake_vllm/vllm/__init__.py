"""A stand-in for vLLM's offline API (LLM, SamplingParams, LoRARequest), so the vllm backend's own logic is tested
on machines without CUDA. It answers deterministically and says which GPUs and adapter it ran with."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

CONSTRUCTED: list[dict[str, Any]] = []


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
        self.kwargs = {"model": model, **kwargs}
        CONSTRUCTED.append(self.kwargs)
        self.devices = os.environ.get("CUDA_VISIBLE_DEVICES", "")

    def generate(self, prompts, sampling_params, use_tqdm=True, lora_request=None):
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        outputs = []
        for prompt, param in zip(prompts, params):
            ids = prompt["prompt_token_ids"]
            if param.prompt_logprobs is not None:
                logprobs = [None] + [{token: Logprob(-position / 10), 0: Logprob(-9.0)} for position, token in
                                     enumerate(ids) if position > 0]  # fmt: skip
                outputs.append(RequestOutput(ids, [CompletionOutput("x", [5], "length")], logprobs))
                continue
            adapter = lora_request.lora_name if lora_request is not None else "none"
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
