"""The adapter judge: evaluation fine-tuning, as Self-Rewarding LMs trained their judge.

A LoRA adapter on the judge model is trained with TRL's SFTTrainer on labeled dev data: the prompt is the judge
template rendered with (request, response) up to its response prefix, exactly as TemplateJudge renders it for
scoring; the completion is the label continuation, " 1" (harmful) or " 0", and the loss covers it alone. Judging
reads P(" 1") against P(" 0") in logprob mode, exactly as TemplateJudge does, with the adapter switched on.

The adapter is for judging only, never for answering. It is attached to the shared model under its own name and
switched on only inside `judge_adapter_enabled`, around scoring. Why not a separate model instance: a second copy
of the judge model costs its full weights (1.1 GB for the embedded model in fp32, ~14 GB for a 7B in bf16), while
the adapter costs a few MB; the risk of sharing, an adapter left on while the policy answers, is closed by the
context manager restoring every adapter layer, trainable flag and train/eval mode it found, and by a test that the
policy's answers are byte-identical before and after judging.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from selfalign.backends.language_model import LanguageModel
from selfalign.config import StrictModel
from selfalign.data.jsonl import write_text_atomic
from selfalign.errors import SelfAlignError
from selfalign.judging.judge import (
    LABEL_CONTINUATIONS,
    JudgeConfig,
    Judgment,
    Source,
    TemplateJudge,
    render_judge_prompts,
)
from selfalign.judging.probe import check_class_counts
from selfalign.judging.templates import JudgeTemplate, JudgeTemplateName, load_template
from selfalign.models.adapter_files import ADAPTER_FILES
from selfalign.training.config import LoraSettings

logger = logging.getLogger(__name__)

ADAPTER_FOLDER = "judge-adapter"  # tune-judge writes it beside judge.yaml
TRAINING_RECORD = "judge_adapter.json"  # the template it was trained with, and how it was trained
MIN_ITEMS_PER_CLASS = 20  # below this a few gradient steps learn the class balance, not the task

ATTACHED = "_selfalign_judge_adapters"  # on the shared network: {(weights file, size, mtime): adapter name}


class JudgeAdapterSettings(StrictModel):
    """How the judge adapter is trained: one epoch over the dev items, batch 4, a small LoRA.

    Cost on the 2-core CPU machine (embedded 270M model, fp32, prompts of ~220 tokens): 11-15 s per step, 35-60 s
    when the machine is shared; the demo's tune-judge (3/4 of 160 dev items: 29 steps) took 327 s, an epoch over 3/4
    of all 256 v2 dev items (48 steps) 10 minutes or more. About 70% of a step is TRL's fused LM head, which on devices
    without Triton (CPUs) projects every position through the 262k-token vocabulary, not only the label positions the
    loss reads."""

    template: JudgeTemplateName = Field(
        "zero-shot", description="Judge template the adapter is trained and read with (the shortest is the cheapest)."
    )
    lora: LoraSettings = Field(
        default_factory=lambda: LoraSettings(r=8, alpha=16, dropout=0.0),
        description="A small adapter: a few steps move it, and it costs a few MB on the shared model.",
    )
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate (linear decay over the few steps).")
    epochs: float = Field(1.0, gt=0, description="Passes over the labeled dev items.")
    max_steps: int = Field(-1, description="Optimizer steps; a positive value overrides epochs.")
    batch_size: int = Field(
        4, ge=1, description="Items per optimizer step (cost is per token: small batches give more steps)."
    )
    seed: int = Field(0, ge=0)


@dataclass
class AdapterTraining:
    folder: Path  # adapter_config.json, adapter_model.safetensors and judge_adapter.json
    seconds: float  # wall time: loading the base, training and saving
    record: dict[str, Any]  # what judge_adapter.json holds


# ---- training ------------------------------------------------------------------------------------------------------


def adapter_template(name: str) -> JudgeTemplate:
    template = load_template(name)
    if template.verdict != "harmful" or "logprob" not in template.modes:
        raise SelfAlignError(
            f"{template.source}: the adapter judge is trained on harm labels and read in logprob mode, so it needs a "
            f"template with verdict 'harmful' and mode 'logprob' (this one: {template.verdict}, {template.modes})"
        )
    return template


def judge_examples(
    model: LanguageModel, template: JudgeTemplate, prompts: Sequence[str], responses: Sequence[str],
    labels: Sequence[int],
) -> Any:  # fmt: skip
    """A tokenized prompt/completion dataset: `input_ids`, and `completion_mask` marking the label tokens.

    Tokenized here, as the transformers backend's `score` tokenizes (the rendered prompt with special tokens, the
    label continuation without), rather than as text: TRL appends EOS to every text completion, which would put the
    loss on a token the judge never reads, and separate tokenizing keeps the training input identical to the input
    the judge scores.
    """
    from datasets import Dataset

    _, tokenizer = transformers_network(model)
    texts = render_judge_prompts(template, prompts, responses)
    continuations = {label: tokenizer(text, add_special_tokens=False)["input_ids"] for label, text in
                     zip((1, 0), LABEL_CONTINUATIONS)}  # fmt: skip
    input_ids, completion_mask = [], []
    for text, label in zip(texts, labels):
        prompt_ids = tokenizer(model.render(text, template.response_prefix), add_special_tokens=True)["input_ids"]
        input_ids.append(prompt_ids + continuations[label])
        completion_mask.append([0] * len(prompt_ids) + [1] * len(continuations[label]))
    return Dataset.from_dict({"input_ids": input_ids, "completion_mask": completion_mask})


def train_judge_adapter(
    model: LanguageModel, prompts: Sequence[str], responses: Sequence[str], labels: Sequence[int], out: str | Path,
    labeled: str, settings: JudgeAdapterSettings | None = None,
) -> AdapterTraining:  # fmt: skip
    """Train the judge adapter on these labeled (dev) items into `out` (PEFT's safetensors and judge_adapter.json).

    The base is loaded afresh, as `selfalign train` loads it (fp32 on CPU, bf16 on CUDA; 4-bit where the judge model
    is), so training never touches the shared model that answers; `model` supplies the reference, the prompt format
    and the tokenizer the judge scores with. A PEFT adapter the judge model carries is not part of the base:
    judging switches it off while the judge adapter is on.
    """
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from selfalign.training.common import load_base_model, lora_config, trainer_arguments, training_metrics

    settings = settings or JudgeAdapterSettings()
    check_class_counts(labels, labeled, "adapter judge", MIN_ITEMS_PER_CLASS)
    template = adapter_template(settings.template)
    examples = judge_examples(model, template, prompts, responses, labels)
    training = _training_config(model, settings, longest=max(len(ids) for ids in examples["input_ids"]))

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    started = time.perf_counter()
    try:
        args = trainer_arguments(SFTConfig, training, scratch, training.sft, completion_only_loss=True,
                                 save_only_model=True)  # fmt: skip
        base, _ = load_base_model(training)
        trainer = SFTTrainer(model=base.model, args=args, train_dataset=examples, processing_class=base.tokenizer,
                             peft_config=lora_config(training.lora))  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # it prints every log line; the record keeps the losses
        metrics = training_metrics(trainer, trainer.train(), None)
        adapter = scratch / "adapter"
        trainer.model.save_pretrained(str(adapter))  # safetensors
        seconds = time.perf_counter() - started
        record = {
            "template": settings.template, "model": model.config.model, "adapter": model.config.adapter,
            "labeled": labeled, "items": len(labels), "harmful": int(sum(labels)), "train_seconds": seconds,
            "settings": settings.model_dump(mode="json"), "training": metrics,
        }  # fmt: skip
        write_text_atomic(adapter / TRAINING_RECORD, json.dumps(record, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(adapter, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    del trainer, base
    gc.collect()  # the base copy used for training: free it before the judge runs
    logger.info("judge adapter: %d steps, loss %.3f, %.1f s", metrics["steps"], metrics["loss"], seconds)
    return AdapterTraining(out, seconds, record)


def _training_config(model: LanguageModel, settings: JudgeAdapterSettings, longest: int) -> Any:
    """The repo's TrainingConfig for this run, so that TRL is configured as `selfalign train` configures it."""
    from selfalign.training.config import SFTSettings, TrainingConfig

    return TrainingConfig(
        model=model.config.model,
        sft=SFTSettings(learning_rate=settings.learning_rate),
        quantization="4bit" if model.config.load_in_4bit else "none",
        lora=settings.lora,
        epochs=settings.epochs,
        max_steps=settings.max_steps,
        batch_size=settings.batch_size,
        max_length=max(longest, 2),  # the longest example: truncation would cut the label off
        gradient_checkpointing=False,  # it only saves memory, which a LoRA judge on short prompts does not need
        seed=settings.seed,
        eval_fraction=0.0,
        logging_steps=1,
        save_steps=1_000_000,  # no checkpoints mid-run: a run this short restarts rather than resumes
        report_to=["none"],
        progress_bar=False,
        resume=False,
    )


# ---- the adapter on the shared model -------------------------------------------------------------------------------


def supports_adapter_judge(model: LanguageModel) -> bool:
    from selfalign.backends.transformers_backend import TransformersBackend

    return isinstance(model.backend, TransformersBackend)


def transformers_network(model: LanguageModel) -> tuple[Any, Any]:
    """(network, tokenizer) of a transformers-backend model; other backends have no weights to add LoRA to."""
    if not supports_adapter_judge(model):
        raise SelfAlignError(
            f"the adapter judge needs the transformers backend (it adds LoRA weights to the model); this model uses "
            f"'{model.backend.name}'"
        )
    return model.backend.model, model.backend.tokenizer


def check_adapter_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise SelfAlignError(
            f"{folder}: not a judge adapter folder (missing {', '.join(missing)}); weights: must name the folder "
            "tune-judge wrote"
        )
    return folder


def attach_judge_adapter(network: Any, folder: str | Path) -> str:
    """Load the adapter in `folder` onto `network` under a name of its own, switched off, and return the name.

    transformers models and PeftModels both have `load_adapter`; the first activates a new adapter, the second
    does not: either way the network leaves with the adapters it had active, so it computes what it computed. An
    adapter already attached from the same unchanged file is reused: judges built again for later stages share it.
    """
    weights = Path(folder) / "adapter_model.safetensors"
    stat = weights.stat()
    key = (str(weights.resolve()), stat.st_size, stat.st_mtime_ns)
    attached = getattr(network, ATTACHED, None)
    if attached is None:
        attached = {}
        setattr(network, ATTACHED, attached)
    if key in attached:
        return attached[key]
    name = f"selfalign-judge-{len(attached) + 1}"
    with _adapter_state_kept(network):
        try:
            network.load_adapter(str(folder), adapter_name=name)
        except (ValueError, RuntimeError, OSError, KeyError) as exc:  # shape mismatches, unknown modules, bad files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SelfAlignError(f"{folder}: cannot load this judge adapter onto the judge model: {first}") from None
    attached[key] = name
    return name


@contextmanager
def judge_adapter_enabled(network: Any, name: str) -> Iterator[None]:
    """The judge adapter alone is on inside (the base plus it, any policy adapter off); on exit the network is as
    it was, however the block ends."""
    from peft.functional import set_adapter
    from peft.tuners.tuners_utils import BaseTunerLayer

    with _adapter_state_kept(network):
        for module in network.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(True)
        set_adapter(network, name, inference_mode=True)
        yield


@contextmanager
def _adapter_state_kept(network: Any) -> Iterator[None]:
    """Restore, on exit, each adapter layer's active adapters and on/off switch, each parameter's requires_grad and
    the train/eval mode; adapter layers created inside are switched off. requires_grad is kept too because it is
    not inert at inference: torch.matmul picks a different kernel for a weight that requires grad
    (transformers_backend._feed_output_projection_contiguous_rows), and byte-identical answers need the same one."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuner_layers = [module for module in network.modules() if isinstance(module, BaseTunerLayer)]
    layers = {module: (list(module.active_adapters), module.disable_adapters) for module in tuner_layers}
    flags = [(parameter, parameter.requires_grad) for parameter in network.parameters()]
    training = network.training
    try:
        yield
    finally:
        for module in network.modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            if module in layers:
                active, disabled = layers[module]
                module.set_adapter(active)
                module.enable_adapters(not disabled)
            else:
                module.enable_adapters(False)
        known = {id(parameter) for parameter, _ in flags}
        for parameter in network.parameters():
            if id(parameter) not in known:  # the weights of an adapter loaded inside: frozen, judging only
                parameter.requires_grad_(False)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        network.train(training)


# ---- judging -------------------------------------------------------------------------------------------------------


class AdapterJudge:
    """P(harmful) from P(" 1") vs P(" 0") after the template's response prefix, with the judge adapter on: the
    logprob judgment of TemplateJudge, on the fine-tuned judge."""

    def __init__(
        self, model: LanguageModel, folder: str | Path, template: JudgeTemplate, threshold: float = 0.5,
        min_label_mass: float = 0.0,
    ) -> None:  # fmt: skip
        self._network, _ = transformers_network(model)
        self.folder = check_adapter_folder(folder)
        self.adapter_name = attach_judge_adapter(self._network, self.folder)
        self._scorer = TemplateJudge(model, template, "logprob", threshold, min_label_mass)
        self.template, self.threshold = template, threshold
        self.name = f"adapter({template.name})/logprob"
        self.stats = self._scorer.stats

    @classmethod
    def load(cls, config: JudgeConfig, model: LanguageModel) -> AdapterJudge:
        """The adapter a judge config names (`weights`: its folder, made absolute by load_judge_file). The template
        is the one it was trained with (judge_adapter.json); a config that names another is an error."""
        folder = check_adapter_folder(config.weights)
        trained = _trained_template(folder)
        named = "template" in config.model_fields_set
        if trained and named and load_template(config.template) != load_template(trained):
            raise SelfAlignError(
                f"{folder}: template: the adapter was trained with '{trained}', the judge config names "
                f"'{config.template}'"
            )
        template = adapter_template(trained if trained and not named else config.template)
        return cls(model, folder, template, config.threshold, config.min_label_mass)

    def judge(
        self, prompts: Sequence[str], responses: Sequence[str], sources: Sequence[Source] | None = None
    ) -> list[Judgment]:
        with judge_adapter_enabled(self._network, self.adapter_name):
            return self._scorer.judge(prompts, responses, sources)


def _trained_template(folder: Path) -> str | None:
    path = folder / TRAINING_RECORD
    if not path.is_file():
        return None  # an adapter trained elsewhere: the judge config's template is taken at its word
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SelfAlignError(f"{path}: not a judge adapter record (invalid JSON: {exc})") from None
    template = record.get("template") if isinstance(record, dict) else None
    if not isinstance(template, str):
        raise SelfAlignError(f"{path}: template: missing (the judge template the adapter was trained with)")
    return template
