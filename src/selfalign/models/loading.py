"""Load a model and tokenizer from any model reference, in the dtype the hardware is fast at."""

from __future__ import annotations

import functools
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from selfalign.errors import SelfAlignError
from selfalign.models.references import ModelReference, resolve_model_reference

logger = logging.getLogger(__name__)

DtypeName = Literal["auto", "bfloat16", "float16", "float32"]


@functools.cache
def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 arithmetic (AVX-512 BF16 or AMX), which makes bf16 matmuls fast."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(name: DtypeName) -> Any:
    """`auto` -> bf16 on a GPU that supports it or on a CPU with bf16 units, fp32 otherwise."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def machine_facts() -> dict[str, Any]:
    """What can make one config and seed give other numbers on another machine: the CPU (its bf16 units decide what
    `dtype: auto` loads, and its kernels round differently, which flips greedy tokens), the threads and the GPUs."""
    import os
    import platform

    import torch

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    model_names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    return {
        "cpu": model_names[0] if model_names else platform.processor(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": cpu_supports_bf16(),
        # AMX tiles (Intel Xeon since Sapphire Rapids) run bf16 products several times as fast as AVX-512 BF16 alone
        "cpu_amx": "amx_bf16" in cpuinfo,
        "auto_dtype": str(resolve_dtype("auto")).removeprefix("torch."),
        "gpus": [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
    }


def local_folder_for(reference: ModelReference) -> str:
    """The folder or hub id that transformers' from_pretrained should read, converting GGUF into the cache first."""
    from selfalign.models.gguf_cache import prepare_embedded_model, prepare_gguf_file

    if reference.kind == "embedded":
        return str(prepare_embedded_model(reference.location))
    if reference.kind == "gguf":
        return str(prepare_gguf_file(Path(reference.location)))
    return reference.location


def prepare_model_files(model: str) -> str:
    """Make a model's files local (convert GGUF, download from the hub) and return where they are."""
    reference = resolve_model_reference(model)
    if reference.kind != "hub":
        return local_folder_for(reference)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(reference.location, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as exc:  # offline mode, missing repo and network failures have many exception types
        raise SelfAlignError(f"cannot download '{model}' from the Hugging Face hub: {_first_line(exc)}") from None


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    reference: ModelReference
    source: str  # the folder or hub id actually loaded


def load_tokenizer(model: str, revision: str | None = None) -> Any:
    reference = resolve_model_reference(model)
    source = local_folder_for(reference)
    try:
        return tokenizer_from_pretrained(source, revision=revision, trust_remote_code=False)
    except OSError as exc:
        raise SelfAlignError(f"cannot load the tokenizer of '{model}': {_first_line(exc)}") from None


# What transformers 5's tokenizers-backed classes (GemmaTokenizer, LlamaTokenizer and others) keep of the vocabulary
# and merges they built their backend from; only their __init__ reads them.
INIT_COPIES = ("_vocab", "_merges")


def tokenizer_from_pretrained(source: str, **kwargs: Any) -> Any:
    """`AutoTokenizer.from_pretrained`, less the Python copies of the vocabulary and merges the backend was built
    from. TRL's tokenizing `map` calls take the tokenizer as an argument, so `datasets` fingerprints it by pickling:
    with the embedded model's 262,144 words and 514,906 merges as Python objects that took 4.5 s a call; without
    them, the backend's serialised state alone (BENCHMARKS.md, "Training").

    Each call returns a tokenizer of its own, but a folder is read once per process: transformers 5 builds the
    embedded model's tokenizer in Python from its 33 MB tokenizer.json (2.5 s), while unpickling the one already
    built takes 0.9 s, and an evaluation loads it four times (three variants and the judge)."""
    key = (source, _folder_signature(source), tuple(sorted(kwargs.items())))
    if key in _PICKLED_TOKENIZERS:
        return pickle.loads(_PICKLED_TOKENIZERS[key])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if getattr(tokenizer, "_tokenizer", None) is not None:  # the backend holds the vocabulary and merges itself
        for name in INIT_COPIES:
            tokenizer.__dict__.pop(name, None)
    if len(_PICKLED_TOKENIZERS) >= PICKLED_TOKENIZERS_KEPT:
        del _PICKLED_TOKENIZERS[next(iter(_PICKLED_TOKENIZERS))]
    _PICKLED_TOKENIZERS[key] = pickle.dumps(tokenizer)  # before any caller sets its pad token or padding side
    return tokenizer


PICKLED_TOKENIZERS_KEPT = 4
# (source, its files, options) -> the tokenizer as first read, pickled in memory by this process (never written
# or read from disk: files are only ever read by transformers)
_PICKLED_TOKENIZERS: dict[tuple, bytes] = {}


def _folder_signature(source: str) -> tuple:
    """The files of a local folder, their sizes and times (a changed folder is read again); () for a hub id."""
    folder = Path(source)
    if not folder.is_dir():
        return ()
    return tuple(
        (file.name, stat.st_size, stat.st_mtime_ns) for file in sorted(folder.iterdir())
        if file.is_file() and (stat := file.stat())
    )  # fmt: skip


def load_model(
    model: str,
    dtype: DtypeName = "auto",
    load_in_4bit: bool = False,
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a model reference (see `resolve_model_reference`)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()  # our own bars report progress; theirs would interleave
    reference = resolve_model_reference(model)
    source = local_folder_for(reference)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype), "revision": revision}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if load_in_4bit:
        kwargs["quantization_config"] = four_bit_config(kwargs["dtype"])
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    elif device == "auto":
        kwargs["device_map"] = "cuda" if torch.cuda.is_available() else None
    elif device != "cpu":
        kwargs["device_map"] = device
    try:
        tokenizer = tokenizer_from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        loaded = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        # Offline hub lookups and missing files both arrive as OSError with a long explanation.
        raise SelfAlignError(f"cannot load model '{model}': {_first_line(exc)}") from None
    loaded.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    logger.info("loaded %s (%s) in %s", model, source, kwargs["dtype"])
    return LoadedModel(loaded, tokenizer, reference, source)


def four_bit_unavailable() -> str | None:
    """Why NF4 4-bit weights cannot load on this machine ("needs ..."), or None where they can: `selfalign run`
    asks before its first stage, so a 4-bit config on a CPU machine stops at once, not when a stage loads the model."""
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU (bitsandbytes NF4); none is available on this machine"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "needs bitsandbytes: pip install 'selfalign[qlora]'"
    return None


def four_bit_config(compute_dtype: Any) -> Any:
    """NF4 with double quantization, as the reference experiment's QLoRA; only where CUDA and bitsandbytes exist."""
    reason = four_bit_unavailable()
    if reason is not None:
        raise SelfAlignError(f"load_in_4bit {reason}")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
