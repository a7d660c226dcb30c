"""The reference experiment's configs (reference-mistral-7b, mistral-7b-helpful-mix) as shipped, and run end to end
on CPU at a tiny size.

The runs change only what makes them tiny and CPU-only; every other setting is the shipped one (the mistral-inst
format, the one-shot generate judge, sampling, the helpful mix, the reference training preset, SFT and DPO from the
base). The overrides, each for a reason:
- the model: a tiny random Mistral (or Llama with Llama-3's chat template, with the format that model needs) built
  here, for Mistral-7B-Instruct-v0.1 from the hub;
- `model.load_in_4bit=false` where 4-bit NF4 cannot load (no CUDA GPU or no bitsandbytes): there the run stops
  before its first stage with a one-line error (tested below). Where it can (scripts/gpu_check.sh on a GPU machine),
  the runs keep the shipped 4-bit setting: QLoRA through the whole loop;
- the data set: tests/fixtures/cai-conversation-harmless, a copy of the hub set's layout and columns, read through
  the same `hf:` path (`datasets.load_dataset` on a local folder), as a user with a local copy would;
- sizes: prompts, new tokens, training steps, sequence length, evaluation prompts and bootstrap samples (and, for
  the helpful mix, unfinished answers kept whole: see TINY_MIX);
- the judge's model: a random model writes no verdict (it abstains on every answer, so no pair is made), so the judge
  is a scripted model that answers in the one-shot template's format: harmful for the fixture's requests, harmless
  for refusals and everything else. The template is rendered and its verdicts parsed as in a real run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from selfalign.data.jsonl import read_jsonl
from selfalign.data.loading import read_reference_rows
from selfalign.errors import SelfAlignError
from selfalign.pipeline import preflight
from selfalign.pipeline.config import load_run_config
from selfalign.shipped_configs import shipped_config
from tests.cli.conftest import _restore_logging  # noqa: F401 - the CLI's log handler is put back after each test
from tests.cli_runner import run_cli
from tests.tiny_model import build_tiny_llama3, build_tiny_mistral

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "cai-conversation-harmless"
HUB_SET = "hf:HuggingFaceH4/cai-conversation-harmless:train_sft"
LOCAL_SET = f"hf:{FIXTURE}:train_sft"
REFERENCE_CONFIGS = ("reference-mistral-7b", "mistral-7b-helpful-mix")
TINY = [
    "preferences.prompts.0.limit=8",
    "preferences.generation.max_new_tokens=16",
    "preferences.revision.generation.max_new_tokens=16",
    "training.settings.max_steps=2",
    "training.settings.max_length=128",
    "evaluation.limit=4",
    "evaluation.capability_limit=4",
    "evaluation.generation.max_new_tokens=16",
    "evaluation.bootstrap_samples=100",
]
# The helpful mix's benign sets, smaller; and its answers kept whole: a random model writes no end of sentence and
# no EOS, so cutting an unfinished answer at its last sentence (a real model's answers end) would drop every one.
TINY_MIX = ["preferences.prompts.1.limit=4", "preferences.prompts.2.limit=4", "preferences.cut_unfinished_chosen=false"]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`datasets` writes an Arrow copy of every set it loads: keep the fixture's in the test's folder (as
    tests/data/test_loading.py does: the environment variable is read once, when `datasets` is imported)."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_mistral(tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture(scope="module")
def tiny_llama3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama3(tmp_path_factory.mktemp("tiny-llama3"))


def fixture_rows(split: str = "train_sft") -> list[dict]:
    return read_jsonl(FIXTURE / "data" / f"{split}-00000-of-00001.jsonl")


def card_columns() -> list[str]:
    card = (FIXTURE / "README.md").read_text(encoding="utf-8").split("---\n")[1]
    return [feature["name"] for feature in yaml.safe_load(card)["dataset_info"]["features"]]


def scripted_judge(model: Path) -> str:
    """The override that makes the judge a scripted model writing one-shot verdicts ('#answer:' is the template's
    prefix): 1 for an answer to one of the fixture's requests, 0 for a refusal and for anything else."""
    rules = [["RESPONSE: I'm sorry", "0 #reason: it refuses."]]
    rules += [
        [f"REQUEST: {row['init_prompt']}\n", "1 #reason: it helps with a harmful request."] for row in fixture_rows()
    ]
    judge = {"model": str(model), "backend": "scripted", "options": {"rules": rules, "default": "0 #reason: fine."}}
    return f"judge.model={json.dumps(judge)}"


# ---- as shipped ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REFERENCE_CONFIGS)
def test_a_reference_config_validates_as_shipped_and_its_columns_exist_in_the_fixture(name):
    config = load_run_config(shipped_config(name))
    assert config.model.model == "mistralai/Mistral-7B-Instruct-v0.1" and config.model.load_in_4bit
    assert config.model.prompt_format == "mistral-inst" and config.training_config.quantization == "4bit"
    hub_sets = [prompt_set for prompt_set in config.preferences.prompts if prompt_set.data.startswith("hf:")]
    assert [prompt_set.data for prompt_set in hub_sets] == [HUB_SET]
    columns = set(read_reference_rows(LOCAL_SET)[0])
    assert hub_sets[0].prompt_column in columns
    # the hub set has no id column: a named one must exist there (the configs once named `index`, which does not)
    assert "id_column" not in hub_sets[0].model_fields_set or hub_sets[0].id_column in columns


def test_the_fixture_has_the_hub_sets_columns_and_splits():
    """The columns the card lists (copied from the hub set's card), in every row of both splits; `prompt` is the
    request as `init_prompt` is, as llm-swarm's generate_dataset.py wrote them."""
    assert card_columns() == [
        "init_prompt", "init_response", "critic_prompt", "critic_response", "revision_prompt", "revision_response",
        "prompt", "messages", "chosen", "rejected",
    ]  # fmt: skip
    for split, count in (("train_sft", 32), ("test_sft", 8)):
        rows = read_reference_rows(f"hf:{FIXTURE}:{split}")
        assert len(rows) == count and all(list(row) == card_columns() for row in rows)
        assert all(row["prompt"] == row["init_prompt"] == row["chosen"][0]["content"] for row in rows)
    assert len({row["init_prompt"] for row in fixture_rows()}) == 32


def test_a_named_id_column_that_the_data_lacks_is_a_one_line_error(tmp_path):
    config = load_run_config(
        shipped_config("reference-mistral-7b"),
        [f"out={tmp_path / 'run'}", "model.load_in_4bit=false", f"preferences.prompts.0.data={LOCAL_SET}",
         "preferences.prompts.0.id_column=index"],
    )  # fmt: skip
    with pytest.raises(SelfAlignError) as error:
        preflight(config)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{LOCAL_SET}: no column 'index' (the prompt set's id_column); columns present: chosen")


def test_four_bit_without_cuda_stops_before_any_stage_in_one_line(tmp_path, monkeypatch, capsys, tiny_mistral):
    """As shipped, on a machine without CUDA or bitsandbytes: the error names the setting and how to turn it off."""
    from selfalign.models.loading import four_bit_unavailable

    if four_bit_here():
        pytest.skip("this machine can load 4-bit weights (CUDA and bitsandbytes)")
    out = tmp_path / "run"
    code, _, err = run_cli(
        monkeypatch, capsys, "run", str(shipped_config("reference-mistral-7b")), f"out={out}",
        f"model.model={tiny_mistral}", f"preferences.prompts.0.data={LOCAL_SET}",
    )  # fmt: skip
    assert code == 2  # the CLI's exit code for a SelfAlignError
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: model.load_in_4bit: true {four_bit_unavailable()}; model.load_in_4bit=false loads "
                     "full-precision weights"]  # fmt: skip
    assert not out.exists()  # no stage ran, no lock was taken


# ---- end to end, tiny ----------------------------------------------------------------------------------------


def four_bit_here() -> bool:
    from selfalign.models.loading import four_bit_unavailable

    return four_bit_unavailable() is None


def run_reference(monkeypatch, capsys, name: str, model: Path, out: Path, *overrides: str) -> dict:
    full_precision = [] if four_bit_here() else ["model.load_in_4bit=false"]
    code, stdout, err = run_cli(
        monkeypatch, capsys, "run", str(shipped_config(name)), f"out={out}", f"model.model={model}", *full_precision,
        f"preferences.prompts.0.data={LOCAL_SET}", *TINY, scripted_judge(model), *overrides,
    )  # fmt: skip
    assert code == 0, err[-2000:]
    return json.loads((out / "run.json").read_text())


def check_finished_run(manifest: dict, out: Path, prompt_format: str, helpful: bool) -> None:
    """Every stage ran and wrote what the next one reads: pairs, two adapters trained in the format, metrics."""
    assert manifest["status"] == "completed"
    assert set(manifest["outputs"]) == {"preferences", "sft", "dpo", "evaluate", "report"}  # tune_judge: null
    dataset = Path(manifest["outputs"]["preferences"]) / "dataset"
    funnel = json.loads((dataset / "funnel.json").read_text())
    assert funnel["kept"]["refusal"] >= 1, funnel["steps"]
    assert (funnel["kept"]["helpful"] >= 1) is helpful, funnel["steps"]
    pairs = read_jsonl(dataset / "train.jsonl") + read_jsonl(dataset / "eval.jsonl")
    requests = {row["init_prompt"] for row in fixture_rows()}
    refusal_pairs = [pair for pair in pairs if pair["pair_type"] == "refusal"]
    assert refusal_pairs and all(pair["prompt"] in requests for pair in refusal_pairs)
    assert all(pair["source_set"] == LOCAL_SET for pair in refusal_pairs)
    assert all(pair["chosen"].startswith("I'm sorry") for pair in refusal_pairs)  # refuse-and-explain's prefix
    for stage in ("sft", "dpo"):
        adapter = Path(manifest["outputs"][stage]) / "training"
        assert (adapter / "adapter_model.safetensors").is_file()
        metrics = json.loads((adapter / "metrics.json").read_text())
        assert metrics["prompt_format"] == prompt_format
        assert metrics["quantization"] == ("4bit-nf4" if four_bit_here() else "none")
        assert metrics["train"]["steps"] == 2 and metrics["train"]["tokens"] > 0
    evaluation = json.loads((Path(manifest["outputs"]["evaluate"]) / "metrics.json").read_text())
    assert evaluation["variants"] == ["base", "sft", "dpo"]
    assert (out / "report.md").read_text().startswith("# selfalign run report")


@pytest.mark.slow
def test_reference_mistral_7b_runs_on_a_tiny_mistral(tmp_path, monkeypatch, capsys, tiny_mistral):
    out = tmp_path / "run"
    manifest = run_reference(monkeypatch, capsys, "reference-mistral-7b", tiny_mistral, out)
    check_finished_run(manifest, out, "mistral-inst", helpful=False)


@pytest.mark.slow
def test_helpful_mix_runs_on_a_tiny_mistral(tmp_path, monkeypatch, capsys, tiny_mistral):
    out = tmp_path / "run"
    manifest = run_reference(monkeypatch, capsys, "mistral-7b-helpful-mix", tiny_mistral, out, *TINY_MIX)
    check_finished_run(manifest, out, "mistral-inst", helpful=True)


@pytest.mark.slow
def test_helpful_mix_runs_on_a_tiny_llama3_with_its_chat_template(tmp_path, monkeypatch, capsys, tiny_llama3):
    """The configs with another chat model swapped in: `model.prompt_format=chat-template` is the one more setting
    that swap needs (mistral-inst is Mistral's own format)."""
    out = tmp_path / "run"
    manifest = run_reference(
        monkeypatch, capsys, "mistral-7b-helpful-mix", tiny_llama3, out, *TINY_MIX, "model.prompt_format=chat-template"
    )
    check_finished_run(manifest, out, "chat-template", helpful=True)
