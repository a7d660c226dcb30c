"""The run config of `selfalign run`: one model, one seed, and a section per stage.

The top-level `model` is the policy, the default judge and the base of every adapter; the pipeline writes it into
each stage's section, so it is set in one place only. tune-judge's chosen judge is used by the later stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, model_validator

from selfalign.backends.language_model import ModelConfig
from selfalign.config import StrictModel, load_config
from selfalign.errors import SelfAlignError
from selfalign.evaluation.run import EvaluateConfig
from selfalign.judging.judge import JudgeConfig
from selfalign.judging.tuning import TuneJudgeConfig
from selfalign.pipeline.launcher import LauncherSettings
from selfalign.preferences.config import PreferencesConfig
from selfalign.shipped_configs import SHIPPED_CONFIGS
from selfalign.training.config import PRESETS, TrainingConfig, build_training_config

# `selfalign run` with no config runs the demo shipped in the package, wherever it is run from; a config file of the
# current folder is only read when named, so what runs never depends on the folder (`selfalign configs copy demo`).
DEFAULT_CONFIG = SHIPPED_CONFIGS / "demo.yaml"


class TrainingSection(StrictModel):
    preset: str = Field("cpu-small", description="Training preset (reference, cpu-small, ...).")
    sft: bool = Field(True, description="Train an SFT adapter on the chosen answers.")
    dpo: bool = Field(True, description="Train a DPO adapter on the pairs.")
    dpo_from_sft: bool = Field(False, description="Continue DPO from the SFT adapter instead of from the base.")
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="TrainingConfig fields as written, e.g. {max_steps: 40, dpo: {beta: 0.2}}; the run config holds "
        "them typed as `RunConfig.training_config` (preset, these, then model: and seed), and the training stages' "
        "keys hash them as written, so a new TrainingConfig default reruns nothing.",
    )
    launcher: LauncherSettings | None = Field(
        None,
        description="Train SFT and DPO in a child `accelerate launch` with this accelerate config, e.g. {accelerate: "
        "configs/accelerate/ddp.yaml, num_processes: 8}; null trains in the run's own process. The stage keys add "
        "the process count when it is above 1 (it multiplies the effective batch), never the file.",
    )


class RunConfig(StrictModel):
    out: str = Field("runs/demo", description="Run folder: one subfolder per stage and key, run.json, report.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy, default judge and adapter base.")
    seed: int = Field(0, ge=0, description="One seed for every stage.")
    rounds: int = Field(1, ge=1, description="Repeat respond -> judge -> revise -> DPO with the latest adapter.")
    tune_judge: TuneJudgeConfig | None = Field(
        default_factory=TuneJudgeConfig, description="Measure the judge designs first; null uses `judge` as given."
    )
    judge: JudgeConfig = Field(
        default_factory=JudgeConfig, description="The judge when tune_judge is null or use_tuned_judge is false."
    )
    use_tuned_judge: bool = Field(
        True,
        description="false: tune-judge still measures every design (its tables are in the report), but the stages "
        "judge with `judge` as configured, e.g. to hold one judge fixed across seeds and sweeps.",
    )
    preferences: PreferencesConfig = Field(default_factory=PreferencesConfig)
    training: TrainingSection = Field(default_factory=TrainingSection)
    evaluation: EvaluateConfig = Field(default_factory=EvaluateConfig)

    _training_config: TrainingConfig | None = PrivateAttr(None)

    @property
    def training_config(self) -> TrainingConfig:
        """What both training stages train with (each adds its data and, for DPO, the adapter it starts from)."""
        assert self._training_config is not None  # set by the validator below
        return self._training_config

    @model_validator(mode="after")
    def _one_model(self) -> RunConfig:
        owned = [
            ("tune_judge.model", self.tune_judge is not None and "model" in self.tune_judge.model_fields_set),
            ("preferences.policy", "policy" in self.preferences.model_fields_set),
            ("preferences.judge", "judge" in self.preferences.model_fields_set),
            ("preferences.judge_file", self.preferences.judge_file is not None),
            ("preferences.seed", "seed" in self.preferences.model_fields_set),
            ("evaluation.model", "model" in self.evaluation.model_fields_set),
            ("evaluation.adapters", bool(self.evaluation.adapters)),
            ("evaluation.judge", "judge" in self.evaluation.model_fields_set),
            ("training.settings.model", "model" in self.training.settings),
            ("training.settings.seed", "seed" in self.training.settings),
        ]
        for key, is_set in owned:
            if is_set:
                raise ValueError(f"{key} is set by the pipeline (from model, seed, tune-judge and training); remove it")
        self._training_config = _typed_training_config(self)
        if self.judge.weights is not None and not Path(self.judge.weights).exists():
            raise ValueError(f"judge.weights: {self.judge.weights} not found (the {self.judge.design} judge's weights)")
        if not (self.training.sft or self.training.dpo):
            raise ValueError("training: enable sft, dpo or both")
        if self.training.dpo_from_sft and not (self.training.sft and self.training.dpo):
            raise ValueError("training.dpo_from_sft needs both sft and dpo")
        if self.rounds > 1 and not self.training.dpo:
            raise ValueError(f"rounds: {self.rounds} repeats preferences -> DPO with the latest adapter, but "
                             "training.dpo is false: nothing would train on the later rounds' pairs")  # fmt: skip
        return self


# training settings that `model:` decides for every stage, so that training and generation read one value
MODEL_OWNED_TRAINING_SETTINGS = {
    "prompt_format": "model.prompt_format",
    "system_prompt": "model.system_prompt",
    "dtype": "model.dtype",
    "quantization": "model.load_in_4bit",
}


def training_settings(config: RunConfig) -> dict[str, Any]:
    """TrainingConfig fields for this run as written: the section's settings plus the run's model, format, seed and,
    where `model:` sets them, dtype and 4-bit loading (left out otherwise, so that each side keeps its own `auto`)."""
    owned: dict[str, Any] = {}
    if "dtype" in config.model.model_fields_set:
        owned["dtype"] = config.model.dtype
    if "load_in_4bit" in config.model.model_fields_set:
        owned["quantization"] = "4bit" if config.model.load_in_4bit else "none"
    return {
        **config.training.settings,
        "model": config.model.model,
        "prompt_format": config.model.prompt_format,
        "system_prompt": config.model.system_prompt,
        "seed": config.seed,
        **owned,
    }


def _typed_training_config(config: RunConfig) -> TrainingConfig:
    """The preset, then the section's settings, then what `model:` and `seed` decide: one merge, one validation.
    A setting `model:` owns is refused rather than overwritten."""
    for key, owner in MODEL_OWNED_TRAINING_SETTINGS.items():
        if key in config.training.settings:
            raise ValueError(f"training.settings.{key} is set by the pipeline from {owner}; set it there")
    if config.training.preset not in PRESETS:
        raise ValueError(f"training.preset: unknown preset '{config.training.preset}'; presets: {', '.join(PRESETS)}")
    try:
        return build_training_config(config.training.preset, training_settings(config), "", "training.settings.")
    except SelfAlignError as exc:
        raise ValueError(str(exc)) from None


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    path = DEFAULT_CONFIG if path is None else Path(path)
    if not path.is_file():
        raise SelfAlignError(f"{path}: run config not found")
    return load_config(RunConfig, path, overrides)
