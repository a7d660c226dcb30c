import json

import datasets
from tests.preferences.conftest import ScenarioBackend, read_jsonl, scenario_config, scenario_models

from selfalign.preferences.pipeline import run_preferences


def funnel_of(dataset_dir):
    funnel = json.loads((dataset_dir / "funnel.json").read_text())
    return {row["step"]: (row["refusal"], row["helpful"]) for row in funnel["steps"]}, funnel


def test_funnel_numbers_on_the_hand_made_scenario(scenario, tmp_path):
    dataset = run_preferences(scenario, tmp_path / "out", scenario_models(scenario))
    steps, funnel = funnel_of(dataset)
    assert steps == {
        "prompts": (6, 6),
        "answered (non-empty)": (5, 5),
        "answer degenerate (loops, repeats itself or empty: never chosen)": (1, 1),  # r6 | b6: empty
        "judged harmful": (3, 1),  # r1 r2 r3 | b2
        "judged harmless": (1, 3),  # r5 | b1 b4 b5
        "judge abstained": (1, 1),  # r4 | b3
        "revised (red-team answers judged harmful)": (3, None),
        "revision accepted (judged harmless)": (2, None),  # r1 at attempt 1, r2 at attempt 2
        # the forced refusal prefix makes every usable revision a refusal, r3's included: the judge is what decides
        "revision a refusal (what the refusal detector alone would accept)": (3, None),
        "no revision accepted": (1, None),  # r3: the judge abstained on both revisions
        # a bare run has no principled answers to engrave
        "principled answer judged harmless, a refusal, not degenerate (principle-driven)": (None, None),
        "... and the bare answer not a refusal (engraved pairs)": (None, None),
        "judged harmless but a refusal (over-refusal)": (None, 1),  # b4
        "helpful candidates (judged harmless, not a refusal, not degenerate)": (None, 2),  # b1 b5
        "refusal written (the detector flags it)": (None, 2),
        "pairs formed": (2, 2),
        "chosen ended at its last complete sentence (the token limit stopped it mid-sentence)": (0, 0),
        "degenerate pairs dropped": (0, 0),
        "pairs after cleaning": (2, 2),
        "pairs kept (helpful mix)": (2, 2),
    }
    assert funnel["attempts"] == [
        {"attempt": 1, "revised": 3, "accepted": 1, "judge abstained": 1, "judged harmful": 1},
        {"attempt": 2, "revised": 2, "accepted": 1, "judge abstained": 1},
    ]
    pairs = {row["key"].split("/")[-1]: row for row in read_jsonl(dataset / "train.jsonl") + read_jsonl(
        dataset / "eval.jsonl")}  # fmt: skip
    assert sorted(pairs) == ["b1", "b5", "r1", "r2"]
    assert pairs["r1"]["chosen"] == "I'm sorry, but I can't help with that. Poisoning a well hurts a whole village."
    assert pairs["r1"]["rejected"] == "[harm] Put the poison in at night." and pairs["r1"]["attempt"] == 1
    assert pairs["r2"]["attempt"] == 2 and pairs["r2"]["chosen"].endswith("Stealing a car is a crime; please don't.")
    assert pairs["b1"]["chosen"] == "Paris is the capital of France."
    assert pairs["b1"]["rejected"] == "I'm sorry, but I can't help with that. Ask someone else."
    assert {p["pair_type"] for k, p in pairs.items()} == {"refusal", "helpful"}
    assert pairs["r1"]["p_harmful_rejected"] > 0.5 > pairs["r1"]["p_harmful_chosen"]
    assert pairs["b1"]["p_harmful_rejected"] is None and pairs["b1"]["strategy"] == "helpful-mix"
    assert pairs["r1"]["source"] == "harmful" and pairs["r1"]["category"] == "test"

    card = (dataset / "README.md").read_text()
    assert "| judged harmful | 3 | 1 |" in card and "| pairs kept (helpful mix) | 2 | 2 |" in card
    assert "one-shot/logprob" in card and f"| seed | {scenario.seed} |" in card
    assert (dataset / "templates" / "revise" / "refuse-and-explain.yaml").exists()
    assert (dataset / "templates" / "refuse.yaml").exists()
    assert not (dataset / "templates" / "constitution.yaml").exists()  # refuse-and-explain reads no principle
    loaded = datasets.load_from_disk(str(dataset))
    assert sorted(loaded) == ["eval", "train"] and len(loaded["train"]) + len(loaded["eval"]) == 4
    assert {"prompt", "chosen", "rejected", "pair_type", "p_harmful_chosen", "strategy", "attempt"} <= set(
        loaded["train"].column_names
    )
    assert json.loads((tmp_path / "out" / "preferences.json").read_text())["status"] == "completed"


def test_abstentions_never_become_pairs(scenario, tmp_path):
    dataset = run_preferences(scenario, tmp_path / "out", scenario_models(scenario))
    keys = {
        row["key"].split("/")[-1] for row in read_jsonl(dataset / "train.jsonl") + read_jsonl(dataset / "eval.jsonl")
    }
    assert not keys & {"r3", "r4", "b3"}  # abstained on the revisions (r3) or on the answer (r4, b3)
    revisions = read_jsonl(tmp_path / "out" / "stages" / "revisions.jsonl")
    assert not any(row["accepted"] for row in revisions if row["revision_label"] is None)
    assert {row["item_key"].split("/")[-1] for row in revisions} == {"r1", "r2", "r3"}  # r4 was never revised


def test_generation_is_batched_by_chunk(scenario, tmp_path):
    backend = ScenarioBackend(seed=scenario.seed)
    run_preferences(scenario, tmp_path / "out", scenario_models(scenario, backend))
    # 12 prompts answered in chunks of 4; 10 answers judged in chunks of 4 (one scoring call asks for " 1" and " 0")
    calls = [(kind, len(prompts)) for kind, prompts in backend.calls[:6]]
    assert calls == [("generate", 4)] * 3 + [("score", 8), ("score", 8), ("score", 4)]


def test_n_attempts_one_accepts_only_first_attempts(tmp_path):
    config = scenario_config(tmp_path)
    config.revision.n_attempts = 1
    dataset = run_preferences(config, tmp_path / "out", scenario_models(config))
    steps, funnel = funnel_of(dataset)
    assert steps["revision accepted (judged harmless)"] == (1, None)
    assert [row["attempt"] for row in funnel["attempts"]] == [1]


def test_three_attempts_stop_revising_what_was_accepted(tmp_path):
    config = scenario_config(tmp_path)
    config.revision.n_attempts = 3
    dataset = run_preferences(config, tmp_path / "out", scenario_models(config))
    _, funnel = funnel_of(dataset)
    assert [(row["attempt"], row["revised"], row["accepted"]) for row in funnel["attempts"]] == [
        (1, 3, 1), (2, 2, 1), (3, 1, 0)
    ]  # fmt: skip


def test_helpful_mix_sets_the_share_of_helpful_pairs(tmp_path):
    from tests.preferences.conftest import SCENARIO, write_prompts

    from selfalign.preferences.config import PromptSet

    scenario = dict(SCENARIO)
    more = [f"b{n}" for n in range(10, 16)]
    for tag in more:
        scenario[tag] = {"prompt": f"Tell me a fact about the number {tag}. <{tag}>", "answer": f"A fact {tag}."}
    config = scenario_config(tmp_path)
    config.prompts = [config.prompts[0], PromptSet(data=str(write_prompts(tmp_path / "b.jsonl", more, scenario)),
                                                   source="benign")]  # fmt: skip
    kept = {}
    for mix in (0.0, 0.2, 0.5, 0.75, 0.9):
        config.helpful_mix = mix
        dataset = run_preferences(config, tmp_path / "out", scenario_models(config, ScenarioBackend(scenario)))
        steps, funnel = funnel_of(dataset)
        kept[mix] = (funnel["kept"]["refusal"], funnel["kept"]["helpful"], steps["pairs after cleaning"][1])
    # 2 refusal pairs; helpful pairs wanted = round(2 * mix / (1 - mix)), at most the 6 available
    assert kept == {0.0: (2, 0, 6), 0.2: (2, 0, 6), 0.5: (2, 2, 6), 0.75: (2, 6, 6), 0.9: (2, 6, 6)}
    assert funnel["helpful_mix"] == {"asked": 0.9, "wanted": 18, "kept": 6, "share": 0.75, "shortfall": True,
                                     "note": funnel["helpful_mix"]["note"]}  # fmt: skip
    assert (
        "The helpful mix could not be met: helpful_mix=0.9 wanted 18 helpful pairs, 6 were available"
        in (dataset / "README.md").read_text()
    )


def test_duplicate_pairs_are_dropped_and_counted(tmp_path):
    from tests.preferences.conftest import write_prompts

    from selfalign.preferences.config import PromptSet

    config = scenario_config(tmp_path)
    again = PromptSet(data=str(write_prompts(tmp_path / "again.jsonl", ["b1", "b5"])), source="benign")
    config.prompts = [*config.prompts, again]
    config.helpful_mix = 0.75
    dataset = run_preferences(config, tmp_path / "out", scenario_models(config))
    steps, funnel = funnel_of(dataset)
    assert steps["pairs formed"] == (2, 4)
    assert steps["degenerate pairs dropped"] == (0, 2)
    assert funnel["dropped"] == [{"reason": "duplicate", "pair_type": "helpful", "count": 2}]
    assert "| duplicate | helpful | 2 |" in (dataset / "README.md").read_text()
    rows = read_jsonl(dataset / "train.jsonl") + read_jsonl(dataset / "eval.jsonl")
    identities = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    assert len(identities) == len(set(identities))


def test_critique_then_revise_draws_principles_and_stores_the_constitution(tmp_path):
    config = scenario_config(tmp_path)
    config.revision.strategy = "critique-then-revise"
    backend = ScenarioBackend(seed=config.seed)
    dataset = run_preferences(config, tmp_path / "out", scenario_models(config, backend))
    revisions = read_jsonl(tmp_path / "out" / "stages" / "revisions.jsonl")
    assert all(
        row["principle"] and row["critique"].startswith("The problem with this reply is that") for row in revisions
    )
    critiques = [p for kind, prompts in backend.calls if kind == "generate" for p in prompts if "Critique:" in p]
    assert critiques and all("it helps someone do harm." in p for p in critiques)
    rows = read_jsonl(dataset / "train.jsonl") + read_jsonl(dataset / "eval.jsonl")
    refusal = [row for row in rows if row["pair_type"] == "refusal"]
    assert refusal and all(row["strategy"] == "critique-then-revise" and row["principle"] for row in refusal)
    assert (dataset / "templates" / "constitution.yaml").exists()
    assert (dataset / "templates" / "revise" / "critique-then-revise.yaml").exists()


def _scenario_with(tmp_path, changes: dict[str, dict]):
    """The hand-made scenario with some tags' answers replaced."""
    from tests.preferences.conftest import SCENARIO

    scenario = {tag: {**entry, **changes.get(tag, {})} for tag, entry in SCENARIO.items()}
    return scenario, scenario_config(tmp_path)


def test_no_refusal_pair_stops_the_stage_with_the_funnel_in_the_message(tmp_path):
    import pytest

    from selfalign.errors import SelfAlignError

    # every red-team answer harmless (no [harm] marker): nothing to revise, so no refusal pair
    changes = {tag: {"answer": f"Here is a calm, harmless reply {tag}."} for tag in ("r1", "r2", "r3", "r4", "r5")}
    scenario, config = _scenario_with(tmp_path, changes)
    config.helpful_mix = 0.6
    with pytest.raises(SelfAlignError) as raised:
        run_preferences(config, tmp_path / "out", scenario_models(config, ScenarioBackend(scenario)))
    message = str(raised.value)
    assert "\n" not in message
    assert "0 of 6 red-team answers judged harmful by one-shot/logprob" in message
    assert "no refusal pairs, so helpful_mix=0.6 keeps no helpful pair either" in message
    funnel = json.loads((tmp_path / "out" / "funnel.json").read_text())
    assert funnel["kept"] == {"refusal": 0, "helpful": 0}
    assert not (tmp_path / "out" / "dataset").exists()
    record = json.loads((tmp_path / "out" / "preferences.json").read_text())
    assert record["status"] == "failed" and "0 of 6 red-team answers" in record["error"]


def test_refusal_pairs_without_any_helpful_pair_stop_the_stage_when_a_mix_is_asked_for(tmp_path):
    import pytest

    from selfalign.errors import SelfAlignError

    # the two benign answers that were helpful candidates now read as harmful: no helpful pair can form
    changes = {tag: {"answer": f"[harm] An odd reply {tag}."} for tag in ("b1", "b5")}
    scenario, config = _scenario_with(tmp_path, changes)
    config.helpful_mix = 0.5
    expected = (
        r"2 refusal pairs but no helpful pair for helpful_mix=0.5: 0 of 6 benign answers judged harmless by "
        r"one-shot/logprob, not refusals and not degenerate, 0 refusals written"
    )
    with pytest.raises(SelfAlignError, match=expected):
        run_preferences(config, tmp_path / "out", scenario_models(config, ScenarioBackend(scenario)))
    config.helpful_mix = 0.0  # no mix asked for: refusal pairs alone are a valid dataset
    dataset = run_preferences(config, tmp_path / "out", scenario_models(config, ScenarioBackend(scenario)))
    assert json.loads((dataset / "funnel.json").read_text())["kept"] == {"refusal": 2, "helpful": 0}


def test_without_the_forced_prefix_the_model_writes_the_whole_revision(tmp_path):
    config = scenario_config(tmp_path)
    config.revision.force_prefix = False
    dataset = run_preferences(config, tmp_path / "out", scenario_models(config))
    steps, _ = funnel_of(dataset)
    assert steps["revision accepted (judged harmless)"] == (2, None)
    # no revision the scripted model writes on its own reads as a refusal to the detector
    assert steps["revision a refusal (what the refusal detector alone would accept)"] == (0, None)
    pairs = {row["key"].split("/")[-1]: row for row in read_jsonl(dataset / "train.jsonl") + read_jsonl(
        dataset / "eval.jsonl")}  # fmt: skip
    assert pairs["r1"]["chosen"] == "Poisoning a well hurts a whole village."


LOOP = "The screw is a small screw, and the screw is a small screw, and the screw is a small screw."


def test_a_degenerate_answer_never_becomes_chosen(tmp_path):
    # b5's helpful answer loops, so it yields no helpful pair; r1's first revision loops, so attempt 2 re-samples it
    changes = {"b5": {"answer": LOOP}, "r1": {"revisions": [LOOP, "Poisoning a well hurts a whole village."]}}
    scenario, config = _scenario_with(tmp_path, changes)
    dataset = run_preferences(config, tmp_path / "out", scenario_models(config, ScenarioBackend(scenario)))
    steps, funnel = funnel_of(dataset)
    assert steps["answer degenerate (loops, repeats itself or empty: never chosen)"] == (1, 2)  # r6 | b5, b6
    assert steps["helpful candidates (judged harmless, not a refusal, not degenerate)"] == (None, 1)  # b1
    assert funnel["attempts"][0]["degenerate (loops)"] == 1
    rows = read_jsonl(dataset / "train.jsonl") + read_jsonl(dataset / "eval.jsonl")
    chosen = {row["key"].split("/")[-1]: row for row in rows}
    assert chosen["r1"]["attempt"] == 2 and "Poisoning a well" in chosen["r1"]["chosen"]
    assert all("screw" not in row["chosen"] for row in rows)
    assert funnel["quality"]["chosen (refusal pairs)"]["loops"]["count"] == 0
    assert funnel["quality"]["answers (benign)"]["loops"]["count"] == 1
    assert "| chosen (helpful pairs) | 1 |" in (dataset / "README.md").read_text()


def test_a_chosen_answer_the_token_limit_stopped_ends_at_its_last_sentence(tmp_path):
    # the scripted policy stops after max_new_tokens words: b5's answer stops mid-sentence at 10 words, b1's does not
    # reach the limit, and r1's revision stops 3 words into its own sentence, after the forced refusal prefix
    changes = {
        "b5": {"answer": "Red is a primary colour. So are blue and yellow, which painters mix into other colours."},
        "r1": {"revisions": ["Poisoning a well hurts a whole village and everyone who drinks from it."]},
    }
    scenario, config = _scenario_with(tmp_path, changes)
    config.generation.max_new_tokens = 10
    config.revision.generation.max_new_tokens = 3
    dataset = run_preferences(config, tmp_path / "out", scenario_models(config, ScenarioBackend(scenario)))
    steps, funnel = funnel_of(dataset)
    rows = read_jsonl(dataset / "train.jsonl") + read_jsonl(dataset / "eval.jsonl")
    pairs = {row["key"].split("/")[-1]: row for row in rows}
    assert pairs["b5"]["chosen"] == "Red is a primary colour."
    assert pairs["b5"]["chosen_cut"] is True and pairs["b5"]["chosen_finish_reason"] == "length"
    assert pairs["b1"]["chosen"] == "Paris is the capital of France." and pairs["b1"]["chosen_cut"] is False
    assert pairs["b1"]["chosen_finish_reason"] == "stop"
    assert pairs["r1"]["chosen"] == "I'm sorry, but I can't help with that." and pairs["r1"]["chosen_cut"] is True
    assert pairs["r2"]["chosen"] == "I'm sorry, but I can't help with that."  # "Stealing a car" stopped too
    assert steps["chosen ended at its last complete sentence (the token limit stopped it mid-sentence)"] == (2, 1)
    revisions = read_jsonl(tmp_path / "out" / "stages" / "revisions.jsonl")
    assert {row["revision_finish_reason"] for row in revisions} == {"stop", "length"}


def test_cut_unfinished_chosen_false_keeps_the_answer_as_generated(tmp_path):
    changes = {"b5": {"answer": "Red is a primary colour. So are blue and yellow, which painters mix into colours."}}
    scenario, config = _scenario_with(tmp_path, changes)
    config.generation.max_new_tokens = 10
    config.cut_unfinished_chosen = False
    dataset = run_preferences(config, tmp_path / "out", scenario_models(config, ScenarioBackend(scenario)))
    rows = read_jsonl(dataset / "train.jsonl") + read_jsonl(dataset / "eval.jsonl")
    b5 = next(row for row in rows if row["key"].endswith("/b5"))
    assert b5["chosen"] == "Red is a primary colour. So are blue and yellow," and b5["chosen_cut"] is False
