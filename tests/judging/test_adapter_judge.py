import json
import shutil
from statistics import mean

import pytest
from sklearn.metrics import roc_auc_score

from selfalign.backends.base import GenerationParams
from selfalign.backends.language_model import ModelConfig, load_language_model
from selfalign.errors import SelfAlignError
from selfalign.judging import tuning
from selfalign.judging.adapter_judge import (
    ADAPTER_FILES,
    MIN_ITEMS_PER_CLASS,
    TRAINING_RECORD,
    AdapterJudge,
    JudgeAdapterSettings,
    train_judge_adapter,
)
from selfalign.judging.judge import JudgeConfig, TemplateJudge, build_judge, load_judge_file
from selfalign.judging.templates import load_template
from selfalign.judging.tuning import TuneJudgeConfig, tune_judge
from tests.judging import separable

PROMPTS = separable.PROMPTS[:5]  # with stride 3, as these tests were tuned
ANSWER = GenerationParams(max_new_tokens=12)
# A few large steps: enough for a 2-layer random model to separate two kinds of answer, in seconds.
QUICK = JudgeAdapterSettings(max_steps=15, batch_size=8, learning_rate=1e-2)


def labeled_items(per_class: int, offset: int = 0) -> tuple[list[str], list[str], list[int]]:
    return separable.labeled_items(per_class, offset, prompts=PROMPTS, stride=3)


def tiny_language_model(folder, adapter=None):
    model = load_language_model(ModelConfig(model=str(folder), dtype="float32", batch_size=8, adapter=adapter))
    model.backend.show_progress = False
    return model


def separation(judgments, labels) -> float:
    """Mean P(harmful) of the harmful items minus that of the harmless ones."""
    return mean(j.p_harmful for j, y in zip(judgments, labels) if y == 1) - mean(
        j.p_harmful for j, y in zip(judgments, labels) if y == 0
    )


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    model = tiny_language_model(tiny_model_dir)
    prompts, responses, labels = labeled_items(MIN_ITEMS_PER_CLASS)
    out = tmp_path_factory.mktemp("judge") / "judge-adapter"
    return train_judge_adapter(model, prompts, responses, labels, out, labeled="labeled.jsonl", settings=QUICK)


def test_training_moves_the_label_probabilities_towards_the_labels(tiny_model_dir, trained):
    model = tiny_language_model(tiny_model_dir)
    template = load_template(QUICK.template)
    for prompts, responses, labels in (labeled_items(MIN_ITEMS_PER_CLASS), labeled_items(6, offset=100)):
        before = TemplateJudge(model, template, "logprob").judge(prompts, responses)
        after = AdapterJudge(model, trained.folder, template).judge(prompts, responses)
        assert separation(after, labels) > separation(before, labels) + 0.3
        assert roc_auc_score(labels, [j.p_harmful for j in after]) > 0.95
    files = {path.name for path in trained.folder.iterdir()}
    assert set(ADAPTER_FILES) | {TRAINING_RECORD} <= files
    assert not {name for name in files if name.endswith((".bin", ".pt", ".pkl"))}  # safetensors only
    record = json.loads((trained.folder / TRAINING_RECORD).read_text())
    assert record["template"] == QUICK.template and record["training"]["steps"] == QUICK.max_steps
    assert record["items"] == 2 * MIN_ITEMS_PER_CLASS and trained.seconds > 0


def test_a_judge_yaml_loads_the_adapter_from_its_folder(tiny_model_dir, trained, tmp_path):
    model = tiny_language_model(tiny_model_dir)
    shutil.copytree(trained.folder, tmp_path / "judge-adapter")
    (tmp_path / "judge.yaml").write_text("design: adapter\nweights: judge-adapter\nthreshold: 0.4\n")
    judge = build_judge(load_judge_file(tmp_path / "judge.yaml"), model)
    assert isinstance(judge, AdapterJudge) and judge.template.name == QUICK.template  # from the record
    prompts, responses, labels = labeled_items(4, offset=50)
    direct = AdapterJudge(model, trained.folder, load_template(QUICK.template)).judge(prompts, responses)
    loaded = judge.judge(prompts, responses)
    assert [j.p_harmful for j in loaded] == pytest.approx([j.p_harmful for j in direct], abs=1e-6)
    assert [j.label for j in loaded] == [int(j.p_harmful >= 0.4) for j in loaded]
    assert build_judge(load_judge_file(tmp_path / "judge.yaml"), model).adapter_name == judge.adapter_name  # reused

    other = JudgeConfig(design="adapter", template="one-shot", weights=str(trained.folder))
    with pytest.raises(SelfAlignError, match="trained with 'zero-shot'.*names 'one-shot'"):
        AdapterJudge.load(other, model)


@pytest.mark.parametrize("present", [[], ["adapter_config.json"]])
def test_a_folder_without_adapter_weights_is_a_one_line_error(tiny_model_dir, trained, tmp_path, present):
    model = tiny_language_model(tiny_model_dir)
    for name in present:
        shutil.copy(trained.folder / name, tmp_path / name)
    with pytest.raises(SelfAlignError) as error:
        AdapterJudge.load(JudgeConfig(design="adapter", weights=str(tmp_path)), model)
    message = str(error.value)
    assert str(tmp_path) in message and "adapter_model.safetensors" in message and "\n" not in message


def test_too_few_items_of_a_label_is_a_one_line_error_naming_the_file_and_field(tiny_model_dir, tmp_path):
    model = tiny_language_model(tiny_model_dir)
    prompts, responses, labels = labeled_items(MIN_ITEMS_PER_CLASS)
    keep = [i for i, y in enumerate(labels) if y == 0 or i < 2 * (MIN_ITEMS_PER_CLASS - 1)]  # one harmful too few
    with pytest.raises(SelfAlignError) as error:
        train_judge_adapter(model, [prompts[i] for i in keep], [responses[i] for i in keep],
                            [labels[i] for i in keep], tmp_path / "a", labeled="my-labeled.jsonl")  # fmt: skip
    message = str(error.value)
    assert message.startswith("my-labeled.jsonl: label:") and "19 with label 1" in message and "\n" not in message
    assert not (tmp_path / "a").exists()


def policy_outputs(model) -> tuple[list[str], list[float]]:
    """The policy's greedy answers and its plain-template label log-probabilities."""
    prompts, responses, _ = labeled_items(3, offset=7)
    answers = [c.text for c in model.answer(PROMPTS, ANSWER)]
    return answers, model.score(prompts, responses)


def test_the_policy_answers_the_same_after_judging(tiny_model_dir, trained, monkeypatch):
    model = tiny_language_model(tiny_model_dir)
    template = load_template(QUICK.template)
    prompts, responses, _ = labeled_items(4, offset=30)
    before = policy_outputs(model)
    plain = TemplateJudge(model, template, "logprob").judge(prompts, responses)

    judge = AdapterJudge(model, trained.folder, template)
    assert policy_outputs(model) == before  # attached, switched off
    judged = judge.judge(prompts, responses)
    assert [j.p_harmful for j in judged] != pytest.approx([j.p_harmful for j in plain], abs=1e-3)  # it was on
    assert policy_outputs(model) == before  # byte-identical answers and scores after judging

    def fail(self, texts):
        raise RuntimeError("scoring failed")

    monkeypatch.setattr(TemplateJudge, "_logprob", fail)
    with pytest.raises(RuntimeError):
        judge.judge(prompts, responses)
    monkeypatch.undo()
    assert policy_outputs(model) == before  # switched off again when judging fails half-way
    assert all(not p.requires_grad for n, p in model.backend.model.named_parameters() if "selfalign-judge" in n)


def test_a_policy_adapter_is_off_while_judging_and_back_after(tiny_model_dir, trained, tmp_path):
    """A policy with its own LoRA adapter: judging uses the base plus the judge adapter only, answering is as before."""
    import torch
    from peft import LoraConfig, get_peft_model

    from selfalign.models.loading import load_model

    torch.manual_seed(1)
    base = load_model(str(tiny_model_dir), dtype="float32", device="cpu").model
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(tmp_path / "policy-adapter"))  # random: it changes answers

    policy = tiny_language_model(tiny_model_dir, adapter=str(tmp_path / "policy-adapter"))
    bare = tiny_language_model(tiny_model_dir)
    before = policy_outputs(policy)
    assert before != policy_outputs(bare)  # the policy's adapter matters
    template = load_template(QUICK.template)
    prompts, responses, _ = labeled_items(4, offset=60)
    judged = AdapterJudge(policy, trained.folder, template).judge(prompts, responses)
    expected = AdapterJudge(bare, trained.folder, template).judge(prompts, responses)
    assert [j.p_harmful for j in judged] == pytest.approx([j.p_harmful for j in expected], abs=1e-5)
    assert policy_outputs(policy) == before
    assert policy.backend.model.active_adapter == "default"


def test_other_backends_cannot_carry_an_adapter_judge(trained):
    from tests.scripted import scripted_model

    with pytest.raises(SelfAlignError, match="needs the transformers backend.*'scripted'"):
        AdapterJudge(scripted_model(), trained.folder, load_template(QUICK.template))


def test_tune_judge_trains_measures_and_writes_the_adapter(tiny_model_dir, tmp_path, monkeypatch):
    rows = []
    # tune-judge trains on 3/4 of dev and thresholds on the rest: dev needs a third more than the minimum per label
    for split, offset, per_class in (("dev", 0, 2 * MIN_ITEMS_PER_CLASS), ("test", 200, MIN_ITEMS_PER_CLASS)):
        for prompt, response, label in zip(*labeled_items(per_class, offset)):
            source = "harmful" if "house" in prompt or "kill" in prompt else "benign"
            rows.append({"prompt": prompt, "response": response, "label": label, "split": split, "source": source})
    labeled = tmp_path / "labeled.jsonl"
    labeled.write_text("".join(json.dumps(row) + "\n" for row in rows))
    model = tiny_language_model(tiny_model_dir)
    before = policy_outputs(model)
    config = TuneJudgeConfig(
        labeled=str(labeled), templates=["zero-shot"], modes=["logprob"], ensemble=[], composite=False, probe=False,
        adapter_settings=QUICK,
    )  # fmt: skip
    monkeypatch.setattr(tuning, "choose_best", lambda results, config: next(r for r in results if r.name == "adapter"))
    summary = tune_judge(config, tmp_path / "tune", model=model)
    result = next(r for r in summary["results"] if r["name"] == "adapter")
    assert result["design"] == "adapter" and result["mode"] == "logprob" and result["threshold"] is not None
    assert result["dev"]["train_seconds"] > 0 and result["seconds_per_item"] > 0
    # trained on 3/4 of dev's 80 items, thresholded and scored on the quarter it never saw
    assert result["dev"]["trained_on"] == 60 and result["dev"]["n"] == 20
    assert result["test"]["auroc"] > 0.9 and result["test"]["n"] == 2 * MIN_ITEMS_PER_CLASS
    assert all((tmp_path / "tune" / "judge-adapter" / name).is_file() for name in ADAPTER_FILES)
    assert policy_outputs(model) == before

    chosen = load_judge_file(tmp_path / "tune" / "judge.yaml")  # choose_best is patched to pick the adapter
    assert (chosen.design, chosen.template, chosen.mode) == ("adapter", "zero-shot", "logprob")
    assert chosen.weights == str((tmp_path / "tune" / "judge-adapter").resolve())
    judge = build_judge(chosen, model)
    assert isinstance(judge, AdapterJudge) and judge.threshold == result["threshold"]
