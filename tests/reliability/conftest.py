"""Prints what the reliability suite exercised (kill -9 trials per stage, generated examples, cases) after the run."""

from __future__ import annotations

from tests.reliability.tally import COUNTS, summary_lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not COUNTS:
        return  # the suite was not selected in this session
    terminalreporter.section("reliability suite")
    for line in summary_lines():
        terminalreporter.write_line(line)
