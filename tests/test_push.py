"""`selfalign push` against a recording stand-in of the Hub: HfApi is the real class, only its network methods are
replaced, so the code path that runs is the one a user's push takes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.cli_runner import run_cli

TOKEN = "hf_secret_token_123"


def rate(count: int, n: int, low: float, high: float) -> dict:
    return {"rate": count / n, "low": low, "high": high, "count": count, "n": n, "abstained": 0}


def paired(difference: float, low: float, high: float, p: float, n: int = 40) -> dict:
    return {"difference": difference, "low": low, "high": high, "n": n, "variant_only": 1, "base_only": 0,
            "p_value": p}  # fmt: skip


def variant_metrics(harmless: int, refused: int, over: int, loops: int, vs_base: bool) -> dict:
    """One variant of the evaluate stage's metrics.json, in its real shape (demo8), with the keys a card reads."""
    metrics = {
        "harmless": rate(harmless, 40, 0.871, 0.996),
        "refused_harmful_detector": rate(refused, 40, 0.161, 0.428),
        "refused_harmful_judge": rate(refused, 40, 0.161, 0.428),
        "over_refusal_detector": rate(over, 40, 0.055, 0.261),
        "over_refusal_judge": rate(over, 40, 0.055, 0.261),
        "judged_harmful_benign": rate(1, 40, 0.004, 0.129),
        "judge_abstained": {"harmful": 0, "benign": 0},
        "answer_quality": {"n": 120, "loops": rate(loops, 120, 0.005, 0.059)},
        "capability": {"acc": rate(80, 100, 0.711, 0.867), "acc_norm": rate(80, 100, 0.711, 0.867), "chance": 0.25},
    }
    if vs_base:
        metrics["vs_base"] = {key: paired(0.025, 0.0, 0.075, 1.0) for key in (
            "harmless", "refused_harmful_detector", "refused_harmful_judge", "over_refusal_detector",
            "over_refusal_judge", "judged_harmful_benign")}  # fmt: skip
        metrics["capability"]["acc_norm_vs_base"] = paired(0.02, -0.05, 0.09, 0.774, n=100)
    return metrics


def write_adapter(folder: Path, stage: str) -> None:
    """A training stage's `training/` folder: a tiny PEFT adapter and the records training/common.py writes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = {"base_model_name_or_path": "/root/.cache/selfalign/models/base", "peft_type": "LORA", "r": 4,
              "lora_alpha": 8, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.q_proj.lora_A.weight": torch.zeros(4, 8)}, str(folder / "adapter_model.safetensors"))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "training_args.bin").write_bytes(b"pickle")  # must stay home: a pickle, and no use to an adapter user
    (folder / "checkpoints").mkdir()
    metrics = {
        "stage": stage, "model": "org/base-model", "data": f"{folder}/../../preferences/dataset/train.jsonl",
        "prompt_format": "plain", "quantization": "none", "examples": {"train": 65, "eval": 7, "too_long": 0},
        "start": f"SFT adapter {folder}" if stage == "dpo" else "base model",
        "train": {"loss": 0.29383, "steps": 24, "processes": 1, "tokens": 12416.0, "per_step": []},
        "eval_before": {"eval_loss": 0.6931}, "eval_after": {"eval_loss": 0.2343},
        "versions": {"torch": "2.13.0", "transformers": "5.24.0", "trl": "1.16.0", "peft": "0.21.2"},
    }  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(metrics))
    lora = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj"]}
    settings = {"model": "org/base-model", "lora": lora, stage: {"learning_rate": 5e-05, "beta": 0.1},
                "batch_size": 4, "max_length": 128, "seed": 3}  # fmt: skip
    (folder / "config.yaml").write_text(yaml.safe_dump(settings))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A finished run with sft, dpo and evaluate; run.json names the folders where the run first lived, since a
    run folder can be moved after it ran."""
    run = tmp_path / "my-run"
    where_it_ran = Path("/elsewhere/runs/my-run")
    folders = {"sft": "sft/sft-aaa", "dpo": "dpo/dpo-bbb", "evaluate": "evaluate/evaluate-ccc"}
    write_adapter(run / folders["sft"] / "training", "sft")
    write_adapter(run / folders["dpo"] / "training", "dpo")
    metrics = {
        "variants": ["base", "sft", "dpo"], "judge": "probe", "bootstrap": {"samples": 1000, "seed": 0},
        "models": {"base": variant_metrics(38, 0, 0, 33, False), "sft": variant_metrics(38, 28, 16, 11, True),
                   "dpo": variant_metrics(39, 11, 5, 2, True)},
    }  # fmt: skip
    (run / folders["evaluate"]).mkdir(parents=True)
    (run / folders["evaluate"] / "metrics.json").write_text(json.dumps(metrics))
    manifest = {
        "status": "completed", "packages": {"selfalign": "0.1.0", "peft": "0.21.2"}, "seed": 3,
        "config": {"out": str(where_it_ran), "model": {"model": "org/base-model"}},
        "stages": {name: {"folder": str(where_it_ran / f), "kind": name} for name, f in folders.items()},
        "outputs": {name: str(where_it_ran / f) for name, f in folders.items()},
    }  # fmt: skip
    (run / "run.json").write_text(json.dumps(manifest))
    return run


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record what reaches the Hub: each create_repo, and each upload_folder with the files as they were sent."""
    import huggingface_hub

    calls: list[dict] = []

    def create_repo(self, repo_id, **options):
        calls.append({"call": "create_repo", "repo_id": repo_id, "token": self.token, **options})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **options):
        folder = Path(options["folder_path"])
        files = {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        calls.append({"call": "upload_folder", "token": self.token, "files": files, **options})

    def upload_file(self, **options):
        calls.append({"call": "upload_file", **options})

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_file", upload_file)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return calls


def uploads(calls: list[dict]) -> dict[str, dict[str, bytes]]:
    return {c["repo_id"]: c["files"] for c in calls if c["call"] == "upload_folder"}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_a_run_with_two_adapters_pushes_each_to_its_own_repo_with_its_numbers(run_dir, hub, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "push", str(run_dir), "--repo", "me/gemma-safe")
    assert code == 0, err
    created = [(c["repo_id"], c["private"], c["exist_ok"], c["token"]) for c in hub if c["call"] == "create_repo"]
    assert created == [("me/gemma-safe-sft", False, True, TOKEN), ("me/gemma-safe-dpo", False, True, TOKEN)]
    assert "pushed dpo to https://huggingface.co/me/gemma-safe-dpo" in out

    files = uploads(hub)["me/gemma-safe-dpo"]
    assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"}
    weights = run_dir / "dpo/dpo-bbb/training/adapter_model.safetensors"
    assert files["adapter_model.safetensors"] == weights.read_bytes()
    # the uploaded config points at the Hub base, not at the trainer's cache folder
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "org/base-model"

    card = files["README.md"].decode()
    assert front_matter(card) == {"library_name": "peft", "base_model": "org/base-model",
                                  "tags": ["selfalign", "lora", "dpo", "harmlessness"]}  # fmt: skip
    rows: dict[str, str] = {}  # first row per name: the evaluation table comes before the differences
    for line in card.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0].removeprefix("| "), line)
    assert "97.5% [87.1, 99.6] (39/40)" in rows["dpo"] and "27.5% [16.1, 42.8] (11/40)" in rows["dpo"]
    assert "95.0% [87.1, 99.6] (38/40)" in rows["base"] and "27.5% [0.5, 5.9] (33/120)" in rows["base"]  # loops
    assert "| dpo | +2.5 [+0.0, +7.5] pts, p=1.000 (n=40)" in card and "+2.0 [-5.0, +9.0] pts, p=0.774 (n=100)" in card
    assert "| sft |" not in card  # only this variant beside the base
    assert rows["steps"] == "| steps | 24 |" and rows["examples"] == "| examples | 65 train, 7 held out |"
    assert "DPO, continuing the run's SFT adapter" in rows["method"] and "| DPO beta | 0.1 |" in card
    assert "one seed (3) on 40 prompts per set and 100 capability questions" in card
    assert "selfalign 0.1.0" in rows["versions"] and "run folder `my-run`, stage folder `dpo-bbb`" in card

    sft_card = uploads(hub)["me/gemma-safe-sft"]["README.md"].decode()
    assert front_matter(sft_card)["tags"][2] == "sft" and "28/40" in sft_card and "39/40" not in sft_card

    sent = [f.decode(errors="ignore") for repo in uploads(hub).values() for f in repo.values()]
    assert not any(str(run_dir.parent) in text or "/elsewhere" in text or "/root/" in text for text in sent)
    assert not any(TOKEN in text for text in [*sent, out, err])


def test_variant_goes_to_the_repo_itself_and_private_is_passed_on(run_dir, hub, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "push", str(run_dir), "--repo", "me/x", "--variant", "sft",
                             "--private")  # fmt: skip
    assert code == 0, err
    assert [(c["repo_id"], c["private"]) for c in hub if c["call"] == "create_repo"] == [("me/x", True)]
    assert front_matter(uploads(hub)["me/x"]["README.md"].decode())["tags"][2] == "sft"


def test_an_adapter_folder_inside_a_run_keeps_the_runs_numbers_and_one_outside_says_there_are_none(
    run_dir, hub, tmp_path, monkeypatch, capsys
):
    code, _, err = run_cli(monkeypatch, capsys, "push", str(run_dir / "dpo/dpo-bbb/training"), "--repo", "me/x")
    assert code == 0, err
    assert "97.5% [87.1, 99.6] (39/40)" in uploads(hub)["me/x"]["README.md"].decode()

    alone = shutil.copytree(run_dir / "dpo/dpo-bbb/training", tmp_path / "loose" / "adapter")
    hub.clear()
    code, _, err = run_cli(monkeypatch, capsys, "push", str(alone), "--repo", "me/y")
    assert code == 0, err
    card = uploads(hub)["me/y"]["README.md"].decode()
    assert "records no evaluation" in card and front_matter(card)["base_model"] == "org/base-model"
    assert "selfalign not recorded" in card and str(tmp_path) not in card


def _no_adapter(run: Path) -> list[str]:
    shutil.rmtree(run / "sft/sft-aaa/training")
    (run / "dpo/dpo-bbb/training/adapter_model.safetensors").unlink()
    return []


@pytest.mark.parametrize(
    ("change", "args", "message"),
    [
        (lambda run: shutil.rmtree(run / "sft") or ["push", str(run / "dpo")], None, "neither a run folder"),
        (_no_adapter, None, "the run has no trained adapter"),
        (lambda run: [], ["--repo", "me/bad--name"], "repo id 'me/bad--name' is not valid on the Hub"),
        (lambda run: [], ["--repo", "just-a-name"], "repo id 'just-a-name': expected ORG/NAME"),
        (lambda run: [], ["--variant", "rlhf"], "--variant rlhf: no such trained adapter here; variants: sft, dpo"),
        ("no token", None, "selfalign push needs a Hugging Face token in the HF_TOKEN environment variable"),
    ],
)
def test_bad_input_is_one_line_and_nothing_is_uploaded(run_dir, hub, monkeypatch, capsys, change, args, message):
    command = ["push", str(run_dir)]
    if change == "no token":
        monkeypatch.delenv("HF_TOKEN")
    else:
        command = change(run_dir) or command
    command += args if args and args[0] == "--repo" else ["--repo", "me/x", *(args or [])]
    code, out, err = run_cli(monkeypatch, capsys, *command)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert hub == []


def test_a_hub_error_is_one_line_with_the_token_masked(run_dir, hub, monkeypatch, capsys):
    import huggingface_hub

    def refuse(self, repo_id, **options):
        raise RuntimeError(f"401 Unauthorized: bad token {TOKEN} for {repo_id}\nrequest id abc")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    code, out, err = run_cli(monkeypatch, capsys, "push", str(run_dir), "--repo", "me/x", "--variant", "dpo")
    assert code == 2
    assert err.strip() == "error: push of dpo to hub repo me/x failed: 401 Unauthorized: bad token *** for me/x"
    assert TOKEN not in out + err
