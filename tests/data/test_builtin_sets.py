"""The shipped data sets: sizes, disjoint splits, variety (every listed value well covered, no near-duplicate prompts
anywhere), and datasheets that agree with the files."""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections import Counter, defaultdict
from fractions import Fraction
from importlib import resources

import pytest

from selfalign.data.jsonl import read_jsonl
from selfalign.data.loading import BuiltinSet, builtin_sets

MIN_ROWS = {
    "redteam": {"train": 300, "dev": 100, "test": 300},
    "benign-sensitive": {"dev": 100, "test": 300},
    "helpful": {"dev": 80},
    "capability": {"test": 300},
}
MIN_TOTAL = {"helpful": 200, "judge-labeled": 480}
MIN_PER_VALUE = {"dev": 5}  # every other split: 10
NEAR_DUPLICATE = Fraction(4, 5)  # token-set Jaccard similarity at or above this is a near-duplicate
DIFFICULTIES = ("plain", "implicit", "wrapped", "grey-zone")
WRAPPERS = ("refusal-suppression", "prefix-injection", "persona", "fiction", "payload-splitting", "other-language",
            "multi-turn")  # fmt: skip
# redteam-train's v1 role-play, hypothetical and justified framings
V1_WRAPPERS = ("persona", "hypothetical", "justification")

SET_NAMES = sorted(builtin_sets())


def _folder():
    return resources.files("selfalign.data").joinpath("builtin")


@functools.cache
def _split_rows(name: str) -> dict[str, list[dict]]:
    builtin = builtin_sets()[name]
    out = {}
    for split, file_name in builtin.splits.items():
        with resources.as_file(_folder().joinpath(file_name)) as path:
            out[split] = read_jsonl(path)
    return out


def _datasheet(builtin: BuiltinSet) -> str:
    return _folder().joinpath(builtin.datasheet).read_text(encoding="utf-8")


def _tokens(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"\w+", text.lower()))


def _jaccard(a: frozenset[str], b: frozenset[str]) -> Fraction:
    union = len(a | b)
    return Fraction(len(a & b), union) if union else Fraction(1)


def near_duplicate_pairs(texts: list[str], threshold: Fraction = NEAR_DUPLICATE) -> list[tuple[int, int, Fraction]]:
    """Every pair (i, j) whose token-set Jaccard similarity is >= threshold, exactly, without comparing all pairs.

    Prefix filtering: order each token set by global token frequency (rare first); two sets with Jaccard >= t share at
    least ceil(t * max size) tokens, so they share one among the first `size - ceil(t * size) + 1` tokens of each.
    Sets are visited by increasing size and only those prefixes are indexed; candidates are then checked exactly.
    """
    sets = [_tokens(text) for text in texts]
    frequency = Counter(token for tokens in sets for token in tokens)
    index: dict[str, list[int]] = defaultdict(list)
    pairs = []
    for i in sorted(range(len(sets)), key=lambda k: len(sets[k])):
        ordered = sorted(sets[i], key=lambda token: (frequency[token], token))
        prefix = len(ordered) - math.ceil(threshold * len(ordered)) + 1
        candidates = set()
        for token in ordered[:prefix]:
            candidates.update(index[token])
            index[token].append(i)
        for j in candidates:  # len(sets[j]) <= len(sets[i]); Jaccard >= t needs len(sets[j]) >= t * len(sets[i])
            if len(sets[j]) >= threshold * len(sets[i]) and (score := _jaccard(sets[i], sets[j])) >= threshold:
                pairs.append((min(i, j), max(i, j), score))
    return sorted(pairs)


def _text(row: dict) -> str:
    """What a row asks: its prompt, or a multiple-choice row's question."""
    return row["prompt"] if "prompt" in row else row["question"]


def _all_prompts() -> list[tuple[str, str]]:
    """(where, prompt) for every row of every shipped set; a judge-labeled prompt once, though its scenario answers it
    several ways (the same request judged with different answers is the point of a scenario)."""
    prompts, seen = [], set()
    for name in SET_NAMES:
        for split, rows in _split_rows(name).items():
            for row in rows:
                if name == "judge-labeled" and (row["scenario"], row["prompt"]) in seen:
                    continue
                seen.add((row.get("scenario"), _text(row)))
                prompts.append((f"builtin:{name}:{split} {row['id']}", _text(row)))
    return prompts


def _scenarios() -> defaultdict[str, str]:
    """Where a row is ("builtin:NAME:SPLIT ID") -> its scenario (a row without one is its own)."""
    scenario: defaultdict[str, str] = defaultdict(str)
    for name in SET_NAMES:
        for split, rows in _split_rows(name).items():
            for row in rows:
                where = f"builtin:{name}:{split} {row['id']}"
                scenario[where] = row.get("scenario") or where
    return scenario


# --- sizes -----------------------------------------------------------------------------------------------------


def test_minimum_sizes():
    for name, minimums in MIN_ROWS.items():
        for split, minimum in minimums.items():
            assert len(_split_rows(name)[split]) >= minimum, f"{name}:{split}"
    for name, minimum in MIN_TOTAL.items():
        assert sum(len(rows) for rows in _split_rows(name).values()) >= minimum, name


def test_catalog_lists_the_expected_sets_and_splits():
    sets = builtin_sets()
    assert set(sets) == {"redteam", "benign-sensitive", "helpful", "judge-labeled", "capability"}
    assert list(sets["redteam"].splits) == ["train", "dev", "test"]
    assert list(sets["benign-sensitive"].splits) == ["train", "dev", "test"]
    assert list(sets["judge-labeled"].splits) == ["dev", "test"]
    for builtin in sets.values():
        assert builtin.label_column in builtin.columns
        assert builtin.values


# --- shape of the rows -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SET_NAMES)
def test_rows_have_exactly_the_catalog_columns_and_a_real_prompt(name):
    builtin = builtin_sets()[name]
    for split, rows in _split_rows(name).items():
        for row in rows:
            assert sorted(row) == sorted(builtin.columns), f"{name}:{split} {row.get('id')}"
            assert isinstance(_text(row), str) and _text(row).strip() == _text(row), row["id"]
            assert _tokens(_text(row)), row["id"]


def test_ids_are_unique_across_all_sets():
    ids = Counter(row["id"] for name in SET_NAMES for rows in _split_rows(name).values() for row in rows)
    assert [row_id for row_id, count in ids.items() if count > 1] == []


@pytest.mark.parametrize("name", SET_NAMES)
def test_splits_are_disjoint(name):
    seen: dict[str, str] = {}
    for split, rows in _split_rows(name).items():
        prompts = {_text(row).strip().lower() for row in rows}
        overlap = [prompt for prompt in prompts if prompt in seen]
        assert overlap == [], f"{name}: prompts in both {split} and {seen[overlap[0]] if overlap else ''}"
        seen.update(dict.fromkeys(prompts, split))


# --- variety ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SET_NAMES)
def test_every_listed_value_has_enough_rows_in_every_split(name):
    builtin = builtin_sets()[name]
    seen = set()
    for split, rows in _split_rows(name).items():
        counts = Counter(row[builtin.label_column] for row in rows)
        assert set(counts) - set(builtin.values) == set(), f"{name}:{split} has values outside the catalog"
        minimum = MIN_PER_VALUE.get(split, 10)
        thin = {value: count for value, count in counts.items() if count < minimum}
        assert thin == {}, f"{name}:{split}: fewer than {minimum} rows"
        seen |= set(counts)
    assert set(builtin.values) - seen == set(), f"{name}: catalog values no row has"


def test_redteam_difficulties_and_wrappers_are_known_and_each_well_covered():
    for split, rows in _split_rows("redteam").items():
        counts = Counter(row["difficulty"] for row in rows)
        assert set(counts) <= set(DIFFICULTIES), split
        for row in rows:
            assert (row["difficulty"] == "wrapped") == (row["wrapper"] != "none"), row["id"]
        wrappers = Counter(row["wrapper"] for row in rows if row["wrapper"] != "none")
        if split == "train":
            assert set(wrappers) == set(V1_WRAPPERS) and min(wrappers.values()) >= 10, wrappers
            continue
        assert set(counts) == set(DIFFICULTIES) and min(counts.values()) >= MIN_PER_VALUE.get(split, 10), counts
        assert set(wrappers) == set(WRAPPERS) and min(wrappers.values()) >= 3, (split, wrappers)


def test_contrast_twins_point_at_each_other_in_the_same_split_and_scenario():
    for split in ("dev", "test"):
        benign = {row["id"]: row for row in _split_rows("benign-sensitive")[split]}
        harmful = {row["id"]: row for row in _split_rows("redteam")[split]}
        assert all(row["twin"] in harmful for row in benign.values()), "every benign dev/test row has a twin"
        for row in benign.values():
            twin = harmful[row["twin"]]
            assert twin["twin"] == row["id"] and twin["scenario"] == row["scenario"], row["id"]
        assert all(row["twin"] == "" or row["twin"] in benign for row in harmful.values())


@pytest.mark.parametrize("name", ["redteam", "benign-sensitive", "judge-labeled"])
def test_splits_are_split_by_scenario(name):
    where: dict[str, str] = {}
    for split, rows in _split_rows(name).items():
        for row in rows:
            assert where.setdefault(row["scenario"], split) == split, f"{name}: {row['scenario']} in two splits"


def test_no_paraphrase_of_another_scenario_anywhere_in_what_is_shipped():
    """TF-IDF cosine (word 1-2 grams) below 0.5 between any two prompts of different scenarios across every shipped
    set and the principles' exemplars: rewording ("how do I starve out fruit flies" ~ "how do I get rid of fruit
    flies") is caught, where token overlap is not. A contrast twin shares its scenario with its safe prompt."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import linear_kernel

    from selfalign.judging.audit import MAX_PROMPT_COSINE
    from selfalign.preferences.templates import load_principles

    # capability questions are left out: "What is the capital of Peru?" and "... of Chile?" share a form, not a leak
    entries = [(where, prompt) for where, prompt in _all_prompts() if not where.startswith("builtin:capability")]
    scenario = _scenarios()
    entries += [(f"principles exemplar {e.name}", e.request) for e in load_principles("principles").exemplars]
    vectors = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit_transform([p for _, p in entries])
    similarity = linear_kernel(vectors, vectors)
    found = []
    for i in range(len(entries)):
        for j in range(i + 1, len(entries)):
            if similarity[i, j] >= MAX_PROMPT_COSINE and (scenario[entries[i][0]] or entries[i][0]) != (
                    scenario[entries[j][0]] or entries[j][0]):  # fmt: skip
                found.append(f"{entries[i][0]} ~ {entries[j][0]} ({similarity[i, j]:.2f})")
    assert found == [], f"{len(found)} paraphrases, e.g. " + "; ".join(found[:5])


def test_no_near_duplicate_prompts_anywhere_in_the_shipped_sets():
    """A contrast twin ("how do I kill a python process" / "how do I kill my sister") is meant to be close to its
    safe prompt: pairs of one scenario are allowed."""
    prompts = _all_prompts()
    scenario = _scenarios()
    pairs = [(i, j, score) for i, j, score in near_duplicate_pairs([prompt for _, prompt in prompts])
             if scenario[prompts[i][0]] != scenario[prompts[j][0]]]  # fmt: skip
    shown = [f"{prompts[i][0]} ~ {prompts[j][0]} (Jaccard {float(score):.2f})" for i, j, score in pairs[:10]]
    assert pairs == [], f"{len(pairs)} near-duplicate pairs, e.g. " + "; ".join(shown)


def test_near_duplicate_search_agrees_with_comparing_every_pair():
    texts = [
        "How do I kill a zombie process on Ubuntu?",
        "how do i kill a zombie process on ubuntu",
        "How do I kill a zombie process on Debian?",
        "how can I kill a stuck zombie process on ubuntu quickly",
        "Write a poem about the sea",
        "Write a short poem about the sea",
        "write a poem about the sea, please",
        "the sea",
        "sea the",
        "completely different words here",
    ]
    texts += [" ".join(f"w{(k * 7 + m) % 13}" for m in range(3 + k % 6)) for k in range(40)]
    sets = [_tokens(text) for text in texts]
    brute = sorted(
        (i, j, _jaccard(sets[i], sets[j]))
        for i, j in itertools.combinations(range(len(texts)), 2)
        if _jaccard(sets[i], sets[j]) >= NEAR_DUPLICATE
    )
    assert {(0, 1, Fraction(1)), (0, 2, Fraction(4, 5)), (4, 5, Fraction(6, 7)), (7, 8, Fraction(1))} <= set(brute)
    assert not any(i == 3 or j == 3 for i, j, _ in brute)  # Jaccard with 0 and 1 is 8/12: similar, not near-duplicate
    assert near_duplicate_pairs(texts) == brute


# --- judge-labeled ---------------------------------------------------------------------------------------------


def test_judge_labels_are_binary_balanced_and_explained():
    builtin = builtin_sets()["judge-labeled"]
    # a kind's meaning starts with its label ("label 1: ..."), or "label 0 or 1:" for the model's own answers
    labels_of_kind = {
        kind: {int(label) for label in re.match(r"label ([01](?: or [01])?):", meaning).group(1).split(" or ")}
        for kind, meaning in builtin.values.items()
    }
    for split, rows in _split_rows("judge-labeled").items():
        labels = Counter(row["label"] for row in rows)
        assert all(type(row["label"]) is int for row in rows), split
        # near balance (not exact: the model's own answers are labelled as they come)
        assert set(labels) == {0, 1} and 0.4 <= labels[1] / len(rows) <= 0.6, (split, labels)
        for row in rows:
            assert isinstance(row["response"], str) and row["response"].strip(), row["id"]
            assert isinstance(row["reason"], str) and row["reason"].strip(), row["id"]
            assert row["label"] in labels_of_kind[row["kind"]], row["id"]
            assert row["category"] == "none" or row["category"] in builtin_sets()["redteam"].values, row["id"]


def test_judge_labeled_dev_and_test_are_split_by_scenario():
    """A scenario answers one request several ways; one on both sides would let dev tuning see test requests."""
    sides = defaultdict(set)
    for split, rows in _split_rows("judge-labeled").items():
        for row in rows:
            sides[row["scenario"]].add(split)
    assert [scenario for scenario, splits in sides.items() if len(splits) > 1] == []
    sizes = Counter(row["scenario"] for rows in _split_rows("judge-labeled").values() for row in rows)
    assert max(sizes.values()) <= 4 and len(sizes) >= 100, sizes.most_common(3)


def test_judge_labeled_test_split_cannot_be_labeled_from_style_or_the_no_model_rule():
    from selfalign.judging.audit import AUDIT_AIM, audit_labeled

    result = audit_labeled("builtin:judge-labeled")
    assert not result.exceeds(AUDIT_AIM), (
        f"builtin:judge-labeled test can be labeled without reading the answers: cue classifier "
        f"{result.cue_classifier_accuracy:.3f}, no-model rule {result.no_model_rule_accuracy:.3f} (aim: both <= "
        f"{AUDIT_AIM}); run `selfalign data audit judge-labeled` for the per-kind table"
    )


def test_judge_labeled_prompts_are_not_paraphrases_of_red_team_prompts():
    from selfalign.judging.audit import MAX_PROMPT_COSINE, max_tfidf_cosine

    judged = [row for rows in _split_rows("judge-labeled").values() for row in rows]
    redteam = [row for rows in _split_rows("redteam").values() for row in rows]
    nearest = max_tfidf_cosine([row["prompt"] for row in judged], [row["prompt"] for row in redteam])
    close = sorted((pair for pair in nearest if pair[2] >= MAX_PROMPT_COSINE), key=lambda pair: -pair[2])
    shown = [
        f"{judged[i]['id']} {judged[i]['prompt']!r} ~ {redteam[j]['id']} {redteam[j]['prompt']!r} ({score:.2f})"
        for i, j, score in close[:10]
    ]
    assert close == [], f"{len(close)} judge-labeled prompts with TF-IDF cosine >= {MAX_PROMPT_COSINE}: " + "; ".join(
        shown
    )


# --- datasheets ------------------------------------------------------------------------------------------------


def _table_counts(sheet: str, value: str, splits: list[str]) -> list[int]:
    """The per-split counts in the datasheet's table row for `value`: `| `value` | meaning | n1 | n2 |`."""
    lines = [line for line in sheet.splitlines() if line.startswith(f"| `{value}` |")]
    assert len(lines) == 1, f"no single table row for `{value}`"
    cells = [cell.strip() for cell in lines[0].strip().strip("|").split("|")]
    return [int(cell) for cell in cells[-len(splits) :]]


@pytest.mark.parametrize("name", SET_NAMES)
def test_datasheet_lists_every_value_with_the_counts_in_the_files(name):
    builtin = builtin_sets()[name]
    sheet = _datasheet(builtin)
    split_rows = _split_rows(name)
    splits = list(split_rows)
    for value in builtin.values:
        assert value in sheet, f"{builtin.datasheet} does not mention {value}"
        expected = [sum(row[builtin.label_column] == value for row in split_rows[split]) for split in splits]
        assert _table_counts(sheet, value, splits) == expected, f"{builtin.datasheet}: counts for {value}"
    totals = [int(n) for n in re.findall(r"\*\*(\d+)\*\*", sheet)[: len(splits)]]
    assert totals == [len(split_rows[split]) for split in splits], f"{builtin.datasheet}: totals"


def test_redteam_datasheet_gives_the_difficulty_and_wrapper_counts():
    sheet = _datasheet(builtin_sets()["redteam"])
    split_rows = _split_rows("redteam")
    splits = list(split_rows)
    for column, values in (("difficulty", DIFFICULTIES), ("wrapper", ("none", *WRAPPERS, *V1_WRAPPERS[1:]))):
        for value in values:
            expected = [sum(row[column] == value for row in split_rows[split]) for split in splits]
            assert _table_counts(sheet, value, splits) == expected, value


@pytest.mark.parametrize("name", SET_NAMES)
def test_datasheet_has_the_expected_sections(name):
    sheet = _datasheet(builtin_sets()[name]).lower()
    for heading in ("motivation", "composition", "how the rows were written", "intended uses", "limitations", "safety"):
        assert f"## {heading}" in sheet, heading


def test_capability_rows_have_options_and_an_answer_spread_over_positions():
    for split, rows in _split_rows("capability").items():
        for row in rows:
            assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4, row["id"]
            assert type(row["answer"]) is int and 0 <= row["answer"] < 4, row["id"]
        positions = Counter(row["answer"] for row in rows)
        assert max(positions.values()) - min(positions.values()) <= len(rows) // 10, (split, positions)
