"""Peak resident memory of this process while a piece of work runs, for the run manifest and the benchmarks.

Linux keeps a high-water mark of resident memory (VmHWM in /proc/self/status, what getrusage's ru_maxrss and
`/usr/bin/time -v` report), but only for the process's whole life: a stage that peaks below an earlier stage's
peak leaves it unchanged. So a daemon thread samples VmRSS while the work runs; when the high-water mark rose
during the work, the new mark is the exact peak (a sample can miss a short spike), else the highest sample is.
Resetting the mark (/proc/self/clear_refs) would give exact per-stage peaks, but it would also hide the run's
overall peak from `/usr/bin/time` and from a parent's RUSAGE_CHILDREN, so it is not done.
"""

from __future__ import annotations

import resource
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STATUS = Path("/proc/self/status")
SAMPLE_SECONDS = 0.1


def _status_kb(field: str) -> int | None:
    """A `Vm*` field of /proc/self/status in kB, or None where there is no /proc (macOS, Windows)."""
    try:
        text = STATUS.read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return None


def lifetime_peak_kb() -> int:
    """The process's high-water mark of resident memory in kB: VmHWM where there is /proc (ru_maxrss can lag it by
    a few hundred kB, so a peak read from it could fall below a VmRSS sample), else ru_maxrss (bytes on macOS)."""
    high_water = _status_kb("VmHWM")
    if high_water is not None:
        return high_water
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss // 1024 if sys.platform == "darwin" else maxrss


def rss_kb() -> int | None:
    """Resident memory now, in kB; None where /proc is absent."""
    return _status_kb("VmRSS")


class PeakMemory:
    """Filled in by `measure_peak_memory` when the work ends: the record that goes into stage.json."""

    def __init__(self) -> None:
        self.record: dict[str, Any] = {}


@contextmanager
def measure_peak_memory(interval: float = SAMPLE_SECONDS) -> Iterator[PeakMemory]:
    """Measure resident memory at the start and at its peak while the block runs (also when it raises)."""
    result = PeakMemory()
    start_kb, start_mark_kb = rss_kb(), lifetime_peak_kb()
    samples = [start_kb or 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            now = rss_kb()
            if now is not None and now > samples[0]:
                samples[0] = now

    sampler = threading.Thread(target=sample, name="peak-memory", daemon=True)
    if start_kb is not None:
        sampler.start()
    try:
        yield result
    finally:
        stop.set()
        if sampler.is_alive():
            sampler.join()
        end_kb, end_mark_kb = rss_kb(), lifetime_peak_kb()
        sampled_kb = max(samples[0], end_kb or 0)
        if end_mark_kb > start_mark_kb and end_mark_kb >= sampled_kb:
            peak_kb, measured = end_mark_kb, "high-water mark"  # the block set a new process peak: exact
        elif start_kb is not None:
            peak_kb, measured = sampled_kb, f"sampled every {interval:g} s"
        else:
            peak_kb, measured = end_mark_kb, "process high-water mark (an upper bound)"  # no /proc to sample
        result.record = {"rss_start_kb": start_kb, "peak_rss_kb": peak_kb, "peak_rss_measured": measured}
