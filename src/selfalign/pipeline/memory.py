"""Peak resident memory of this process while a piece of work runs, for the run manifest and the benchmarks.

Linux keeps a high-water mark of resident memory (VmHWM in /proc/self/status, what getrusage's ru_maxrss and
`/usr/bin/time -v` report), but only for the process's whole life: a stage that peaks below an earlier stage's
peak leaves it unchanged. So a daemon thread samples VmRSS while the work runs; when the high-water mark rose
during the work, the new mark is the exact peak (a sample can miss a short spike), else the highest sample is.
Resetting the mark (/proc/self/clear_refs) would give exact per-stage peaks, but it would also hide the run's
overall peak from `/usr/bin/time` and from a parent's RUSAGE_CHILDREN, so it is not done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def _glibc() -> ctypes.CDLL | None:
    library = ctypes.util.find_library("c")
    if not (sys.platform.startswith("linux") and library):
        return None
    libc = ctypes.CDLL(library)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_large_blocks_for_reuse() -> None:
    """Let glibc reuse freed blocks of up to 1 GB instead of unmapping and mapping them again at every step.

    Training steps over a 262k-entry vocabulary allocate and free tensors of hundreds of MB many times a step; by
    default glibc maps each afresh, and the page faults cost DPO steps 1.21x on 2 cores (`python benchmarks/
    training.py --compare-allocator`, BENCHMARKS.md). Memory a stage frees still goes back to the system between
    stages (`release_free_memory`).
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(1 << 30))
        libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))
        libc.mallopt(_M_TOP_PAD, ctypes.c_int(256 << 20))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]  # fmt: skip


def free_heap_bytes() -> int | None:
    """Bytes glibc holds free in its heaps (mallinfo2's fordblks), resident if they were ever touched; None without
    glibc 2.33 or later."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().fordblks


def release_free_memory_over(limit: int) -> bool:
    """Hand the heaps' free pages back to the system (malloc_trim) when glibc holds more than `limit` bytes free;
    returns whether it did. What stays free up to the limit is reused without page faults."""
    free = free_heap_bytes()
    if free is None or free <= limit:
        return False
    _glibc().malloc_trim(0)  # type: ignore[union-attr]
    return True


def release_free_memory() -> None:
    """Hand memory that a finished stage freed back to the system before the next stage loads its models.

    Stages load and drop whole models; glibc keeps much of what they free in its heaps, so without this the
    process's resident memory grows stage after stage (measured on the demo: ~0.7 GB more at the start of each
    stage). malloc_trim returns free heap pages; elsewhere than glibc this only collects garbage.
    """
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
