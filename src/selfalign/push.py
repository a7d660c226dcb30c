"""`selfalign push`: publish a run's trained LoRA adapters to the Hugging Face Hub, each with a model card that
carries what the run measured.

Which repo gets which adapter, the one rule: `--variant NAME` pushes that adapter to `--repo`; so does a run (or an
adapter folder) with a single adapter; a run with several pushes each to `REPO-VARIANT` (`me/x-sft`, `me/x-dpo`).
Everything is checked (adapters, variant, repo ids, token) before the first upload.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from selfalign.errors import SelfAlignError
from selfalign.hub import check_repo_id, hub_error, hub_token
from selfalign.models.references import EMBEDDED_ORIGINS, resolve_model_reference
from selfalign.reporting.model_card import AdapterRecords, model_card, public_name

TRAINING_KINDS = ("sft", "dpo")  # stage kinds whose output folder holds an adapter (pipeline.stages)
ADAPTER = "training"  # the adapter's folder inside a training stage's folder (pipeline.outputs.ADAPTER)
# What a user of the adapter needs; metrics.json, config.yaml and checkpoints name local paths or are bulky.
UPLOADED_FILES = (
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class TrainedAdapter:
    variant: str  # the stage name in run.json, which is also the variant name in the evaluation
    folder: Path  # the PEFT adapter folder


@dataclass(frozen=True)
class Located:
    """What RUN_DIR points to: the run folder (None for an adapter outside a run), its records and adapters."""

    run_dir: Path | None
    manifest: dict[str, Any] | None
    adapters: list[TrainedAdapter]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def stage_folder(run_dir: Path, recorded: str) -> Path:
    """A stage's folder inside `run_dir`: run.json records absolute folders (out/KIND/NAME-KEY), and the run may
    have been moved or copied since, so only their last two parts are kept."""
    parts = Path(recorded).parts
    return run_dir.joinpath(*parts[-2:])


def run_adapters(run_dir: Path, manifest: dict[str, Any]) -> list[TrainedAdapter]:
    """The trained adapters of a run, in the order its stages ran; a training stage without weights is skipped."""
    adapters = []
    for name, stage in (manifest.get("stages") or {}).items():
        recorded = (manifest.get("outputs") or {}).get(name) or stage.get("folder")
        if stage.get("kind") not in TRAINING_KINDS or not recorded:
            continue
        folder = stage_folder(run_dir, recorded) / ADAPTER
        if (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file():
            adapters.append(TrainedAdapter(name, folder))
    return adapters


def locate(path: Path) -> Located:
    """A run folder (with run.json) or an adapter folder (with adapter_config.json); an adapter folder inside a run
    is that run's variant, so its card still gets the run's evaluation."""
    if (path / "run.json").is_file():
        manifest = _read_json(path / "run.json")
        if manifest is None:
            raise SelfAlignError(f"{path / 'run.json'} is not a JSON object; is this a selfalign run folder?")
        adapters = run_adapters(path, manifest)
        if not adapters:
            raise SelfAlignError(f"{path}: the run has no trained adapter (no finished sft or dpo stage with weights)")
        return Located(path, manifest, adapters)
    if (path / "adapter_config.json").is_file():
        if not (path / "adapter_model.safetensors").is_file():
            raise SelfAlignError(f"{path}: adapter_config.json but no adapter_model.safetensors, so no trained adapter")
        for run_dir in path.resolve().parents[:3]:  # RUN/KIND/NAME-KEY/training
            manifest = _read_json(run_dir / "run.json")
            match = [a for a in run_adapters(run_dir, manifest or {}) if a.folder.resolve() == path.resolve()]
            if manifest is not None and match:
                return Located(run_dir, manifest, match)
        variant = str((_read_json(path / "metrics.json") or {}).get("stage") or "adapter")
        return Located(None, None, [TrainedAdapter(variant, path)])
    raise SelfAlignError(f"{path}: neither a run folder (no run.json) nor an adapter folder (no adapter_config.json)")


def plan_pushes(adapters: list[TrainedAdapter], repo: str, variant: str | None) -> list[tuple[TrainedAdapter, str]]:
    """(adapter, repo id) pairs by the module's rule, every repo id checked."""
    check_repo_id(repo)
    if variant is not None:
        chosen = [a for a in adapters if a.variant == variant]
        if not chosen:
            known = ", ".join(a.variant for a in adapters)
            raise SelfAlignError(f"--variant {variant}: no such trained adapter here; variants: {known}")
        return [(chosen[0], repo)]
    if len(adapters) == 1:
        return [(adapters[0], repo)]
    return [(adapter, check_repo_id(f"{repo}-{adapter.variant}")) for adapter in adapters]


def hub_base_model(adapter_config: dict[str, Any], run_model: str | None) -> str | None:
    """The Hub id the adapter applies to: the adapter's own base where that is a Hub id, else the run's model
    (an embedded model stands for the Hub model it was quantized from); None where neither names one."""
    for text in (adapter_config.get("base_model_name_or_path"), run_model):
        try:
            reference = resolve_model_reference(text) if isinstance(text, str) else None
        except SelfAlignError:  # a local path that is not on this machine: nothing to name on the Hub
            continue
        if reference is not None and reference.kind == "hub":
            return reference.location
        if reference is not None and reference.kind == "embedded" and reference.location in EMBEDDED_ORIGINS:
            return EMBEDDED_ORIGINS[reference.location]
    return None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def adapter_records(located: Located, adapter: TrainedAdapter) -> AdapterRecords:
    manifest = located.manifest
    evaluation = None
    if located.run_dir is not None and manifest is not None:
        recorded = (manifest.get("outputs") or {}).get("evaluate")
        evaluation = _read_json(stage_folder(located.run_dir, recorded) / "metrics.json") if recorded else None
    source = (
        f"run folder `{located.run_dir.name}`, stage folder `{adapter.folder.parent.name}`"
        if located.run_dir is not None
        else f"adapter folder `{adapter.folder.name}`"
    )
    return AdapterRecords(
        variant=adapter.variant,
        source=source,
        training=_read_json(adapter.folder / "metrics.json") or {},
        settings=_read_yaml(adapter.folder / "config.yaml"),
        manifest=manifest,
        evaluation=evaluation,
    )


def stage_upload(adapter: TrainedAdapter, records: AdapterRecords, repo: str, into: Path) -> list[str]:
    """Write the files of one repo into `into`: the weights and tokenizer, adapter_config.json pointing at the Hub
    base (a local base path would leak a path and load nowhere else), and the card. Returns the file names."""
    config = _read_json(adapter.folder / "adapter_config.json") or {}
    run_model = ((records.manifest or {}).get("config") or {}).get("model") or {}
    base = hub_base_model(config, run_model.get("model") or records.training.get("model"))
    original = config.get("base_model_name_or_path")
    config["base_model_name_or_path"] = base or (public_name(original) if isinstance(original, str) else original)
    (into / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for name in UPLOADED_FILES:
        if (adapter.folder / name).is_file():
            shutil.copyfile(adapter.folder / name, into / name)
    (into / "README.md").write_text(model_card(records, repo, base), encoding="utf-8")
    return sorted(p.name for p in into.iterdir())


def push(path: Path, repo: str, variant: str | None = None, private: bool = False) -> list[tuple[str, str]]:
    """Push the adapters under `path` by the module's rule; returns (variant, repo URL) per repo."""
    located = locate(path)
    if variant is not None and located.run_dir is None:
        raise SelfAlignError("--variant picks among a run's adapters; PATH is a single adapter folder")
    plan = plan_pushes(located.adapters, repo, variant)
    token = hub_token("selfalign push")

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    pushed = []
    for adapter, repo_id in plan:
        records = adapter_records(located, adapter)
        with tempfile.TemporaryDirectory(prefix="selfalign-push-") as staging:
            stage_upload(adapter, records, repo_id, Path(staging))
            try:
                url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
                message = f"selfalign push: {adapter.variant} adapter and model card"
                api.upload_folder(repo_id=repo_id, folder_path=staging, repo_type="model", commit_message=message)
            except Exception as exc:  # network, auth and repo errors arrive as many types; never echo the token
                raise hub_error(f"push of {adapter.variant} to hub repo {repo_id}", exc, token) from None
        pushed.append((adapter.variant, str(url)))
    return pushed
