"""Training configuration: one typed config for SFT and DPO, whose defaults are the reference experiment's values.

The reference experiment trained QLoRA adapters on Mistral-7B-Instruct with TRL: LoRA r=16, alpha=16, dropout 0.1
on all of q,k,v,o,gate,up,down; SFT lr 2e-4; DPO lr 5e-5 and beta 0.1; 1 epoch; batch 4. Those are the field
defaults, so the `reference` preset is the defaults; other presets change a few fields for small machines.
Precedence: defaults < preset < YAML < `key=value` overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from selfalign.config import StrictModel, apply_overrides, format_validation_error, read_yaml_mapping
from selfalign.errors import SelfAlignError
from selfalign.models.references import DEFAULT_MODEL

REFERENCE_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraSettings(StrictModel):
    """The LoRA adapter trained on top of the frozen (or 4-bit) base model."""

    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the LoRA input (DPO turns dropout off).")
    target_modules: list[str] = Field(
        default_factory=lambda: list(REFERENCE_TARGET_MODULES), min_length=1, description="Linear layers to adapt."
    )


class SFTSettings(StrictModel):
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate of the SFT adapter.")
    max_steps: int | None = Field(None, description="SFT's optimizer steps; None: the top-level max_steps.")
    include_helpful: bool = Field(
        True,
        description="Also train on pairs whose pair_type is 'helpful' (their chosen answer), as the alignment-"
        "handbook recipes mix UltraChat into constitutional SFT; false keeps only the refusal pairs.",
    )


class DPOSettings(StrictModel):
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate of the DPO adapter.")
    beta: float = Field(0.1, gt=0, description="DPO beta: how far the policy may move from the reference.")
    max_steps: int | None = Field(None, description="DPO's optimizer steps; None: the top-level max_steps.")
    precompute_ref_log_probs: bool = Field(
        False, description="Compute the reference log-probabilities once before training instead of every step."
    )
    sft_adapter: str | None = Field(
        None,
        description="Folder of an SFT adapter to continue with DPO (SFT then DPO); the reference is then a frozen "
        "copy of that adapter. None starts from the base model, as the reference experiment did.",
    )
    first_step_loss_tolerance: float = Field(
        0.1,
        gt=0,
        description="Fail when the first step's loss is further than this from ln 2: policy and reference start "
        "equal, so anything else means a broken reference.",
    )


class TrainingConfig(StrictModel):
    """Everything that decides a training run; `selfalign train sft|dpo --config FILE key=value ...`."""

    preset: str = Field("reference", description="The preset under the YAML's values; set in YAML or by --preset.")
    model: str = Field(DEFAULT_MODEL, description="Base model reference: embedded:NAME, ORG/NAME, a folder, a .gguf.")
    prompt_format: str = Field("auto", description="auto, chat-template, plain, mistral-inst or a format .yaml.")
    system_prompt: str | None = Field(None, description="System message placed before every prompt.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="auto: bf16 (fp16 where unsupported) on CUDA, fp32 on CPU, where LoRA steps measured no "
        "faster in bf16.",
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
    name = preset or data.get("preset") or "reference"
    if name not in PRESETS:
        raise SelfAlignError(f"unknown training preset '{name}'; presets: {', '.join(PRESETS)}")
    merged = _deep_merge(PRESETS[name], data)
    merged["preset"] = name
    source = str(path) if path is not None else "command line"
    try:
        return TrainingConfig.model_validate(merged)
    except ValidationError as exc:
        raise SelfAlignError(format_validation_error(exc, source)) from None


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
