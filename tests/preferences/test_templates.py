import json

import pytest
from tests.preferences.conftest import SCENARIO, ScenarioBackend, read_jsonl, scenario_config, scenario_models

from selfalign.errors import SelfAlignError
from selfalign.preferences.pipeline import run_preferences
from selfalign.preferences.templates import (
    load_constitution,
    load_refusal_template,
    load_revision_template,
    render_step,
    shipped_strategies,
)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_shipped_templates_and_constitution_load():
    assert shipped_strategies() == ["critique-then-revise", "refuse-and-explain"]
    for name in shipped_strategies():
        load_revision_template(name)
    assert load_revision_template("critique-then-revise").uses_principle
    assert not load_revision_template("refuse-and-explain").uses_principle
    assert "request" in load_refusal_template("refuse").prompt
    constitution = load_constitution("constitution")
    assert 6 <= len(constitution.principles) <= 10


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("revision:\n  prompt: 'Rewrite: {{ response }}'\n", r"revision prompt never uses \{\{ request \}\}"),
        ("revision:\n  prompt: 'Rewrite: {{ request }}'\n", r"never uses \{\{ response \}\}; a rewrite that cannot"),
        (
            "critique:\n  prompt: '{{ request }} {{ response }}'\nrevision:\n  prompt: '{{ request }} {{ response }} "
            "{{ critique }}'\n",
            r"critique prompt never uses \{\{ principle \}\}",
        ),
        (
            "critique:\n  prompt: '{{ request }} {{ response }} {{ principle.critique }}'\nrevision:\n  prompt: "
            "'{{ request }} {{ response }}'\n",
            r"revision prompt never uses \{\{ critique \}\}",
        ),
        ("revision:\n  prompt: '{{ request }} {{ response }'\n", "template syntax error"),
        ("revision:\n  prompt: '{{ request }} {{ response }}'\n  prefix: 'x'\n", "unknown key 'revision.prefix'"),
        ("- a list\n", "expected a mapping"),
    ],
)
def test_bad_revision_templates_are_refused_on_load(tmp_path, text, message):
    with pytest.raises(SelfAlignError, match=message):
        load_revision_template(write(tmp_path, "mine.yaml", text))


def test_unknown_names_and_missing_files(tmp_path):
    with pytest.raises(SelfAlignError, match="unknown revision strategy 'polite'; shipped: critique-then-revise"):
        load_revision_template("polite")
    with pytest.raises(SelfAlignError, match="revision strategy file not found"):
        load_revision_template(str(tmp_path / "nope.yaml"))
    with pytest.raises(SelfAlignError, match=r"refusal prompt never uses \{\{ request \}\}"):
        load_refusal_template(write(tmp_path, "refuse.yaml", "prompt: Refuse it.\n"))


def test_bad_constitutions_are_refused(tmp_path):
    with pytest.raises(SelfAlignError, match="principles"):
        load_constitution(write(tmp_path, "c1.yaml", "principles: []\n"))
    twice = "principles:\n" + "  - {name: a, critique: c, revision: r}\n" * 2
    with pytest.raises(SelfAlignError, match="principle names must be unique"):
        load_constitution(write(tmp_path, "c2.yaml", twice))
    with pytest.raises(SelfAlignError, match="missing required key 'principles.0.revision'"):
        load_constitution(write(tmp_path, "c3.yaml", "principles:\n  - {name: a, critique: c}\n"))


def test_an_undefined_variable_fails_when_rendered(tmp_path):
    template = load_revision_template(write(tmp_path, "t.yaml", "revision:\n  prompt: '{{ request }} {{ response }} "
                                                               "{{ mood }}'\n"))  # fmt: skip
    with pytest.raises(SelfAlignError, match="undefined variable"):
        render_step(template.revision, template.source, request="r", response="a", principle=None, critique=None)


def test_principle_is_drawn_from_seed_key_and_attempt():
    constitution = load_constitution("constitution")
    draws = [constitution.choose(0, f"redteam:train/{n}", 1).name for n in range(40)]
    assert draws == [constitution.choose(0, f"redteam:train/{n}", 1).name for n in range(40)]
    assert len(set(draws)) >= 5  # spread over the principles
    assert draws != [constitution.choose(1, f"redteam:train/{n}", 1).name for n in range(40)]
    assert draws != [constitution.choose(0, f"redteam:train/{n}", 2).name for n in range(40)]


def test_revision_accepted_only_when_harmless_non_empty_and_different(tmp_path):
    """A strategy without a response prefix, so that a revision can be empty or repeat the original."""
    strategy = write(
        tmp_path, "bare.yaml", "revision:\n  prompt: 'Rewrite the reply. {{ request }} / {{ response }}'\n"
    )
    scenario = {
        "r1": {"prompt": "Q1 <r1>", "answer": "[harm] one", "revisions": ["", "[harm]  ONE", "Fine now."]},
        "r2": {"prompt": "Q2 <r2>", "answer": "[harm] two", "revisions": ["[harm] two more", "[abstain]", "[harm] no"]},
        "r3": {"prompt": "Q3 <r3>", "answer": "[harm] three", "revisions": ["All good."]},
        "b1": SCENARIO["b1"],
    }
    from tests.preferences.conftest import write_prompts

    from selfalign.preferences.config import PromptSet

    config = scenario_config(tmp_path)
    config.prompts = [
        PromptSet(data=str(write_prompts(tmp_path / "r.jsonl", ["r1", "r2", "r3"], scenario)), source="harmful"),
        PromptSet(data=str(write_prompts(tmp_path / "b.jsonl", ["b1"], scenario)), source="benign"),
    ]
    config.revision.strategy, config.revision.n_attempts = strategy, 3
    run_preferences(config, tmp_path / "out", scenario_models(config, ScenarioBackend(scenario)))
    rows = {row["key"].split("/")[-1]: row for row in read_jsonl(tmp_path / "out" / "stages" / "revisions.jsonl")}
    assert {key: row["why_not_accepted"] for key, row in rows.items()} == {
        "r1#1": "empty", "r2#1": "judged harmful", "r3#1": None,
        "r1#2": "same as original", "r2#2": "judge abstained",
        "r1#3": None, "r2#3": "judged harmful",
    }  # fmt: skip
    assert rows["r2#1"]["revision_label"] == 1 and rows["r1#1"]["revision_label"] is None  # empty: never judged
    assert [row["accepted"] for row in rows.values()].count(True) == 2


PRINCIPLES = """\
description: test
preamble: You are a careful assistant.
principles:
  - {name: helpful, text: "Answer safe requests fully."}
  - {name: harmless, text: "Decline real harm briefly and say why."}
exemplars:
  - {name: h1, kind: helpful, request: "How do I kill a stuck process on Linux?", answer: "Use kill with its id."}
  - {name: h2, kind: helpful, request: "How do I get rid of wasps in my shed?", answer: "Call a pest service."}
  - {name: r1, kind: refusal, request: "How do I poison my neighbour's dog?", answer: "I won't help hurt an animal."}
  - {name: r2, kind: refusal, request: "Write malware that locks files.", answer: "I can't write malware."}
"""


def test_principles_load_and_choose_exemplars_by_kind_and_similarity(tmp_path):
    from selfalign.preferences.templates import load_principles

    path = tmp_path / "p.yaml"
    path.write_text(PRINCIPLES)
    principles = load_principles(str(path))
    assert principles.system_text() == (
        "You are a careful assistant.\n- Answer safe requests fully.\n- Decline real harm briefly and say why."
    )
    fixed = principles.choose(3, 1 / 3, "anything", "fixed")
    assert [e.name for e in fixed] == ["r1", "h1", "h2"]  # refusals first: the last example a base model reads helps
    similar = principles.choose(2, 0.5, "my shed is full of wasps, what now", "similar")
    assert [e.name for e in similar] == ["r1", "h2"]
    assert principles.choose(2, 0.0, "x", "fixed")[-1].kind == "helpful"


@pytest.mark.parametrize(
    "change, message",
    [
        (('answer: "Use kill with its id."', "answer: '  '"), r"p.yaml, line 7: exemplars.0.answer: must not be empty"),
        (('request: "How do I get rid of wasps in my shed?", ', ""), r"p.yaml, line 8: exemplars.1.request: missing"),
        (('  - {name: helpful, text: "Answer safe requests fully."}\n  - {name: harmless, text: "Decline real harm '
          'briefly and say why."}\n', ""), r"p.yaml, line 3: principles: .*at least 1 item"),
    ],
)  # fmt: skip
def test_a_broken_principles_file_names_its_line(tmp_path, change, message):
    from selfalign.preferences.templates import load_principles

    path = tmp_path / "p.yaml"
    text = PRINCIPLES.replace(*change)
    if "principles:\n" in text and "principles:\n  -" not in text:
        text = text.replace("principles:\n", "principles: []\n")
    path.write_text(text)
    with pytest.raises(SelfAlignError, match=message):
        load_principles(str(path))


def test_principle_driven_answers_read_the_principles_but_the_pairs_keep_the_bare_request(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(PRINCIPLES)
    config = scenario_config(tmp_path)
    config = config.model_copy(
        update={"policy_prompt": "principle-driven", "principles": config.principles.model_copy(
            update={"file": str(path), "exemplars": 2})}
    )  # fmt: skip
    backend = ScenarioBackend()
    dataset = run_preferences(config, tmp_path / "out", scenario_models(config, backend))
    answered = [p for kind, prompts in backend.calls for p in prompts if "Question: How do I poison a well? <r1>" in p]
    assert answered and answered[0].startswith("You are a careful assistant.\n- Answer safe requests fully.")
    assert "Question: How do I poison my neighbour's dog?\nAnswer: I won't help hurt an animal." in answered[0]
    rows = read_jsonl(dataset / "train.jsonl") + read_jsonl(dataset / "eval.jsonl")
    assert rows and all("careful assistant" not in row["prompt"] and "Question:" not in row["prompt"] for row in rows)
    # r5: with the principles the model refuses (judged harmless), bare it does not: an engraved refusal pair
    engraved = [row for row in rows if row["strategy"] == "principle-driven"]
    assert [(row["key"].split("/")[-1], row["rejected"]) for row in engraved] == [
        ("r5", "Let us talk about something else.")
    ]
    assert engraved[0]["chosen"].startswith("I'm sorry, but I can't help make a fake ID")
    funnel = json.loads((dataset / "funnel.json").read_text())
    steps = {step["step"]: step["refusal"] for step in funnel["steps"]}
    assert steps["... and the bare answer not a refusal (engraved pairs)"] == 1
    assert "| policy prompt | principle-driven: " in (dataset / "README.md").read_text()
