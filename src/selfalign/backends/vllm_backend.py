"""Generation and scoring with vLLM's offline engine (`pip install 'selfalign[vllm]'`, CUDA GPUs).

`generate` is `LLM.generate` with `SamplingParams`; `score` reads the continuation's tokens from vLLM's prompt
log-probabilities (`prompt_logprobs`), generating one throw-away token. A PEFT adapter (ModelConfig.adapter) is
applied per request through `LoRARequest`, never merged, so an adapter is evaluated exactly as trained.

Prompts are tokenized here, with the model's own tokenizer and its special tokens added once, exactly as the
transformers backend does, and passed to vLLM as token ids: prompt formats, token counts and scores then mean the
same in both backends.

One engine serves the base model and several adapters: `create_vllm_backend(config, adapters=[...])` starts it
with LoRA slots for all of them (`max_loras`, `max_lora_rank` from their adapter_config.json), and
`backend.with_adapter(path)` is a view of that engine that sends `path` with every request (None: the base model).
`close()` releases the engine (and its GPU memory) for every view.

Scoring reads prompt log-probabilities, which vLLM gets wrong or refuses with prefix caching on (vllm#42019: they
depend on request order): every engine starts with `enable_prefix_caching=False`, and `score` refuses an engine whose
`engine_args` turned it back on.

Parallelism (`options`): `tensor_parallel_size` GPUs hold one copy of the model (vLLM's own tensor parallelism);
`data_parallel_size` copies run in worker processes, each on its own GPUs (set through CUDA_VISIBLE_DEVICES), and
every call is split evenly between them. Sampling uses seed + item index per item, so results do not depend on how
items were split. Across machines, run one vLLM server per replica and use `backend: openai` with several base_urls.

dtype `auto` is vLLM's auto (the checkpoint's dtype; fp16 for fp32 checkpoints): name a dtype to compare backends.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import multiprocessing
import multiprocessing.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, ValidationError

from selfalign.backends.base import Completion, GenerationParams, check_score_inputs
from selfalign.config import StrictModel, format_validation_error
from selfalign.errors import SelfAlignError

logger = logging.getLogger(__name__)

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
ADAPTER_NAME = "selfalign-adapter"  # + "-<id>": vLLM tells adapters apart by name, so each path gets its own
WORKER_START_TIMEOUT_S = 1800  # loading a large model, compiling CUDA graphs


class VLLMOptions(StrictModel):
    """`options:` of `backend: vllm`."""

    # Which GPUs and whether a bar shows, not what comes back: left out of stage cache keys. Parallel layouts stay
    # in: they change batching, and vLLM's outputs are not batch-invariant.
    OUTPUT_NEUTRAL: ClassVar[frozenset[str]] = frozenset({"gpus", "show_progress"})

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model copy (tensor parallelism).")
    data_parallel_size: int = Field(1, ge=1, description="Model copies, each in a process on its own GPUs.")
    gpus: list[int] | None = Field(
        None, description="GPU indices to use (default: CUDA_VISIBLE_DEVICES, else 0..tp*dp-1); data parallel only."
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of each GPU's memory vLLM may take.")
    max_model_len: int | None = Field(None, ge=1, description="Longest prompt + answer (default: the model's).")
    max_num_seqs: int | None = Field(None, ge=1, description="Most sequences in a batch (default: vLLM's).")
    enforce_eager: bool = Field(False, description="No CUDA graphs: faster start, slower decoding.")
    max_lora_rank: int | None = Field(None, description="Largest adapter rank (default: the adapter's r).")
    trust_remote_code: bool = Field(False, description="Run model code from the model's repository.")
    seed: int = Field(0, description="Engine seed.")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="Other vllm.LLM arguments, as they are.")
    show_progress: bool = Field(True, description="vLLM's progress bar.")


# ---- what runs where the engine is (this process, or a data-parallel worker) ------------------------------------


def build_engine(engine_kwargs: dict[str, Any]) -> Any:
    try:
        from vllm import LLM
    except ImportError:
        raise SelfAlignError("backend vllm needs vLLM: pip install 'selfalign[vllm]' (CUDA GPUs)") from None
    return LLM(**engine_kwargs)


def shut_down(engine: Any) -> None:
    """Stop vLLM's engine-core process now, not whenever garbage collection gets to it (a no-op where none)."""
    core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
    if callable(getattr(core, "shutdown", None)):
        core.shutdown()


LoRA = tuple[str, int, str]  # LoRARequest's lora_name, lora_int_id, lora_path: plain data, to send to replicas


def _lora_request(lora: LoRA | None) -> Any:
    if lora is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(*lora)


def run_generate(
    engine: Any,
    prompt_ids: list[list[int]],
    sampling: dict[str, Any],
    seeds: list[int | None],
    lora: LoRA | None,
    show_progress: bool,
) -> list[tuple[str, list[int], str, Any]]:
    """(text, generated token ids, finish reason, stop reason) per prompt, in order."""
    from vllm import SamplingParams

    params = [SamplingParams(**sampling, seed=seed) for seed in seeds]
    prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]  # a TokensPrompt each
    outputs = engine.generate(prompts, params, use_tqdm=show_progress, lora_request=_lora_request(lora))
    results = []
    for output in outputs:
        sample = output.outputs[0]
        results.append((sample.text, list(sample.token_ids), str(sample.finish_reason), sample.stop_reason))
    return results


def run_score(
    engine: Any, sequences: list[list[int]], target_lengths: list[int], lora: LoRA | None, show_progress: bool
) -> list[float]:
    """Sum of the prompt log-probabilities of each sequence's last `target_length` tokens."""
    from vllm import SamplingParams

    # prompt_logprobs=1: vLLM returns the top token and the actual prompt token at each position.
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    prompts = [{"prompt_token_ids": ids} for ids in sequences]
    outputs = engine.generate(prompts, params, use_tqdm=show_progress, lora_request=_lora_request(lora))
    scores = []
    for output, ids, length in zip(outputs, sequences, target_lengths):
        per_position = output.prompt_logprobs
        if per_position is None:
            raise SelfAlignError("vllm backend: the engine returned no prompt log-probabilities")
        total = 0.0
        for position in range(len(ids) - length, len(ids)):
            entry = per_position[position]
            if entry is None or ids[position] not in entry:
                raise SelfAlignError(f"vllm backend: no log-probability for prompt position {position}")
            value = entry[ids[position]]
            total += float(getattr(value, "logprob", value))
        scores.append(total)
    return scores


def _worker_main(connection: Any, engine_kwargs: dict[str, Any], devices: str) -> None:
    """A data-parallel replica: its own GPUs, its own engine, answering requests on `connection` until 'stop'."""
    os.environ["CUDA_VISIBLE_DEVICES"] = devices  # before anything touches CUDA
    try:
        engine = build_engine(engine_kwargs)
    except BaseException as exc:  # report why, or the parent waits for nothing
        connection.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    connection.send(("ready", None))
    while True:
        try:
            command, arguments = connection.recv()
        except EOFError:  # the parent is gone without a 'stop'
            return
        if command == "stop":
            shut_down(engine)
            return
        try:
            function = run_generate if command == "generate" else run_score
            connection.send(("ok", function(engine, *arguments)))
        except BaseException as exc:
            connection.send(("error", f"{type(exc).__name__}: {exc}"))


def _stop_workers(connections: list[Any], processes: list[Any]) -> None:
    """Ask each worker to stop, wait for it, and terminate the ones that do not stop in time."""
    for connection, process in zip(connections, processes):
        if process.is_alive():
            try:
                connection.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass
    for process in processes:
        process.join(timeout=30)
        if process.is_alive():
            process.terminate()
            process.join(timeout=10)
    for connection in connections:
        connection.close()


class _Replicas:
    """Data-parallel worker processes, started with `spawn` (CUDA cannot be used in forked children).

    Not daemonic: vLLM's V1 engine starts its own engine-core process inside each worker, and Python forbids
    children of daemonic processes ("daemonic processes are not allowed to have children", vllm#18308). vLLM's own
    data parallelism is no way out: its offline `LLM(data_parallel_size>1)` raises ValueError (read in 0.32 and
    0.33; it points to a multi-process example like this one). Non-daemonic workers would keep the interpreter from
    exiting, so they are stopped by `close()`, by a failed start, and at exit by a multiprocessing finalizer, which
    runs before multiprocessing joins its children.
    """

    def __init__(self, engine_kwargs: dict[str, Any], device_groups: list[str]) -> None:
        context = multiprocessing.get_context("spawn")
        self.connections: list[Any] = []
        self.processes: list[Any] = []
        self._finalizer = multiprocessing.util.Finalize(
            self, _stop_workers, args=(self.connections, self.processes), exitpriority=10
        )
        try:
            for devices in device_groups:
                parent_end, child_end = context.Pipe()
                process = context.Process(target=_worker_main, args=(child_end, engine_kwargs, devices), daemon=False)
                process.start()
                child_end.close()  # the worker holds it: a worker that dies then reads as EOF here
                self.connections.append(parent_end)
                self.processes.append(process)
            for rank in range(len(self.connections)):
                status, detail = self._receive(rank, WORKER_START_TIMEOUT_S)
                if status != "ready":
                    raise SelfAlignError(f"vllm backend: data-parallel replica {rank} did not start: {detail}")
        except BaseException:
            self.close()
            raise

    def _receive(self, rank: int, timeout: float) -> tuple[str, Any]:
        connection = self.connections[rank]
        try:
            if not connection.poll(timeout):
                return "error", f"no answer in {timeout:.0f} s"
            return connection.recv()
        except (EOFError, OSError):
            self.processes[rank].join(timeout=5)
            return "error", f"the process ended (exit code {self.processes[rank].exitcode})"

    def map(self, command: str, shards: list[tuple]) -> list[Any]:
        """Send one shard of arguments to each replica at once; return their results, replica by replica."""
        busy = [rank for rank, arguments in enumerate(shards) if arguments is not None]
        for rank in busy:
            self.connections[rank].send((command, shards[rank]))
        results: list[Any] = [None] * len(shards)
        failures = []
        for rank in busy:  # every answer is read, so that no stale one is left in a pipe for the next call
            status, detail = self._receive(rank, timeout=7 * 24 * 3600)
            if status != "ok":
                failures.append(f"replica {rank}: {detail}")
            results[rank] = detail
        if failures:
            raise SelfAlignError(f"vllm backend: data-parallel {'; '.join(failures)}")
        return results

    def close(self) -> None:
        self._finalizer()  # runs _stop_workers once, however often close is called


def split_evenly(count: int, parts: int) -> list[range]:
    """Contiguous ranges covering 0..count-1, sizes differing by at most one."""
    size, extra = divmod(count, parts)
    bounds = [0]
    for part in range(parts):
        bounds.append(bounds[-1] + size + (1 if part < extra else 0))
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


def device_groups(options: VLLMOptions) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each data-parallel replica."""
    if options.gpus is not None:
        pool = [str(gpu) for gpu in options.gpus]
    elif os.environ.get("CUDA_VISIBLE_DEVICES"):
        pool = [gpu.strip() for gpu in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip()]
    else:
        pool = [str(gpu) for gpu in range(options.tensor_parallel_size * options.data_parallel_size)]
    width = options.tensor_parallel_size
    if len(pool) < width * options.data_parallel_size:
        raise SelfAlignError(
            f"vllm backend: tensor_parallel_size {width} x data_parallel_size {options.data_parallel_size} needs "
            f"{width * options.data_parallel_size} GPUs, but only {len(pool)} are listed ({','.join(pool)})"
        )
    return [",".join(pool[rank * width : (rank + 1) * width]) for rank in range(options.data_parallel_size)]


# ---- the backend --------------------------------------------------------------------------------------------


class _Engine:
    """What every view of one VLLMBackend shares: the engine (here, or data-parallel replicas) and the LoRA ids."""

    def __init__(self, engine_kwargs: dict[str, Any], options: VLLMOptions, engine: Any = None) -> None:
        self.kwargs = engine_kwargs
        self.local = engine
        self.replicas: _Replicas | None = None
        self.lora_ids: dict[str, int] = {}
        if engine is None:
            if options.data_parallel_size == 1:
                self.local = build_engine(engine_kwargs)
            else:
                self.replicas = _Replicas(engine_kwargs, device_groups(options))

    @property
    def closed(self) -> bool:
        return self.local is None and self.replicas is None

    def lora(self, adapter: str | None) -> LoRA | None:
        """LoRARequest fields for `adapter`: one id per adapter path, kept for the engine's life."""
        if adapter is None:
            return None
        lora_id = self.lora_ids.setdefault(str(adapter), len(self.lora_ids) + 1)
        return f"{ADAPTER_NAME}-{lora_id}", lora_id, str(adapter)

    def close(self) -> None:
        if self.replicas is not None:
            self.replicas.close()
            self.replicas = None
        if self.local is not None:
            shut_down(self.local)
            self.local = None
            gc.collect()
            _free_cuda_memory()


def _free_cuda_memory() -> None:
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class VLLMBackend:
    name = "vllm"

    def __init__(
        self,
        tokenizer: Any,
        engine_kwargs: dict[str, Any],
        options: VLLMOptions,
        adapter: str | None = None,
        engine: Any = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.options = options
        self.adapter = adapter
        self.eos_ids = _eos_token_ids(tokenizer)
        self._engine = _Engine(engine_kwargs, options, engine)

    def with_adapter(self, adapter: str | None) -> VLLMBackend:
        """The same engine answering through `adapter` (None: the base model), one LoRARequest per call."""
        kwargs = self._engine.kwargs
        if adapter is not None and not (
            kwargs.get("enable_lora") and _adapter_rank(adapter) <= kwargs["max_lora_rank"]
        ):
            raise SelfAlignError(
                f"vllm backend: the engine was not started for adapter {adapter} (enable_lora "
                f"{kwargs.get('enable_lora', False)}, max_lora_rank {kwargs.get('max_lora_rank')}): pass it in adapters"
            )
        view = copy.copy(self)  # shares self._engine
        view.adapter = adapter
        return view

    def close(self) -> None:
        """Release the engine for every view of it: stop data-parallel workers, or delete the engine, collect
        garbage and give CUDA's cached memory back, so that the next stage can load its own model."""
        self._engine.close()

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[Completion]:
        if params.no_repeat_ngram_size:
            raise SelfAlignError(
                "vllm backend: no_repeat_ngram_size is transformers-only (vLLM has none); use repetition_penalty, "
                "which counts the prompt's tokens too"
            )
        prompt_ids = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        sampling = {
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p if params.temperature > 0 else 1.0,
            "repetition_penalty": params.repetition_penalty,
            "stop": list(params.stop) or None,
        }
        seeds = [params.seed + index if params.temperature > 0 else None for index in range(len(prompts))]
        outputs = self._dispatch(
            "generate", len(prompts), lambda part: ([prompt_ids[i] for i in part], sampling, [seeds[i] for i in part])
        )
        return [self._completion(ids, *output) for ids, output in zip(prompt_ids, outputs)]

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """log P(continuation | prompt), summed over the continuation's tokens (tokenized apart from the prompt)."""
        check_score_inputs(prompts, continuations)
        if self._engine.kwargs.get("enable_prefix_caching") is not False:  # None is vLLM's default: on
            raise SelfAlignError(
                "vllm backend: score reads prompt log-probabilities, which depend on request order with prefix "
                "caching on (vllm#42019); remove enable_prefix_caching from the engine_args"
            )
        sequences, lengths = [], []
        for prompt, continuation in zip(prompts, continuations):
            prompt_ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            target = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if not prompt_ids:
                raise SelfAlignError("vllm backend: score needs a prompt of at least one token")
            sequences.append(prompt_ids + target)
            lengths.append(len(target))
        return self._dispatch(
            "score", len(prompts), lambda part: ([sequences[i] for i in part], [lengths[i] for i in part])
        )

    def _dispatch(self, command: str, count: int, arguments_for: Any) -> list[Any]:
        """Run `command` over all items: in this process, or split between the data-parallel replicas."""
        if self._engine.closed:
            raise SelfAlignError("vllm backend: the engine was closed")
        extra = (self._engine.lora(self.adapter), self.options.show_progress)
        function = run_generate if command == "generate" else run_score
        if count == 0:
            return []
        if self._engine.replicas is None:
            return function(self._engine.local, *arguments_for(range(count)), *extra)
        parts = split_evenly(count, self.options.data_parallel_size)
        shards = [(*arguments_for(part), *extra) if len(part) else None for part in parts]
        return [result for shard in self._engine.replicas.map(command, shards) if shard for result in shard]

    def _completion(self, prompt_ids: list[int], text: str, tokens: list[int], finish: str, stop_reason: Any):
        if finish not in ("stop", "length"):
            raise SelfAlignError(f"vllm backend: a request ended with finish reason '{finish}'")
        if tokens and tokens[-1] in self.eos_ids:
            tokens = tokens[:-1]  # EOS is not part of the answer (as in the transformers backend)
        if isinstance(stop_reason, str) and text:
            # Count tokens up to the stop string only: the tokens that spelled it are not part of the answer.
            tokens = tokens[: len(self.tokenizer(text, add_special_tokens=False)["input_ids"])]
        return Completion(text.strip(), len(prompt_ids), len(tokens), finish)  # type: ignore[arg-type]


def _eos_token_ids(tokenizer: Any) -> set[int]:
    value = getattr(tokenizer, "eos_token_id", None)
    return {value} if isinstance(value, int) else set(value or ())


def _adapter_rank(adapter: str) -> int:
    path = Path(adapter) / "adapter_config.json"
    try:
        rank = int(json.loads(path.read_text(encoding="utf-8"))["r"])
    except (OSError, ValueError, KeyError) as exc:
        raise SelfAlignError(f"vllm backend: cannot read the adapter's rank from {path} ({exc})") from None
    fitting = [allowed for allowed in LORA_RANKS if allowed >= rank]
    if not fitting:
        raise SelfAlignError(f"vllm backend: adapter rank {rank} is above vLLM's largest, {LORA_RANKS[-1]}")
    return fitting[0]


def engine_arguments(
    config: Any, options: VLLMOptions, model_source: str, adapters: Sequence[str] = ()
) -> dict[str, Any]:
    """vllm.LLM keyword arguments from our config; `engine_args` may add or override any. `adapters` (with
    config.adapter) get one LoRA slot each, at the largest of their ranks."""
    kwargs: dict[str, Any] = {
        "model": model_source,
        "tensor_parallel_size": options.tensor_parallel_size,
        "dtype": config.dtype,
        "seed": options.seed,
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "enforce_eager": options.enforce_eager,
        "trust_remote_code": options.trust_remote_code,
        "enable_prefix_caching": False,  # score's prompt log-probabilities need it off (vllm#42019)
    }
    if options.max_model_len is not None:
        kwargs["max_model_len"] = options.max_model_len
    if options.max_num_seqs is not None:
        kwargs["max_num_seqs"] = options.max_num_seqs
    if config.load_in_4bit:
        kwargs["quantization"] = "bitsandbytes"  # vLLM's in-flight 4-bit quantization
    served = list(dict.fromkeys([*([config.adapter] if config.adapter else []), *adapters]))
    if served:
        kwargs["enable_lora"] = True
        kwargs["max_loras"] = len(served)  # all resident: switching variants reloads nothing
        kwargs["max_lora_rank"] = options.max_lora_rank or max(_adapter_rank(adapter) for adapter in served)
    return {**kwargs, **options.engine_args}


def create_vllm_backend(config: Any, adapters: Sequence[str] = ()) -> VLLMBackend:
    """`backend: vllm`: the model from any model reference, an adapter through LoRARequest, options: VLLMOptions.
    `adapters`: more adapters the engine will serve through `with_adapter`, as well as config.adapter."""
    try:
        options = VLLMOptions.model_validate(config.options)
    except ValidationError as exc:
        raise SelfAlignError(format_validation_error(exc, "vllm backend options")) from None
    from selfalign.models.loading import load_tokenizer, local_folder_for
    from selfalign.models.references import resolve_model_reference

    for adapter in [config.adapter, *adapters]:
        if adapter and not Path(adapter).is_dir():
            raise SelfAlignError(f"vllm backend: adapter folder not found: {adapter}")
    model_source = local_folder_for(resolve_model_reference(config.model))  # GGUF -> the safetensors cache
    tokenizer = load_tokenizer(config.model)
    kwargs = engine_arguments(config, options, model_source, adapters)
    logger.info("starting vLLM: %s", {key: value for key, value in kwargs.items() if key != "model"})
    return VLLMBackend(tokenizer, kwargs, options, adapter=config.adapter)
