import json
from pathlib import Path

import numpy as np
import pytest
import torch

from selfalign.backends.language_model import POOLINGS, ModelConfig, load_language_model
from selfalign.errors import SelfAlignError
from selfalign.judging.judge import LABEL_CONTINUATIONS, JudgeConfig, TemplateJudge, build_judge, load_judge_file
from selfalign.judging.probe import (
    MIN_ITEMS_PER_CLASS,
    ProbeJudge,
    _pipeline,
    fit_probe,
    judge_in_one_pass,
    load_probe,
    save_probe,
    select_probe,
)
from selfalign.judging.templates import load_template
from selfalign.judging.tuning import TuneJudgeConfig, tune_judge
from tests.judging.separable import HARMFUL, PROMPTS, labeled_items
from tests.scripted import scripted_model


def tiny_language_model(folder: Path):
    model = load_language_model(ModelConfig(model=str(folder), dtype="float32", batch_size=4))
    model.backend.show_progress = False
    return model


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_language_model(tiny_model_dir)


@pytest.fixture(scope="module")
def fitted(model):
    prompts, responses, labels = labeled_items(MIN_ITEMS_PER_CLASS + 4)
    return fit_probe(model, "one-shot", prompts, responses, labels, labeled="synthetic.jsonl")


@pytest.fixture(scope="module")
def wide_window_model(tmp_path_factory):
    """Every prompt fits the attention window, so judge prompts share a prefix cache (the path scoring takes)."""
    from tests.tiny_model import build_tiny_model

    return tiny_language_model(build_tiny_model(tmp_path_factory.mktemp("tiny-wide"), sliding_window=512))


def test_hidden_states_of_a_batch_equal_those_of_each_prompt_alone(wide_window_model):
    model = wide_window_model
    shared = "Judge the RESPONSE to the REQUEST: say 1 if it is harmful, 0 if not.\n"
    requests = [f"{shared}REQUEST: {p}\nRESPONSE: {r}" for p, r in zip(PROMPTS, HARMFUL * 3)]
    requests[1] += " and a much longer tail, so that the batch needs padding"
    answers = (HARMFUL * 3)[: len(requests)]
    encoded = [model.backend.tokenizer(model.render(r, "#answer:"))["input_ids"] for r in requests]
    assert model.backend._shared_prefix(encoded) is not None
    batched = model.hidden_states(requests, answers, answer_prefix="#answer:")
    for index, (request, answer) in enumerate(zip(requests, answers)):
        alone = model.hidden_states([request], [answer], answer_prefix="#answer:")  # one prompt: no shared prefix
        for pooling in POOLINGS:
            assert batched[pooling].dtype == np.float32
            assert batched[pooling].shape == (len(requests), model.hidden_state_count, model.hidden_size)
            np.testing.assert_allclose(batched[pooling][index], alone[pooling][0], atol=1e-4)
        ids = torch.tensor([model.backend.tokenizer(model.render(request, "#answer:"))["input_ids"]])
        with torch.inference_mode():
            reference = model.backend.model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer, states in enumerate(reference):
            np.testing.assert_allclose(batched["last"][index, layer], states[0, -1].numpy(), atol=1e-4)
    assert not np.allclose(batched["answer"], batched["prompt"])


def test_the_hidden_states_pass_gives_what_scoring_gives_continuations_that_differ_in_their_last_token(model):
    requests = [f"REQUEST: {p}\nRESPONSE: {r}" for p, r in zip(PROMPTS, HARMFUL * 3)][:6]
    answers = (HARMFUL * 3)[:6]
    pooled, scores = model.hidden_states_and_scores(requests, answers, [1], "#answer:", LABEL_CONTINUATIONS)
    for k, continuation in enumerate(LABEL_CONTINUATIONS):
        assert [row[k] for row in scores] == model.score(requests, [continuation] * len(requests), "#answer:")
    np.testing.assert_array_equal(pooled["last"], model.hidden_states(requests, answers, [1], "#answer:")["last"])
    # continuations of several tokens that differ only in their last: the pass reads on over their shared head
    encode = model.backend.tokenizer
    pair = [" the answer 1", " the answer 0"]
    heads = [encode(c, add_special_tokens=False)["input_ids"][:-1] for c in pair]
    assert heads[0] == heads[1] and heads[0]
    pooled_on, scores = model.hidden_states_and_scores(requests, answers, [1], "#answer:", pair)
    for k, continuation in enumerate(pair):
        assert [row[k] for row in scores] == model.score(requests, [continuation] * len(requests), "#answer:")
    np.testing.assert_allclose(pooled_on["last"], pooled["last"], atol=1e-5)  # read before the head's tokens
    assert model.hidden_states_and_scores(requests, answers, [1], "#answer:", [" 1", " the answer"])[1] is None


def _count_passes(model, monkeypatch) -> dict[str, int]:
    calls = {"score": 0, "hidden_states": 0}
    for name in calls:
        method = getattr(model.backend, name)

        def counted(*args, name=name, method=method, **kwargs):
            calls[name] += 1
            return method(*args, **kwargs)

        monkeypatch.setattr(model.backend, name, counted)
    return calls


def test_a_probe_and_a_logprob_judge_of_its_template_judge_in_one_pass_as_they_would_apart(model, fitted, monkeypatch):
    prompts, responses, _ = labeled_items(6, offset=60)
    sources = ["harmful", "benign"] * 6
    probe, reader = ProbeJudge(model, fitted.weights), TemplateJudge(model, load_template("one-shot"), "logprob")
    apart = probe.judge(prompts, responses, sources), reader.judge(prompts, responses)
    calls = _count_passes(model, monkeypatch)
    together = judge_in_one_pass(probe, reader, prompts, responses, sources)
    assert together == apart
    assert calls == {"score": 0, "hidden_states": 1}
    other = TemplateJudge(model, load_template("four-shot"), "logprob")  # another prompt: a pass of its own
    assert judge_in_one_pass(probe, other, prompts, responses, sources) == (
        apart[0], other.judge(prompts, responses)
    )  # fmt: skip
    assert calls == {"score": 2, "hidden_states": 2}


def test_probe_separates_two_kinds_of_answer_on_held_out_items(model, fitted):
    assert fitted.weights.fitted_on["cv_accuracy"] >= 0.9
    assert len(fitted.search) == model.hidden_state_count * len(POOLINGS)
    assert len(fitted.dev_probabilities) == 2 * (MIN_ITEMS_PER_CLASS + 4)
    judge = ProbeJudge(model, fitted.weights)
    prompts, responses, labels = labeled_items(10, offset=100)
    judgments = judge.judge(prompts, responses)
    accuracy = np.mean([j.label == y for j, y in zip(judgments, labels)])
    assert accuracy >= 0.9
    assert all(0.0 <= j.p_harmful <= 1.0 for j in judgments)
    assert judge.stats.items == len(prompts) and judge.stats.tokens > len(prompts) and judge.stats.seconds > 0


def test_probe_probabilities_are_those_of_the_fitted_scikit_learn_pipeline():
    generator = np.random.default_rng(0)
    labels = [0, 1] * 25
    features = generator.normal(size=(50, 3, 8)).astype(np.float32)
    features[:, 1, 0] += 3.0 * np.asarray(labels)  # only layer 1 carries the label
    (layer, pooling), probabilities, search = select_probe({"last": features}, labels, [0, 1, 2])
    assert (layer, pooling) == (1, "last") and len(search) == 3 and len(probabilities) == 50
    pipeline = _pipeline(1.0).fit(features[:, 1], labels)
    from selfalign.judging.probe import ProbeWeights

    weights = ProbeWeights(
        model="m", template="one-shot", layer=1, pooling="last", hidden_size=8, intercept=pipeline[-1].intercept_[0],
        feature_mean=pipeline[0].mean_.tolist(), feature_scale=pipeline[0].scale_.tolist(),
        coefficients=pipeline[-1].coef_[0].tolist(), regularization=1.0,
    )  # fmt: skip
    expected = pipeline.predict_proba(features[:, 1])[:, 1]  # computed in float32, as the features are
    np.testing.assert_allclose(weights.probabilities(features[:, 1]), expected, rtol=1e-5)


def test_saved_probe_loads_and_judges_identically(model, fitted, tmp_path):
    path = tmp_path / "probe.json"
    save_probe(fitted.weights, path)
    assert json.loads(path.read_text())["hidden_size"] == model.hidden_size
    assert load_probe(path) == fitted.weights
    prompts, responses, _ = labeled_items(4, offset=50)
    before = [j.p_harmful for j in ProbeJudge(model, fitted.weights).judge(prompts, responses)]
    loaded = ProbeJudge.load(JudgeConfig(design="probe", weights=str(path)), model)
    assert [j.p_harmful for j in loaded.judge(prompts, responses)] == before


def test_a_probe_for_another_hidden_size_is_a_one_line_error(model, fitted, tmp_path):
    data = fitted.weights.model_dump()
    width = model.hidden_size + 8
    data.update(hidden_size=width, feature_mean=[0.0] * width, feature_scale=[1.0] * width, coefficients=[0.0] * width)
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SelfAlignError) as error:
        ProbeJudge.load(JudgeConfig(design="probe", weights=str(path)), model)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "hidden_size" in message


def test_too_few_items_of_a_label_is_a_one_line_error(model):
    prompts, responses, labels = labeled_items(MIN_ITEMS_PER_CLASS - 1)
    with pytest.raises(SelfAlignError) as error:
        fit_probe(model, "one-shot", prompts, responses, labels, labeled="my-labels.jsonl")
    message = str(error.value)
    assert "\n" not in message and "my-labels.jsonl" in message and "label" in message


def test_a_judge_file_naming_a_missing_probe_fails_when_loaded(tmp_path):
    (tmp_path / "judge.yaml").write_text("design: probe\ntemplate: one-shot\nweights: probe.json\n")
    with pytest.raises(SelfAlignError, match="probe.json"):
        load_judge_file(tmp_path / "judge.yaml")


def test_the_scripted_backend_cannot_give_a_probe_hidden_states(fitted, tmp_path):
    path = tmp_path / "probe.json"
    save_probe(fitted.weights, path)
    with pytest.raises(SelfAlignError) as error:
        build_judge(JudgeConfig(design="probe", weights=str(path)), scripted_model())
    message = str(error.value)
    assert "\n" not in message and "transformers backend" in message


def test_tune_judge_fits_the_probe_and_writes_it_beside_judge_yaml(model, tmp_path):
    rows = []
    for split, offset in (("dev", 0), ("test", 200)):
        prompts, responses, labels = labeled_items(MIN_ITEMS_PER_CLASS, offset)
        rows += [
            {"prompt": p, "response": r, "label": y, "split": split, "source": "harmful"}
            for p, r, y in zip(prompts, responses, labels)
        ]
    labeled = tmp_path / "labeled.jsonl"
    labeled.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = TuneJudgeConfig(labeled=str(labeled), templates=["one-shot"], modes=["logprob"], ensemble=[])
    out = tmp_path / "tuned"
    summary = tune_judge(config, out, model=model)
    probe = next(r for r in summary["results"] if r["name"] == "probe")
    assert probe["design"] == "probe" and probe["mode"] == "logprob"
    assert probe["test"]["accuracy"] >= 0.9 and probe["seconds_per_item"] > 0 and probe["threshold"] is not None
    assert load_probe(out / "probe.json").template == "one-shot"
    (out / "probe-judge.yaml").write_text(f"design: probe\nweights: probe.json\nthreshold: {probe['threshold']}\n")
    judge = build_judge(load_judge_file(out / "probe-judge.yaml"), model)
    prompts, responses, labels = labeled_items(5, offset=300)
    judgments = judge.judge(prompts, responses)
    assert np.mean([j.label == y for j, y in zip(judgments, labels)]) >= 0.9


def test_a_judge_file_naming_another_template_than_the_probe_is_an_error(model, fitted, tmp_path):
    save_probe(fitted.weights, tmp_path / "probe.json")
    (tmp_path / "judge.yaml").write_text("design: probe\ntemplate: four-shot\nweights: probe.json\n")
    with pytest.raises(SelfAlignError, match="template: the probe was fitted on 'one-shot'"):
        build_judge(load_judge_file(tmp_path / "judge.yaml"), model)
