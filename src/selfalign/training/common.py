"""What SFT and DPO share: the base model, LoRA and trainer arguments from our config, data staging, the degenerate-
run checks, evaluation before training, and the output folder (adapter, tokenizer, config, state, metrics)."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainerCallback

from selfalign.allocator import release_free_memory_over
from selfalign.data.jsonl import write_text_atomic
from selfalign.errors import SelfAlignError
from selfalign.models.formats import PromptFormat, get_prompt_format
from selfalign.models.loading import LoadedModel, load_model
from selfalign.training.config import (
    EVAL_BEFORE,
    TRL_FIELDS,
    TRL_METHOD_FIELDS,
    DPOSettings,
    LoraSettings,
    SFTSettings,
    TrainingConfig,
)
from selfalign.training.data import check_prompts_fit, load_pairs, split_pairs, store_examples

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
# Free heap glibc may keep between training steps for reuse; past it, the free pages go back to the system
FREE_HEAP_LIMIT = 2 << 30


@dataclass
class TrainingOutputs:
    adapter: Path  # PEFT adapter (safetensors) and tokenizer
    metrics: dict[str, Any]
    merged: Path | None = None  # the base with the adapter merged in, when asked for


# ---------------------------------------------------------------------------------------------------------- model


def on_cuda(config: TrainingConfig) -> bool:
    import torch

    available = torch.cuda.is_available()
    if config.device == "cuda" and not available:
        raise SelfAlignError("device: cuda, but this machine has no CUDA GPU that torch can use")
    return config.device != "cpu" and available


@functools.cache
def _bitsandbytes_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def uses_4bit(config: TrainingConfig) -> bool:
    """QLoRA where it can run: `auto` means CUDA and bitsandbytes are both there and the launch does not shard the
    weights (FSDP, DeepSpeed), which 4-bit layers placed whole on each GPU cannot follow."""
    if config.quantization == "auto":
        sharded = any(os.environ.get(f"ACCELERATE_USE_{name}", "").lower() == "true" for name in ("FSDP", "DEEPSPEED"))
        return on_cuda(config) and _bitsandbytes_installed() and not sharded
    return config.quantization == "4bit"


def model_dtype(config: TrainingConfig) -> str:
    """The dtype the base is loaded in (and 4-bit layers compute in); fp32 on CPU unless asked otherwise."""
    if config.dtype != "auto":
        return config.dtype
    if on_cuda(config):
        from selfalign.models.loading import resolve_dtype

        return str(resolve_dtype("auto")).removeprefix("torch.")
    return "float32"


def bf16_matmuls(config: TrainingConfig) -> bool:
    """Whether the frozen weights multiply in bf16 (`bf16_matmuls`): auto means an fp32 model trained on a CPU
    with bf16 units."""
    if config.bf16_matmuls != "auto":
        return config.bf16_matmuls
    from selfalign.models.loading import cpu_supports_bf16

    return not on_cuda(config) and model_dtype(config) == "float32" and not uses_4bit(config) and cpu_supports_bf16()


def load_base_model(config: TrainingConfig) -> tuple[LoadedModel, PromptFormat]:
    """The base model, on CPU for the trainer to place (4-bit models load onto this process's GPU), and its format."""
    four_bit = uses_4bit(config)
    base = load_model(
        config.model, dtype=model_dtype(config), load_in_4bit=four_bit, device="auto" if four_bit else "cpu"
    )
    return base, get_prompt_format(base.tokenizer, config.prompt_format)


def lora_config(settings: LoraSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def trainer_arguments(
    config_class: type, config: TrainingConfig, out: Path, method: SFTSettings | DPOSettings | None = None,
    **fixed: Any,
) -> Any:  # fmt: skip
    """TRL's SFTConfig or DPOConfig: the fields TRL_FIELDS maps from our config, the method section's own fields
    (TRL_METHOD_FIELDS, its step count where it sets one) and its `trl:` pass-through, the fields derived from
    dtype, device and the output folder, and `fixed` (what a stage always sets). Building it starts the distributed
    state, so it comes first."""
    arguments: dict[str, Any] = {
        trl_name: getattr(config, name) for name, trl_names in TRL_FIELDS.items() for trl_name in trl_names
    }
    if method is not None:
        own = {name: getattr(method, name) for name in TRL_METHOD_FIELDS if hasattr(method, name)}
        if own.get("max_steps") is None:
            own["max_steps"] = config.max_steps
        arguments.update(own, **method.trl)
    dtype = model_dtype(config)
    arguments.update(
        output_dir=str(out / CHECKPOINTS),
        run_name=out.name,
        bf16=dtype == "bfloat16",  # TRL's default turns bf16 on everywhere, CPU included
        fp16=dtype == "float16",
        use_cpu=not on_cuda(config),
        dataloader_pin_memory=on_cuda(config),
        disable_tqdm=not config.progress_bar,
        logging_first_step=True,  # the DPO check reads the first step's loss
        save_strategy="steps",
        eval_strategy="no",  # evaluated before and after training, explicitly
        **fixed,
    )
    try:
        return config_class(**arguments)
    except (TypeError, ValueError) as exc:  # a pass-through value TRL refuses
        section = "sft" if method is not None and isinstance(method, SFTSettings) else "dpo"
        raise SelfAlignError(f"training settings: TRL's {config_class.__name__} refused them "
                             f"(check {section}.trl): {str(exc).splitlines()[0]}") from None  # fmt: skip


def last_checkpoint(args: Any, config: TrainingConfig) -> str | None:
    """Where an interrupted run left off: the newest complete checkpoint, or None to start afresh.

    transformers' get_last_checkpoint takes the newest `checkpoint-N` folder even when a kill -9 stopped its saving
    halfway (the trainer writes trainer_state.json last, and resuming from a folder without it fails), so folders
    without it are passed over; training then redoes those steps and saves them again."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = Path(args.output_dir)
    if not config.resume or not folder.is_dir():
        return None
    steps = {
        int(path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")): path
        for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if path.is_dir() and path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-").isdigit()
    }
    complete = [steps[step] for step in sorted(steps, reverse=True) if (steps[step] / "trainer_state.json").is_file()]
    if len(complete) < len(steps):
        logger.info("passing over %d checkpoint(s) a stopped run left half-written", len(steps) - len(complete))
    if complete:
        logger.info("resuming from %s", complete[0])
        return str(complete[0])
    return None


# ----------------------------------------------------------------------------------------------------------- data


def load_split_pairs(config: TrainingConfig, data: str) -> tuple[Any, Any]:
    """(train, eval) pairs; read before the model loads, so that bad data fails in seconds."""
    return split_pairs(load_pairs(data), config.eval_fraction, config.seed, config.eval_data)


def prepare_examples(
    pairs: tuple[Any, Any],
    to_examples: Any,
    prompt_format: PromptFormat,
    config: TrainingConfig,
    data: str,
    out: Path,
    args: Any,
    stage: str,
) -> tuple[Any, Any, dict[str, int]]:
    """Render (train, eval) pairs with `to_examples(pairs) -> Dataset`, stage them on disk, check that they fit in
    max_length: (train, eval, counts)."""
    train_pairs, eval_pairs = pairs
    folder = out / "data" / stage.lower()
    write = args.process_index == 0
    with args.main_process_first(desc=f"{stage} data", local=False):
        train_set = store_examples(to_examples(train_pairs), folder / "train", write)
        eval_set = store_examples(to_examples(eval_pairs), folder / "eval", write) if eval_pairs else None
    too_long = check_prompts_fit(train_set, prompt_format, config.max_length, data, stage)
    counts = {"train": len(train_set), "eval": len(eval_set) if eval_set is not None else 0, "too_long": too_long}
    return train_set, eval_set, counts


def require_examples(trainer: Any, source: str, stage: str, max_length: int) -> None:
    """After TRL's own tokenizing and truncation, something must be left to train on."""
    if len(trainer.train_dataset) == 0:
        raise SelfAlignError(
            f"{source}: no {stage} examples left after tokenizing and truncation to max_length={max_length}"
        )


# ---------------------------------------------------------------------------------------------------------- train


class FirstStepLossCheck(TrainerCallback):
    """DPO's policy and reference are equal before the first update, so at the first step the implicit rewards
    (beta times the log-ratio of policy to reference, which TRL logs as rewards/chosen and rewards/rejected) are 0,
    whatever the loss type; with sigmoid DPO the loss is then ln 2 (~0.693), which is checked where no rewards are
    logged.

    Anything far from it means the reference is not the starting policy: a loss near 0 from the first step is the
    known symptom of DPO on an unmerged SFT adapter whose reference is the bare base model.
    """

    REWARDS = ("rewards/chosen", "rewards/rejected")

    def __init__(self, tolerance: float, reference: str) -> None:
        self.tolerance = tolerance
        self.reference = reference

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if state.global_step != 1 or not logs:
            return
        broken = (f"(tolerance dpo.first_step_loss_tolerance={self.tolerance}): the reference model, "
                  f"{self.reference}, is not the starting policy")  # fmt: skip
        rewards = {name: float(logs[name]) for name in self.REWARDS if name in logs}
        if rewards:
            if not all(abs(value) <= self.tolerance for value in rewards.values()):  # also catches NaN
                found = ", ".join(f"{name} {value:.4f}" for name, value in rewards.items())
                raise SelfAlignError(f"DPO's first-step implicit rewards are {found}, not 0 {broken}")
        elif "loss" in logs and not abs(float(logs["loss"]) - math.log(2)) <= self.tolerance:
            raise SelfAlignError(f"DPO's first-step loss is {float(logs['loss']):.4f}, not ln 2 = 0.6931 {broken}")


class ReleaseFreeHeap(TrainerCallback):
    """After each step, hands the heap's free pages back to the system once glibc holds more than `limit` bytes free.

    `keep_large_blocks_for_reuse` keeps what a step frees for the next one (mapping it afresh cost DPO steps 1.21x),
    but each step's tensors have other sizes, and the heap fragments around them: in the demo's DPO the heap grew to
    5.4 GB with at most 2.4 GB in use, and the stage's peak varied from 5.2 to 7.9 GB between runs of the same code.
    DPO uses it; SFT, whose peak stays near 5 GB, does not: there the pages it handed back cost 17 s of the demo's
    58 (their page faults when the next step took them again)."""

    def __init__(self, limit: int = FREE_HEAP_LIMIT) -> None:
        self.limit = limit
        self.releases = 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.releases += release_free_memory_over(self.limit)


def train_and_evaluate(trainer: Any, out: Path, checkpoint: str | None) -> dict[str, Any]:
    """Evaluate, train (resuming from `checkpoint`), evaluate again: metrics `train`, `eval_before`, `eval_after`."""
    eval_before = evaluate_before_training(trainer, out, checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_after = trainer.evaluate() if trainer.eval_dataset is not None else None
    return {
        "train": training_metrics(trainer, result, checkpoint),
        "eval_before": eval_before,
        "eval_after": eval_after,
    }


def evaluate_before_training(trainer: Any, out: Path, checkpoint: str | None) -> dict[str, float] | None:
    """Eval metrics of the starting point, kept in a file so that a resumed run reports the same 'before'."""
    if trainer.eval_dataset is None:
        return None
    path = out / EVAL_BEFORE
    if checkpoint and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        write_text_atomic(path, json.dumps(metrics, indent=2) + "\n")
    return metrics


def training_metrics(trainer: Any, result: Any, checkpoint: str | None) -> dict[str, Any]:
    """Losses per logged step and the run's totals, from the trainer's own log history."""
    history = trainer.state.log_history
    steps = [
        {"step": entry["step"], **{key: value for key, value in entry.items() if key in _STEP_KEYS}}
        for entry in history
        if "loss" in entry
    ]
    tokens = max((entry.get("num_tokens", 0) for entry in history), default=0)
    runtime = result.metrics.get("train_runtime", 0.0)
    return {
        "loss": result.training_loss,
        "steps": trainer.state.global_step,
        "processes": trainer.args.world_size,
        "runtime_s": runtime,
        "samples_per_s": result.metrics.get("train_samples_per_second"),
        "tokens": tokens,
        "tokens_per_s": tokens / runtime if runtime else None,
        "resumed_from": Path(checkpoint).name if checkpoint else None,
        "per_step": steps,
    }


def run_description(
    config: TrainingConfig, data: str, prompt_format: PromptFormat, counts: dict[str, int]
) -> dict[str, Any]:
    """What a run trained on, for metrics.json."""
    return {
        "model": config.model,
        "data": data,
        "prompt_format": prompt_format.name,
        "quantization": "4bit-nf4" if uses_4bit(config) else "none",
        "examples": counts,
    }


# Per-step entries of metrics.json: losses, and for DPO the implicit rewards.
_STEP_KEYS = {"loss", "learning_rate", "grad_norm", "rewards/accuracies", "rewards/margins"}


# ----------------------------------------------------------------------------------------------------------- save


def save_outputs(
    trainer: Any, config: TrainingConfig, out: Path, metrics: dict[str, Any], merge: bool
) -> TrainingOutputs:
    """Adapter + tokenizer, resolved config, trainer state and metrics.json in `out`; `merged/` with `merge`."""
    trainer.save_model(str(out))  # every process takes part: FSDP and ZeRO-3 gather the weights here
    outputs = TrainingOutputs(adapter=out, metrics=metrics, merged=out / "merged" if merge else None)
    if not trainer.is_world_process_zero():
        return outputs
    # DPO on top of an SFT adapter keeps a frozen copy of it as adapter 'ref'; PEFT saves it in a subfolder.
    shutil.rmtree(out / "ref", ignore_errors=True)
    trainer.state.save_to_json(str(out / "trainer_state.json"))
    metrics["versions"] = _versions()
    write_text_atomic(out / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    if merge:
        merge_adapter(config, out, outputs.merged)
    return outputs


def merge_adapter(config: TrainingConfig, adapter: Path, target: Path) -> None:
    """The base model (full precision, never 4-bit: merging into 4-bit weights loses the update) plus the adapter."""
    from peft import PeftModel

    base = load_model(config.model, dtype=model_dtype(config), device="cpu")
    merged = PeftModel.from_pretrained(base.model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(target))  # safetensors
    base.tokenizer.save_pretrained(str(target))
    logger.info("merged model written to %s", target)


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    modules = (torch, transformers, trl, peft)
    return {module.__name__: module.__version__ for module in modules}
