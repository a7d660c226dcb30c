"""Training configuration: one typed config for SFT and DPO, whose defaults are the reference experiment's values.

The reference experiment trained QLoRA adapters on Mistral-7B-Instruct with TRL: LoRA r=16, alpha=16, dropout 0.1
on all of q,k,v,o,gate,up,down; SFT lr 2e-4; DPO lr 5e-5 and beta 0.1; 1 epoch; batch 4. Those are the field
defaults, so the `reference` preset is the defaults; other presets change a few fields for small machines.
Precedence: defaults < preset < YAML < `key=value` overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from selfalign.config import StrictModel, apply_overrides, format_validation_error, read_yaml_mapping
from selfalign.errors import SelfAlignError
from selfalign.models.references import DEFAULT_MODEL

REFERENCE_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EVAL_BEFORE = "eval_before.json"  # the eval split's metrics before the first step, kept for a resumed run
# What a training run writes about itself rather than what it trained: times (metrics.json's runtime_s and tokens_per_s,
# TRL's log history in trainer_state.json, eval_before.json's eval_runtime) and TRL's pickled arguments. `selfalign
# run` keeps them out of a training stage's output hash, as stage.json's seconds: a rerun that trained the same
# adapter (its folder lost, or the run killed inside it) keeps the later stages cached.
RUN_RECORDS = ("metrics.json", "trainer_state.json", "training_args.bin", EVAL_BEFORE)


class LoraSettings(StrictModel):
    """The LoRA adapter trained on top of the frozen (or 4-bit) base model."""

    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the LoRA input (DPO turns dropout off).")
    target_modules: list[str] = Field(
        default_factory=lambda: list(REFERENCE_TARGET_MODULES), min_length=1, description="Linear layers to adapt."
    )


class MethodSettings(StrictModel):
    """What SFT's and DPO's sections share: a `trl:` pass-through checked against that method's TRL config."""

    trl_class: ClassVar[str]

    @field_validator("trl", check_fields=False)
    @classmethod
    def _trl_fields_exist(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_pass_through(value, cls.trl_class)


class SFTSettings(MethodSettings):
    trl_class: ClassVar[str] = "SFTConfig"

    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate of the SFT adapter.")
    max_steps: int | None = Field(None, description="SFT's optimizer steps; None: the top-level max_steps.")
    include_helpful: bool = Field(
        True,
        description="Also train on pairs whose pair_type is 'helpful' (their chosen answer), as the alignment-"
        "handbook recipes mix UltraChat into constitutional SFT; false keeps only the refusal pairs.",
    )
    include_refusal: bool = Field(
        True, description="Train on the refusal pairs' chosen answers; false: SFT on helpful answers only."
    )

    @property
    def pair_types(self) -> tuple[str, ...]:
        return tuple(t for t, on in (("refusal", self.include_refusal), ("helpful", self.include_helpful)) if on)

    @model_validator(mode="after")
    def _something_to_train_on(self) -> SFTSettings:
        if not self.pair_types:
            raise ValueError("sft: include_refusal and include_helpful are both false: nothing to train on")
        return self

    trl: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other field of TRL's SFTConfig, passed through as given (e.g. {packing: true}); a field "
        "this config already sets is refused with the name of the setting to use.",
    )


class DPOSettings(MethodSettings):
    trl_class: ClassVar[str] = "DPOConfig"

    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate of the DPO adapter.")
    beta: float = Field(0.1, gt=0, description="DPO beta: how far the policy may move from the reference.")
    include_helpful: bool = Field(
        True,
        description="Train on the helpful pairs (a helpful answer over the model's refusal); false: refusal pairs "
        "only, so DPO is never taught that refusing is worse (issue #19's question).",
    )
    max_steps: int | None = Field(None, description="DPO's optimizer steps; None: the top-level max_steps.")
    precompute_ref_log_probs: bool = Field(
        False, description="Compute the reference log-probabilities once before training instead of every step."
    )
    precompute_ref_batch_size: int = Field(
        16,
        gt=0,
        description="Pairs per batch of that precomputing pass (no gradients, so it can be larger than training's): "
        "on 2 CPU cores 16 took 2.2-2.4 s over 32 pairs against 2.8 s for 4 (`benchmarks/training.py`).",
    )
    sft_adapter: str | None = Field(
        None,
        description="Folder of an SFT adapter to continue with DPO (SFT then DPO); the reference is then a frozen "
        "copy of that adapter. None starts from the base model, as the reference experiment did.",
    )
    first_step_loss_tolerance: float = Field(
        0.1,
        gt=0,
        description="Fail when the first step's implicit rewards (TRL's rewards/chosen and rewards/rejected) are "
        "further than this from 0, or, where none are logged, its loss from ln 2: policy and reference start equal, "
        "so anything else means a broken reference. Holds for every loss type (IPO's first loss is not ln 2).",
    )

    @property
    def pair_types(self) -> tuple[str, ...]:
        return ("refusal", "helpful") if self.include_helpful else ("refusal",)

    trl: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other field of TRL's DPOConfig, passed through as given (e.g. {loss_type: [ipo]}, or "
        "{loss_type: [sigmoid, sft], loss_weights: [1.0, 1.0]}: DPO plus the SFT loss, RPO); a field this config "
        "already sets is refused with the name of the setting to use.",
    )


class TrainingConfig(StrictModel):
    """Everything that decides a training run; `selfalign train sft|dpo --config FILE key=value ...`."""

    preset: str = Field("reference", description="The preset under the YAML's values; set in YAML or by --preset.")
    model: str = Field(DEFAULT_MODEL, description="Base model reference: embedded:NAME, ORG/NAME, a folder, a .gguf.")
    prompt_format: str = Field("auto", description="auto, chat-template, plain, mistral-inst or a format .yaml.")
    system_prompt: str | None = Field(None, description="System message placed before every prompt.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="auto: bf16 (fp16 where unsupported) on CUDA, fp32 on CPU, where a bf16 model trained no faster "
        "and differently (on CPUs with bf16 units, `bf16_matmuls` gets the speed without a bf16 residual stream).",
    )
    quantization: Literal["auto", "4bit", "none"] = Field(
        "auto", description="auto: QLoRA (4-bit NF4 base) when CUDA and bitsandbytes are present, else none."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    sft: SFTSettings = Field(default_factory=SFTSettings)
    dpo: DPOSettings = Field(default_factory=DPOSettings)

    epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    max_steps: int = Field(-1, description="Optimizer steps; a positive value overrides epochs.")
    batch_size: int = Field(4, ge=1, description="Examples (pairs for DPO) per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=2, description="Tokens of prompt plus answer; longer examples are truncated.")
    optimizer: str = Field("adamw_torch", description="transformers optimizer name, e.g. paged_adamw_8bit.")
    lr_scheduler: str = Field("linear", description="transformers scheduler name.")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    gradient_checkpointing: bool = Field(True, description="Trade compute for memory (TRL's default).")
    lm_head_answer_only: bool = Field(
        True,
        description="Project through the LM head only at the answer positions the loss reads, on CPU as TRL does on "
        "CUDA, once per step instead of again in the backward (training/cpu_speed.py); the same log-probabilities, a "
        "fraction of the work. False: TRL's choice.",
    )
    bf16_matmuls: Literal["auto"] | bool = Field(
        "auto",
        description="Multiply by the frozen weights (LoRA's base layers, the LM head) in bf16 on a CPU with bf16 units "
        "(AMX, AVX-512 BF16), keeping everything else fp32 (training/cpu_speed.py). auto: on where the CPU has them "
        "and the model is fp32; false: every product in the model's dtype.",
    )
    lora_dropout_from_random_bits: bool = Field(
        True,
        description="On CPU, draw the masks of LoRA's dropout (SFT's; DPO turns dropout off) from 16 random bits a "
        "value instead of torch's one-at-a-time bernoulli_ (training/cpu_speed.py): the same distribution, other "
        "draws. False: torch's dropout.",
    )
    seed: int = Field(42, ge=0)

    eval_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of the pairs held out for evaluation (0: no eval split)."
    )
    eval_data: str | None = Field(None, description="A separate evaluation data set; replaces the held-out split.")
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps; an interrupted run resumes from it.")
    save_total_limit: int | None = Field(2, ge=1, description="Checkpoints kept.")
    report_to: list[str] = Field(
        default_factory=lambda: ["none"], description="TRL/transformers loggers: none, tensorboard, wandb, ..."
    )
    progress_bar: bool = True
    resume: bool = Field(True, description="Continue from the last checkpoint in the output folder, if any.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_logger_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # report_to=tensorboard on the command line


# ---- how TRL's SFTConfig / DPOConfig are built: one declared mapping ------------------------------------------

# TrainingConfig field -> the TRL (transformers TrainingArguments) fields it sets, value unchanged.
TRL_FIELDS: dict[str, tuple[str, ...]] = {
    "epochs": ("num_train_epochs",),
    "batch_size": ("per_device_train_batch_size", "per_device_eval_batch_size"),
    "gradient_accumulation_steps": ("gradient_accumulation_steps",),
    "max_length": ("max_length",),
    "optimizer": ("optim",),
    "lr_scheduler": ("lr_scheduler_type",),
    "warmup_ratio": ("warmup_steps",),  # a float below 1 is a share of the steps
    "gradient_checkpointing": ("activation_checkpointing",),
    "seed": ("seed",),
    "logging_steps": ("logging_steps",),
    "save_steps": ("save_steps",),
    "save_total_limit": ("save_total_limit",),
    "report_to": ("report_to",),
}
# The method section's fields (sft: / dpo:) that TRL reads under the same name; max_steps falls back to the top level.
TRL_METHOD_FIELDS = ("learning_rate", "max_steps", "beta", "precompute_ref_log_probs", "precompute_ref_batch_size")
# TRL fields set from other settings or fixed (training/common.py `trainer_arguments`): where each comes from.
TRL_DERIVED: dict[str, str] = {
    "output_dir": "the output folder", "run_name": "the output folder", "bf16": "dtype", "fp16": "dtype",
    "use_cpu": "device", "dataloader_pin_memory": "device", "disable_tqdm": "progress_bar",
    "logging_first_step": "the DPO first-step check", "save_strategy": "save_steps",
    "eval_strategy": "evaluation before and after training", "completion_only_loss": "SFT's answer-only loss",
}  # fmt: skip


def _set_by_us() -> dict[str, str]:
    """TRL field -> the setting of ours that sets it."""
    ours = {trl_name: name for name, trl_names in TRL_FIELDS.items() for trl_name in trl_names}
    ours.update({name: f"sft/dpo.{name}" for name in TRL_METHOD_FIELDS})
    ours.update(TRL_DERIVED)
    return ours


def check_pass_through(fields: dict[str, Any], trl_class: str) -> dict[str, Any]:
    """A `trl:` section names fields TRL's config has and this config does not set (one place per setting). Values
    are checked by TRL itself when the trainer's config is built. TRL is imported only when the section is used."""
    if not fields:
        return fields
    import dataclasses

    import trl

    known = {field.name for field in dataclasses.fields(getattr(trl, trl_class))}
    set_by_us = _set_by_us()
    for name in fields:
        if name in set_by_us:
            raise ValueError(f"{name}: set by {set_by_us[name]} here, not through trl:")
        if name not in known:
            raise ValueError(f"{name}: not a field of TRL's {trl_class} (trl {trl.__version__})")
    return fields


PRESETS: dict[str, dict[str, Any]] = {
    # The field defaults are the reference experiment's values.
    "reference": {},
    # A quick run on a laptop or a 2-core CI machine with the embedded model: short sequences, no activation
    # recomputation (it only saves memory, which a 270M model does not need), frequent logs and checkpoints.
    "cpu-small": {
        "max_length": 256,
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "save_steps": 10,
    },
}


def load_training_config(
    path: str | Path | None = None, overrides: list[str] | None = None, preset: str | None = None
) -> TrainingConfig:
    """Defaults < preset (`preset` argument, else the YAML's `preset:` key, else reference) < YAML < overrides."""
    data = read_yaml_mapping(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return build_training_config(preset or data.get("preset") or "reference", data, str(path or "command line"))


def build_training_config(preset: str, settings: dict[str, Any], source: str, where: str = "") -> TrainingConfig:
    """The one way a TrainingConfig is made from settings: the preset's values, then `settings` merged over them key
    by key (nested sections too), validated. Errors name `source` and the key (prefixed by `where`, e.g.
    "training.settings.") in one line."""
    if preset not in PRESETS:
        prefix = f"{source}: " if source else ""
        raise SelfAlignError(f"{prefix}unknown training preset '{preset}'; presets: {', '.join(PRESETS)}")
    merged = {**_deep_merge(PRESETS[preset], settings), "preset": preset}
    try:
        return TrainingConfig.model_validate(merged)
    except ValidationError as exc:
        if not where:
            raise SelfAlignError(format_validation_error(exc, source)) from None
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"])
        problem = "unknown key" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
        raise SelfAlignError(f"{source}: {where}{key}: {problem}" if source else f"{where}{key}: {problem}") from None


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
