"""What the reliability suite did, counted as its tests run and printed at the end of the session (conftest.py)."""

from __future__ import annotations

from collections import Counter

# "kill9:<stage>" -> trials, "property:<target>" -> generated examples, "<area>" -> checked cases
COUNTS: Counter[str] = Counter()


def count(name: str, n: int = 1) -> None:
    COUNTS[name] += n


def summary_lines() -> list[str]:
    def group(prefix: str) -> tuple[int, str]:
        items = sorted((name.removeprefix(prefix), n) for name, n in COUNTS.items() if name.startswith(prefix))
        return sum(n for _, n in items), ", ".join(f"{name} {n}" for name, n in items)

    kills, kill_detail = group("kill9:")
    examples, example_detail = group("property:")
    cases = {name: n for name, n in COUNTS.items() if ":" not in name}
    return [
        f"reliability: kill-9 trials={kills} (stages: {kill_detail or 'none ran'})",
        f"reliability: property-based examples={examples} ({example_detail or 'none ran'})",
        "reliability: cases " + (", ".join(f"{name}={n}" for name, n in sorted(cases.items())) or "none ran"),
    ]
