"""`selfalign train sft|dpo`: LoRA adapters with TRL from a config; also runs under `accelerate launch -m selfalign`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

train_app = typer.Typer(
    help="Train SFT and DPO LoRA adapters with TRL (QLoRA on CUDA with bitsandbytes).", no_args_is_help=True
)

Data = Annotated[
    str,
    typer.Option(
        "--data",
        help="Preference pairs with prompt, chosen, rejected: a .jsonl/.json/.csv/.parquet file, builtin:NAME, "
        "hf:ORG/NAME or a datasets save_to_disk folder.",
    ),
]
Out = Annotated[
    Path, typer.Option("--out", help="Output folder: adapter, tokenizer, config.yaml, metrics.json, checkpoints/.")
]
Overrides = Annotated[
    list[str] | None, typer.Argument(help="key=value overrides, e.g. max_steps=20 lora.r=8 dpo.beta=0.2.")
]
Model = Annotated[str | None, typer.Option("--model", "-m", help="Base model reference (overrides the config).")]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="YAML training config.")]
Preset = Annotated[str | None, typer.Option("--preset", help="reference (the default) or cpu-small.")]
Merge = Annotated[bool, typer.Option("--merge", help="Also write the base with the adapter merged in, to OUT/merged.")]


@train_app.command("sft")
def train_sft(
    data: Data,
    out: Out,
    overrides: Overrides = None,
    model: Model = None,
    config: ConfigFile = None,
    preset: Preset = None,
    merge: Merge = False,
) -> None:
    """Train an SFT adapter on the chosen answers; the loss covers the answer only.

    Helpful pairs (pair_type 'helpful') are mixed in unless sft.include_helpful=false. An interrupted run resumes
    from the last checkpoint in OUT.
    """
    from selfalign.training.sft import run_sft

    outputs = run_sft(_load(config, overrides, preset, model), data, out, merge=merge)
    typer.echo(_summary("SFT", outputs, "eval_loss", "eval loss"))


@train_app.command("dpo")
def train_dpo(
    data: Data,
    out: Out,
    overrides: Overrides = None,
    model: Model = None,
    config: ConfigFile = None,
    preset: Preset = None,
    merge: Merge = False,
    sft_adapter: Annotated[
        Path | None, typer.Option("--sft-adapter", help="Continue this SFT adapter (SFT then DPO).")
    ] = None,
) -> None:
    """Train a DPO adapter on the preference pairs, from the base model or on top of an SFT adapter.

    The reference model is the base with the adapter disabled, or a frozen copy of the SFT adapter; no second model
    is loaded. dpo.precompute_ref_log_probs=true computes the reference once before training.
    """
    from selfalign.training.dpo import run_dpo

    settings = _load(config, overrides, preset, model)
    if sft_adapter is not None:
        settings.dpo.sft_adapter = str(sft_adapter)
    outputs = run_dpo(settings, data, out, merge=merge)
    typer.echo(_summary("DPO", outputs, "eval_rewards/accuracies", "eval reward accuracy"))


def _load(path: Path | None, overrides: list[str] | None, preset: str | None, model: str | None) -> Any:
    from selfalign.training.config import load_training_config

    settings = load_training_config(path, overrides, preset)
    if model is not None:
        settings.model = model
    return settings


def _summary(stage: str, outputs: Any, eval_key: str, eval_name: str) -> str:
    train = outputs.metrics["train"]
    line = f"wrote the {stage} adapter to {outputs.adapter} ({train['steps']} steps, train loss {train['loss']:.4f}"
    before, after = outputs.metrics.get("eval_before"), outputs.metrics.get("eval_after")
    if before and after:
        line += f", {eval_name} {before[eval_key]:.4f} -> {after[eval_key]:.4f}"
    if outputs.merged is not None:
        line += f"; merged model in {outputs.merged}"
    return line + ")"
