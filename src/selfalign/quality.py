"""How good an answer reads, apart from whether it is harmful: loops, empty answers, token-limit hits, repetition.

The embedded base model loops ("I'm going to look at the house. / I'm going to look at the house. / ...") and
rambles; these measures put numbers on that so a report can say how many answers a variant wastes.

Definitions (all on the answer text alone, no model):
- words: the lower-cased `\\w+` tokens of the answer ("I'm" is two words, "i" and "m"; "1/4" is "1" and "4").
- loops: some word 4-gram occurs LOOP_REPEATS (3) or more times, overlapping occurrences counted; or some
  sentence/line of at least LOOP_SEGMENT_MIN_WORDS (3) words occurs LOOP_REPEATS or more times. A segment ends at
  ".", "!", "?" or ";" before a space or the end (a closing quote may come between) or at a line break, and segments
  are compared by their words. The second rule is the same loop with short lines: "Go home now. Go home now. Go
  home now." gives each of its 4-grams only twice.
- distinct-n: unique word n-grams / all word n-grams of the answer; None when it has fewer than n words.
- degenerate: the first that applies of "empty" (no word character), "loops", "low distinct-2" (distinct-2 below
  LOW_DISTINCT_2, 0.6, in an answer of at least DISTINCT_MIN_WORDS words).
- unfinished: an answer the token limit stopped mid-sentence; `cut_to_last_sentence` ends it at its last complete
  sentence (".", "!" or "?" before a space or the end, a closing quote or bracket may come between; not a numbered
  list's "2.") or line.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from selfalign.errors import SelfAlignError
from selfalign.statistics import count_rate

# A phrase said twice can be emphasis or a list ("Step 1 ... Step 2"); the same four words three times in an answer of
# ~48 tokens is a loop (the definition). On 40 greedy 48-token answers of the embedded model, the 11 with a
# 4-gram three or more times all repeat a clause or sentence; of the 11 with a 4-gram exactly twice, 8 read as text.
LOOP_NGRAM = 4
LOOP_REPEATS = 3
# A repeated segment of one or two words ("Yes. Yes. Yes.", "Step 1.") is too common in lists to call a loop; three
# words repeated three times ("Go home now.") is the short-line form of the 4-gram loop.
LOOP_SEGMENT_MIN_WORDS = 3
# Below 20 words a few repeated function-word pairs ("of the", "in the") swing distinct-2 widely, so the ratio says
# little about short answers.
DISTINCT_MIN_WORDS = 20
# Catches what the 3-repeat rule leaves out: a long sentence said twice ("The disease is spread by the hoof of the
# cattle, ... skin of the animal." x2). On the 18 non-looping answers of >= 20 words among those 40, the three a reader
# calls degenerate had distinct-2 0.48-0.56, the readable ones 0.66-0.98; 0.6 sits in that gap.
LOW_DISTINCT_2 = 0.6

DEGENERATE_REASONS = ("empty", "loops", "low distinct-2")
FINISH_REASONS = ("stop", "length")
CONFIDENCE = 0.95

_WORD = re.compile(r"\w+")
_SEGMENT_END = re.compile(r"[.!?;]+[\"')\]]*(?:\s|$)|\n+")  # a closing quote or bracket may follow the stop
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")


@dataclass(frozen=True)
class AnswerQuality:
    words: int
    chars: int
    empty: bool
    loops: bool
    max_ngram_repeats: int  # occurrences of the most repeated word 4-gram; 0 below 4 words
    max_segment_repeats: int  # occurrences of the most repeated sentence/line of >= 3 words; 0 when none
    distinct_1: float | None
    distinct_2: float | None
    hit_token_limit: bool | None  # None: the finish reason is unknown
    tokens: int | None  # the answer's token count, where the caller knows it
    degenerate_reason: str | None

    @property
    def is_degenerate(self) -> bool:
        return self.degenerate_reason is not None


def measure_answer(text: str, finish_reason: str | None = None, tokenizer_tokens: int | None = None) -> AnswerQuality:
    """Quality measures of one answer; `finish_reason` is the backend's ("stop" or "length"), None when unknown."""
    if not isinstance(text, str):
        raise SelfAlignError(f"measure_answer: the answer must be text, got {type(text).__name__}")
    if finish_reason is not None and finish_reason not in FINISH_REASONS:
        raise SelfAlignError(f"measure_answer: finish_reason must be 'stop', 'length' or None, got {finish_reason!r}")
    if tokenizer_tokens is not None and tokenizer_tokens < 0:
        raise SelfAlignError(f"measure_answer: tokenizer_tokens must be >= 0, got {tokenizer_tokens}")
    words = _words(text)
    ngram_repeats = max(Counter(_ngrams(words, LOOP_NGRAM)).values(), default=0)
    segment_repeats = _max_segment_repeats(text)
    loops = ngram_repeats >= LOOP_REPEATS or segment_repeats >= LOOP_REPEATS
    distinct_2 = distinct_n(words, 2)
    empty = not words
    if empty:
        reason = "empty"
    elif loops:
        reason = "loops"
    elif len(words) >= DISTINCT_MIN_WORDS and distinct_2 is not None and distinct_2 < LOW_DISTINCT_2:
        reason = "low distinct-2"
    else:
        reason = None
    return AnswerQuality(
        words=len(words),
        chars=len(text.strip()),
        empty=empty,
        loops=loops,
        max_ngram_repeats=ngram_repeats,
        max_segment_repeats=segment_repeats,
        distinct_1=distinct_n(words, 1),
        distinct_2=distinct_2,
        hit_token_limit=None if finish_reason is None else finish_reason == "length",
        tokens=tokenizer_tokens,
        degenerate_reason=reason,
    )


def cut_to_last_sentence(text: str, finish_reason: str | None = None) -> str:
    """`text` up to the end of its last complete sentence when the token limit may have stopped it mid-sentence
    (finish reason "length", or unknown); "" when no sentence ended. An answer that stopped on its own ("stop") or
    already ends a sentence is returned stripped but otherwise whole.

    A chosen answer is training data: cut off mid-word, and TRL ends it with the end-of-sequence token there, it
    teaches the model to stop anywhere, or (where the cut falls inside a repeated sentence) to keep going.
    """
    text = text.strip()
    if finish_reason == "stop":
        return text
    ends = [match.end() for match in _SENTENCE_END.finditer(text) if not _is_list_marker(text, match.start())]
    ends += [match.start() for match in re.finditer(r"\n", text)]  # a finished line of a list ends there too
    last = max(ends, default=0)
    if last == len(text):
        return text
    return text[:last].rstrip()


def _is_list_marker(text: str, stop: int) -> bool:
    """The "2." of a numbered list item, not the end of a sentence."""
    line_start = text.rfind("\n", 0, stop) + 1
    return text[line_start:stop].strip().isdigit()


def distinct_n(words: Sequence[str], n: int) -> float | None:
    """Unique word n-grams / all word n-grams; None when there is no n-gram."""
    grams = _ngrams(words, n)
    return len(set(grams)) / len(grams) if grams else None


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def _max_segment_repeats(text: str) -> int:
    segments = (tuple(_words(segment)) for segment in _SEGMENT_END.split(text))
    counts = Counter(segment for segment in segments if len(segment) >= LOOP_SEGMENT_MIN_WORDS)
    return max(counts.values(), default=0)


# ---- summaries over a variant's answers ----


def rate_with_wilson(count: int, n: int) -> dict:
    """{rate, low, high, count, n}: the share with a Wilson 95% interval (statistics.count_rate)."""
    return count_rate(count, n, CONFIDENCE)


def summarize_answers(qualities: Iterable[AnswerQuality]) -> dict:
    """Rates of loops, empty answers, token-limit hits (over answers whose finish reason is known) and degenerate
    answers, each with a Wilson interval; the degenerate count by reason; mean distinct-2 (over answers that have
    one); and answer length in words at the 10th, 50th and 90th percentile."""
    qualities = list(qualities)
    n = len(qualities)
    limits_known = [q.hit_token_limit for q in qualities if q.hit_token_limit is not None]
    distinct_2 = [q.distinct_2 for q in qualities if q.distinct_2 is not None]
    words = np.array([q.words for q in qualities], dtype=float)
    percentiles = np.percentile(words, [10, 50, 90]).tolist() if n else [None, None, None]
    return {
        "n": n,
        "loops": rate_with_wilson(sum(q.loops for q in qualities), n),
        "empty": rate_with_wilson(sum(q.empty for q in qualities), n),
        "hit_token_limit": rate_with_wilson(sum(limits_known), len(limits_known)),
        "degenerate": rate_with_wilson(sum(q.is_degenerate for q in qualities), n),
        "degenerate_by_reason": {
            reason: sum(q.degenerate_reason == reason for q in qualities) for reason in DEGENERATE_REASONS
        },
        "distinct_2_mean": float(np.mean(distinct_2)) if distinct_2 else None,
        "words_p10": percentiles[0],
        "words_p50": percentiles[1],
        "words_p90": percentiles[2],
    }


QUALITY_TABLE_HEADER = [
    "variant",
    "answers",
    "loops",
    "empty",
    "hit token limit",
    "degenerate",
    "mean distinct-2",
    "words p10 / p50 / p90",
]


def format_rate(rate: dict) -> str:
    """'12.5% [6.1, 23.7] (5/40)'; 'n/a' when no answer was counted."""
    if rate["rate"] is None:
        return "n/a"
    interval = f"[{100 * rate['low']:.1f}, {100 * rate['high']:.1f}]"
    return f"{100 * rate['rate']:.1f}% {interval} ({rate['count']}/{rate['n']})"


def quality_table_rows(summaries: dict[str, dict]) -> list[list[str]]:
    """One row per variant (in the dict's order) under QUALITY_TABLE_HEADER, from summarize_answers results."""
    rows = []
    for variant, summary in summaries.items():
        distinct = summary["distinct_2_mean"]
        lengths = (summary["words_p10"], summary["words_p50"], summary["words_p90"])
        rows.append(
            [
                variant,
                str(summary["n"]),
                format_rate(summary["loops"]),
                format_rate(summary["empty"]),
                format_rate(summary["hit_token_limit"]),
                format_rate(summary["degenerate"]),
                "n/a" if distinct is None else f"{distinct:.2f}",
                "n/a" if lengths[0] is None else " / ".join(f"{value:.0f}" for value in lengths),
            ]
        )
    return rows
