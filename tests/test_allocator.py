"""glibc's free heap: measured, and handed back to the system past a limit (training does after each step)."""

import sys

import pytest

from selfalign import allocator
from selfalign.training.common import FREE_HEAP_LIMIT, ReleaseFreeHeap


class FakeGlibc:
    def __init__(self):
        self.trims = 0

    def malloc_trim(self, pad):
        self.trims += 1
        return 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2")
def test_the_free_heap_is_measured_where_glibc_has_mallinfo2():
    free = allocator.free_heap_bytes()
    assert isinstance(free, int) and free >= 0


@pytest.mark.parametrize("free, trimmed", [(3 << 30, True), (1 << 30, False), (None, False)])
def test_free_pages_go_back_to_the_system_only_past_the_limit(monkeypatch, free, trimmed):
    glibc = FakeGlibc()
    monkeypatch.setattr(allocator, "_glibc", lambda: glibc)
    monkeypatch.setattr(allocator, "free_heap_bytes", lambda: free)
    assert allocator.release_free_memory_over(2 << 30) is trimmed
    assert glibc.trims == int(trimmed)


def test_training_releases_the_free_heap_after_each_step_past_its_limit(monkeypatch):
    glibc = FakeGlibc()
    monkeypatch.setattr(allocator, "_glibc", lambda: glibc)
    frees = iter([FREE_HEAP_LIMIT + 1, FREE_HEAP_LIMIT, FREE_HEAP_LIMIT * 3])
    monkeypatch.setattr(allocator, "free_heap_bytes", lambda: next(frees))
    callback = ReleaseFreeHeap()
    for _ in range(3):
        callback.on_step_end(None, None, None)
    assert callback.releases == glibc.trims == 2
