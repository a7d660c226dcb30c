"""glibc's allocator, tuned and asked to hand memory back: what the pipeline and training share.

Every `selfalign` command lets glibc keep freed blocks for reuse (`keep_large_blocks_for_reuse`), which saves page
faults at every training step but keeps what is freed in the process. Memory goes back to the system between stages
(`release_free_memory`, the pipeline) and after DPO's steps once more than a limit lies free
(`release_free_memory_over`, training). Elsewhere than glibc these do nothing but collect garbage.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, found and loaded once (find_library takes ~1.5 ms; DPO asks after every step)."""
    library = ctypes.util.find_library("c")
    if not (sys.platform.startswith("linux") and library):
        return None
    libc = ctypes.CDLL(library)
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _MallInfo2
    return libc


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
