import json
import re
import shlex
from pathlib import Path

import pytest
from tests.cli_runner import run_cli
from tests.preferences.conftest import read_jsonl, scenario_config, scenario_models

from selfalign.errors import SelfAlignError
from selfalign.preferences.build import drop_degenerate, end_chosen_at_sentence, split_pairs
from selfalign.preferences.config import PreferencesConfig, load_preferences_config
from selfalign.preferences.pipeline import run_preferences
from selfalign.preferences.respond import load_prompt_items

ROOT = Path(__file__).resolve().parents[2]

SCRIPTED = """\
policy:
  backend: scripted
  prompt_format: plain
  options:
    rules:
      - ["Rewrite the reply", "It would hurt people, so please do not do this."]
      - ["Refuse the following request", "Please ask me something else."]
    default: "Here is a complete answer."
judge: {design: composite}
prompts:
  - {data: "builtin:redteam:train", source: harmful, limit: 3}
  - {data: "builtin:benign-sensitive:train", source: benign, limit: 2}
  - {data: "builtin:helpful:train", source: benign, limit: 2}
chunk_size: 2
"""


def test_cli_runs_the_whole_engine_from_a_yaml_config(tmp_path, monkeypatch, capsys):
    (tmp_path / "c.yaml").write_text(SCRIPTED)
    code, out, err = run_cli(monkeypatch, capsys, "preferences", "--config", str(tmp_path / "c.yaml"), "--out",
                             str(tmp_path / "run"), "seed=3")  # fmt: skip
    assert code == 0, err
    assert re.search(r"wrote 6 pairs \(3 refusal, 3 helpful\) to .*dataset", out), out
    assert (tmp_path / "run" / "config.yaml").exists() and "seed: 3" in (tmp_path / "run" / "config.yaml").read_text()
    rows = read_jsonl(tmp_path / "run" / "dataset" / "train.jsonl") + read_jsonl(
        tmp_path / "run" / "dataset" / "eval.jsonl"
    )
    assert {row["source_set"] for row in rows} == {"redteam:train", "benign-sensitive:train", "helpful:train"}


def test_cli_single_stages_in_order(tmp_path, monkeypatch, capsys):
    (tmp_path / "c.yaml").write_text(SCRIPTED)
    args = ["--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]
    code, _, err = run_cli(monkeypatch, capsys, "judge", *args)
    assert code == 2 and "responses.jsonl: not found; run the stage that writes it first" in err
    for stage, rows in (("respond", 7), ("judge", 7), ("revise", 3)):
        code, out, err = run_cli(monkeypatch, capsys, stage, *args)
        assert code == 0, err
        assert out.startswith(f"{stage}: {rows} rows in "), out


@pytest.mark.parametrize(
    ("yaml_text", "extra", "message"),
    [
        ("policy: {modle: x}\n", [], r"unknown key 'policy.modle'"),
        ("helpful_mix: 1.5\n", [], r"invalid value for 'helpful_mix'"),
        ("prompts: []\n", [], r"invalid value for 'prompts'"),
        ("generation: {seed: 3}\n", [], r"generation.seed: set the top-level seed instead"),
        ("revision: {strategy: polite}\n", [], r"unknown revision strategy 'polite'"),
        ("seed: 1\nseed: 2\n", [], r"duplicate key 'seed'"),
        (None, [], r"config file not found"),
        ("judge_results: nope.json\n", [], r"nope.json: cannot read tune-judge results"),
        ("{}\n", ["n_attempts=3"], r"unknown key 'n_attempts'"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, yaml_text, extra, message):
    path = tmp_path / "c.yaml"
    if yaml_text is not None:
        path.write_text(yaml_text)  # each fails before any model is loaded
    code, out, err = run_cli(monkeypatch, capsys, "preferences", "--config", str(path), "--out", str(tmp_path / "o"),
                             *extra)  # fmt: skip
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "o" / "dataset").exists()


def test_judge_file_from_tune_judge_with_its_measured_accuracy(tmp_path):
    (tmp_path / "judge.yaml").write_text("design: single\ntemplate: one-shot\nmode: logprob\nthreshold: 0.42\n")
    result = {"name": "one-shot/logprob", "test": {"accuracy": 0.75, "f1": 0.7, "auroc": 0.81, "abstained": 1, "n": 24}}
    (tmp_path / "results.json").write_text(json.dumps({"labeled": "builtin:judge-labeled", "results": [result]}))
    (tmp_path / "c.yaml").write_text(f"judge_file: {tmp_path / 'judge.yaml'}\n")
    config = load_preferences_config(tmp_path / "c.yaml")
    assert (config.judge.template, config.judge.threshold) == ("one-shot", 0.42)
    assert config.judge_results == str(tmp_path / "results.json")

    scenario = scenario_config(tmp_path)
    scenario.judge, scenario.judge_results = (
        config.judge.model_copy(update={"min_label_mass": 0.01}),
        config.judge_results,
    )
    card = (run_preferences(scenario, tmp_path / "out", scenario_models(scenario)) / "README.md").read_text()
    assert (
        "| judge accuracy | accuracy 75.0%, F1 70.0%, AUROC 0.810, abstained 1/24 on the test split of builtin:" in card
    )

    (tmp_path / "c.yaml").write_text(f"judge_file: {tmp_path / 'judge.yaml'}\njudge: {{template: four-shot}}\n")
    with pytest.raises(SelfAlignError, match="judge_file is given, so set no judge.template"):
        load_preferences_config(tmp_path / "c.yaml")


def test_prompt_limits_are_seeded_samples_with_stable_keys():
    config = PreferencesConfig(prompts=[{"data": "builtin:redteam:train", "source": "harmful", "limit": 10}])
    items = load_prompt_items(config)
    assert len(items) == 10 and items == load_prompt_items(config)
    assert all(item["key"].startswith("redteam:train/redteam-train-") and item["category"] for item in items)
    assert len({item["category"] for item in items}) > 2  # a sample over the set, not its first rows
    other = load_prompt_items(config.model_copy(update={"seed": 1}))
    assert [i["key"] for i in other] != [i["key"] for i in items]


def test_degenerate_pairs_never_pass_and_are_counted():
    def pair(key, chosen, rejected, prompt="p", pair_type="helpful"):
        return {"key": key, "prompt": prompt, "chosen": chosen, "rejected": rejected, "pair_type": pair_type}

    pairs = [
        pair("a", "good", "bad"), pair("b", "", "bad"), pair("c", "good", "  "), pair("d", "Same  text", "same text"),
        pair("e", "good", "bad"), pair("f", "good", "bad", prompt="other"), pair("g", "x", "y", pair_type="refusal"),
    ]  # fmt: skip
    kept, dropped = drop_degenerate(pairs)
    assert [p["key"] for p in kept] == ["a", "f", "g"]
    assert dict(dropped) == {
        ("chosen empty", "helpful"): 1, ("rejected empty", "helpful"): 1, ("chosen equals rejected", "helpful"): 1,
        ("duplicate", "helpful"): 1,
    }  # fmt: skip


def test_a_chosen_answer_cut_to_under_3_words_is_dropped_and_counted():
    def pair(key, chosen, finish_reason):
        return end_chosen_at_sentence({"key": key, "prompt": key, "chosen": chosen, "rejected": "No.",
                                       "pair_type": "helpful", "chosen_finish_reason": finish_reason})  # fmt: skip

    pairs = [pair("a", "Steps:\n1. Open the", "length"), pair("b", "I can't. Sorry about th", "length"),
             pair("c", "Steps:\n1. Open the", "stop"), pair("d", "Fine as it", None)]  # fmt: skip
    assert [(p["chosen"], p["chosen_cut"]) for p in pairs] == [
        ("Steps:", True),
        ("I can't.", True),
        ("Steps:\n1. Open the", False),
        ("", True),
    ]
    kept, dropped = drop_degenerate(pairs)
    assert [p["key"] for p in kept] == ["b", "c"]
    assert dict(dropped) == {("chosen cut off before a sentence of 3+ words ended", "helpful"): 2}


def test_split_is_seeded_and_per_pair_type():
    pairs = [{"key": f"k{i}", "pair_type": "refusal" if i % 3 else "helpful"} for i in range(30)]
    train, held_out = split_pairs(pairs, 0.2, seed=5)
    assert len(held_out) == 6 and len(train) == 24
    assert sum(p["pair_type"] == "helpful" for p in held_out) == 2  # 20% of the 10 helpful pairs
    assert (train, held_out) == split_pairs(pairs, 0.2, seed=5)
    assert held_out != split_pairs(pairs, 0.2, seed=6)[1]


def test_push_to_hub_uses_the_token_from_the_environment_and_never_writes_it(tmp_path, monkeypatch, capsys):
    import datasets
    import huggingface_hub

    pushed = {}

    def push(self, repo, token):
        pushed.update(repo=repo, token=token)

    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", push)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_file", lambda self, **kw: pushed.update(card=kw["path_in_repo"]))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: None)
    (tmp_path / "c.yaml").write_text(SCRIPTED)
    args = ["preferences", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    code, _, err = run_cli(monkeypatch, capsys, *args, "--push-to-hub", "me/pairs")
    assert code == 2 and "needs a Hugging Face token in the HF_TOKEN environment variable" in err
    assert not (tmp_path / "run").exists()  # refused before any work

    monkeypatch.setenv("HF_TOKEN", "hf_secret_123")
    code, out, err = run_cli(monkeypatch, capsys, *args, "--push-to-hub", "me/pairs")
    assert code == 0, err
    assert pushed == {"repo": "me/pairs", "token": "hf_secret_123", "card": "README.md"}
    written = [p.read_text(errors="ignore") for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert not any("hf_secret_123" in text for text in [*written, out, err])


def test_demo_config_validates_and_its_command_parses(monkeypatch):
    import typer

    from selfalign.cli.preferences import preferences

    monkeypatch.chdir(ROOT)
    path = ROOT / "configs" / "preferences-demo.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# selfalign preferences ")
    words = shlex.split(first.removeprefix("# "))
    assert words[:2] == ["selfalign", "preferences"] and "--config" in words
    assert words[words.index("--config") + 1] == "configs/preferences-demo.yaml"
    app = typer.Typer()
    app.command()(preferences)
    params = typer.main.get_command(app).make_context("preferences", words[2:]).params
    config = load_preferences_config(params["config"], params["overrides"])
    limits = {p.source: 0 for p in config.prompts}
    for p in config.prompts:
        limits[p.source] += p.limit
    assert limits == {"harmful": 40, "benign": 40}
    assert config.policy.model == "embedded:gemma-3-270m" and "logprob" in config.judge.describe()
