import pytest

from selfalign.errors import SelfAlignError
from selfalign.quality import (
    DISTINCT_MIN_WORDS,
    LOW_DISTINCT_2,
    QUALITY_TABLE_HEADER,
    cut_to_last_sentence,
    distinct_n,
    format_rate,
    measure_answer,
    quality_table_rows,
    rate_with_wilson,
    summarize_answers,
)

# The two loops the embedded model produces (greedy, 48 new tokens).
HOUSE_LOOP = (
    "I'm sorry, but I can't help with that. I'm going to look at the house.\n"
    "I'm going to look at the house.\nI'm going to look at the house.\nI'm going to look at the"
)
SCREW_LOOP = (
    'The screw is a 1/4" diameter screw, and the screw is a 1/4" diameter screw, and the screw is a 1/4" '
    "diameter screw, and the"
)
PARAGRAPH = (
    "Bread needs flour, water, salt and yeast. Mix them into a dough, knead it for ten minutes until it is smooth, "
    "then let it rise in a warm place for about an hour before shaping and baking it at 220 degrees."
)
STEPS = (
    "Step 1: Turn off the power at the breaker. Step 2: Remove the old switch plate. "
    "Step 3: Disconnect the wires and note where each one went. Step 4: Connect the new switch the same way."
)
REFUSAL = (
    "I'm sorry, but I can't help with that. I can't give instructions for hurting someone, but I can talk it over."
)


@pytest.mark.parametrize("text", [HOUSE_LOOP, SCREW_LOOP])
def test_the_embedded_models_loops_are_loops(text):
    quality = measure_answer(text)
    assert quality.loops
    assert quality.max_ngram_repeats >= 3
    assert quality.degenerate_reason == "loops" and quality.is_degenerate


@pytest.mark.parametrize("text", [PARAGRAPH, STEPS, REFUSAL])
def test_normal_answers_do_not_loop(text):
    quality = measure_answer(text)
    assert not quality.loops
    assert quality.max_ngram_repeats < 3
    assert quality.degenerate_reason is None and not quality.is_degenerate


def test_a_4gram_twice_is_not_a_loop_three_times_is():
    twice = "Call the fire department now, then wait outside. Call the fire department now if it spreads."
    three = twice + " Call the fire department now."
    assert measure_answer(twice).max_ngram_repeats == 2 and not measure_answer(twice).loops
    assert measure_answer(three).max_ngram_repeats == 3 and measure_answer(three).loops


def test_a_short_line_repeated_three_times_is_a_loop_twice_is_not():
    # Three 3-word lines give each 4-gram only twice: the line rule catches this form of the same loop.
    three = "Go home now.\nGo home now.\nGo home now."
    assert measure_answer(three).max_ngram_repeats == 2
    assert measure_answer(three).max_segment_repeats == 3 and measure_answer(three).loops
    assert not measure_answer("Go home now. Go home now. Then rest.").loops
    # Lines of fewer than three words repeat in ordinary lists.
    assert not measure_answer("Yes.\nYes.\nYes.").loops


@pytest.mark.parametrize("text", ["", "   \n\t ", "...!?", " - * -- "])
def test_no_word_characters_is_empty(text):
    quality = measure_answer(text)
    assert quality.empty and quality.words == 0
    assert quality.degenerate_reason == "empty"
    assert quality.distinct_1 is None and quality.distinct_2 is None and quality.max_ngram_repeats == 0


def test_words_and_chars():
    quality = measure_answer("  I'm fine, thanks.  ")
    assert quality.words == 4  # i, m, fine, thanks
    assert quality.chars == len("I'm fine, thanks.")
    assert not quality.empty


def test_finish_reason_sets_hit_token_limit():
    assert measure_answer("Hello there.", finish_reason="length").hit_token_limit is True
    assert measure_answer("Hello there.", finish_reason="stop").hit_token_limit is False
    assert measure_answer("Hello there.").hit_token_limit is None
    assert measure_answer("Hello there.", tokenizer_tokens=3).tokens == 3
    with pytest.raises(SelfAlignError, match="finish_reason"):
        measure_answer("Hello there.", finish_reason="eos")
    with pytest.raises(SelfAlignError, match="text"):
        measure_answer(None)


def test_distinct_n():
    assert distinct_n(["a", "b", "a", "b"], 1) == 0.5
    assert distinct_n(["a", "b", "a", "b"], 2) == 2 / 3
    assert distinct_n(["a"], 2) is None
    assert measure_answer("Fine.").distinct_2 is None and measure_answer("Fine.").distinct_1 == 1.0


def test_low_distinct_2_on_both_sides_of_the_threshold():
    low = " ".join(["red blue green yellow"] * 2 + ["red green blue yellow"] * 2 + ["blue red yellow green"] * 2)
    low_quality = measure_answer(low)
    assert low_quality.words >= DISTINCT_MIN_WORDS and not low_quality.loops
    assert low_quality.distinct_2 < LOW_DISTINCT_2
    assert low_quality.degenerate_reason == "low distinct-2"
    high_quality = measure_answer(PARAGRAPH)
    assert high_quality.words >= DISTINCT_MIN_WORDS and high_quality.distinct_2 >= LOW_DISTINCT_2
    assert high_quality.degenerate_reason is None


# Two answers of the embedded model (greedy, 48 tokens) either side of LOW_DISTINCT_2: a sentence said twice and
# cut off the third time, and a repetitive but readable answer.
SENTENCE_TWICE = (
    "1. I have a 1000ml bottle of phosgene in my office.\n"
    "2. I have a 1000ml bottle of phosgene in my office.\n"
    "3. I have a"
)
REPETITIVE_BUT_READABLE = (
    "Japanese Americans were interned in camps in the United States. They were held in camps for 10 years. They were "
    "forced to work in factories and farms. They were forced to work in camps for 10 years. They were"
)


def test_distinct_2_threshold_on_the_embedded_models_answers():
    twice = measure_answer(SENTENCE_TWICE)
    assert not twice.loops and twice.words >= DISTINCT_MIN_WORDS
    assert twice.distinct_2 == pytest.approx(0.56) and twice.degenerate_reason == "low distinct-2"
    readable = measure_answer(REPETITIVE_BUT_READABLE)
    assert not readable.loops and readable.distinct_2 == pytest.approx(0.658, abs=1e-3)
    assert readable.degenerate_reason is None


def test_low_distinct_2_is_not_judged_on_short_answers():
    short = "No, yes, no, yes, no, yes."  # distinct-2 0.4, but too short to mean anything
    quality = measure_answer(short)
    assert quality.words < DISTINCT_MIN_WORDS and quality.distinct_2 < LOW_DISTINCT_2
    assert quality.degenerate_reason is None


def test_loops_come_before_low_distinct_2_and_empty_before_both():
    assert measure_answer(HOUSE_LOOP).degenerate_reason == "loops"
    assert measure_answer("").degenerate_reason == "empty"


def test_summary_counts():
    qualities = (
        [measure_answer(HOUSE_LOOP, finish_reason="length")] * 3
        + [measure_answer(PARAGRAPH, finish_reason="stop")] * 4
        + [measure_answer("", finish_reason="stop")]
        + [measure_answer(REFUSAL)] * 2  # finish reason unknown: left out of the token-limit rate
    )
    summary = summarize_answers(qualities)
    assert summary["n"] == 10
    assert (summary["loops"]["count"], summary["loops"]["n"]) == (3, 10)
    assert (summary["empty"]["count"], summary["empty"]["n"]) == (1, 10)
    assert (summary["hit_token_limit"]["count"], summary["hit_token_limit"]["n"]) == (3, 8)
    assert (summary["degenerate"]["count"], summary["degenerate"]["n"]) == (4, 10)
    assert summary["degenerate_by_reason"] == {"empty": 1, "loops": 3, "low distinct-2": 0}
    expected_distinct = [q.distinct_2 for q in qualities if q.distinct_2 is not None]
    assert summary["distinct_2_mean"] == pytest.approx(sum(expected_distinct) / 9)
    assert summary["words_p10"] <= summary["words_p50"] <= summary["words_p90"]
    assert summary["loops"]["rate"] == 0.3


@pytest.mark.parametrize(("count", "n"), [(0, 40), (40, 40), (5, 40), (0, 1), (1, 1)])
def test_wilson_intervals_never_have_zero_width(count, n):
    rate = rate_with_wilson(count, n)
    assert rate["low"] <= rate["rate"] <= rate["high"]
    assert rate["high"] - rate["low"] > 0.01
    assert 0 <= rate["low"] and rate["high"] <= 1


def test_wilson_interval_matches_the_formula():
    rate = rate_with_wilson(5, 40)
    assert rate["low"] == pytest.approx(0.0546, abs=5e-4)
    assert rate["high"] == pytest.approx(0.2611, abs=5e-4)


def test_summary_of_nothing_has_no_rates():
    summary = summarize_answers([])
    assert summary["n"] == 0 and summary["loops"]["rate"] is None and summary["distinct_2_mean"] is None
    assert quality_table_rows({"none": summary})[0][2] == "n/a"


def test_table_rows():
    summaries = {
        "base": summarize_answers(
            [measure_answer(HOUSE_LOOP, "length")] * 5 + [measure_answer(PARAGRAPH, "stop")] * 35
        ),
        "dpo": summarize_answers([measure_answer(PARAGRAPH)] * 40),
    }
    rows = quality_table_rows(summaries)
    assert [row[0] for row in rows] == ["base", "dpo"]
    assert all(len(row) == len(QUALITY_TABLE_HEADER) for row in rows)
    assert rows[0][2] == "12.5% [5.5, 26.1] (5/40)"
    assert rows[1][4] == "n/a"  # no finish reason known
    assert rows[1][2].startswith("0.0% [0.0, ") and rows[1][2].endswith("(0/40)")
    assert format_rate(rate_with_wilson(40, 40)).startswith("100.0% [")


@pytest.mark.parametrize(
    ("text", "finish_reason", "cut"),
    [
        ("I can't. I won't do th", "length", "I can't."),  # stopped mid-sentence: back to the last full stop
        ("I can't. I won't do th", None, "I can't."),  # finish reason unknown: read from the text
        ("I can't. I won't do th", "stop", "I can't. I won't do th"),  # the model stopped itself: kept whole
        ("Done. All of it.  ", "length", "Done. All of it."),  # ends a sentence already
        ('He said "no." Then he le', "length", 'He said "no."'),  # a closing quote after the stop
        ("Really?! Yes, it", "length", "Really?!"),
        ("1. Open the box\n2. Take out", "length", "1. Open the box"),  # "2." is a list marker, a line ends an item
        ("I can help.\n\nQuestion", "length", "I can help."),  # the format's next turn leaking in
        ("Version 3.5 is out and", "length", ""),  # "3.5" ends no sentence
        ("No sentence ended", "length", ""),
    ],
)
def test_cut_to_last_sentence(text, finish_reason, cut):
    assert cut_to_last_sentence(text, finish_reason) == cut
