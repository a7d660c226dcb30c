import pytest

from selfalign.data.resumable import ResumableJsonl, process_resumably
from selfalign.errors import SelfAlignError

ITEMS = [{"key": f"item-{i}", "x": i} for i in range(10)]


def double(chunk):
    return [{"key": item["key"], "y": item["x"] * 2, "batch": [i["x"] for i in chunk]} for item in chunk]


def test_an_interrupted_loop_resumes_with_no_item_lost_or_done_twice(tmp_path):
    path = tmp_path / "progress.jsonl"
    calls = []

    def failing_after_two_chunks(chunk):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append([i["key"] for i in chunk])
        return double(chunk)

    with pytest.raises(KeyboardInterrupt):
        process_resumably(ITEMS, ResumableJsonl(path), failing_after_two_chunks, chunk_size=3)
    assert len(ResumableJsonl(path)) == 6
    redone = []
    rows = process_resumably(ITEMS, ResumableJsonl(path), lambda c: redone.extend(c) or double(c), chunk_size=3)
    assert [r["y"] for r in rows] == [2 * i for i in range(10)]
    assert [i["x"] for i in redone] == [6, 7, 8, 9]
    uninterrupted = process_resumably(ITEMS, ResumableJsonl(tmp_path / "clean.jsonl"), double, chunk_size=3)
    assert rows == uninterrupted  # same batches, so the same results
    keys = [line for line in path.read_text().splitlines()]
    assert len(keys) == 10


def test_a_torn_last_line_is_dropped_and_redone(tmp_path):
    path = tmp_path / "progress.jsonl"
    process_resumably(ITEMS[:3], ResumableJsonl(path), double, chunk_size=3)
    with path.open("a") as handle:
        handle.write('{"key": "item-3", "y"')  # killed in the middle of a write
    store = ResumableJsonl(path)
    assert len(store) == 3 and "item-3" not in store
    assert path.read_text().endswith("\n")


def test_doing_an_item_twice_is_refused(tmp_path):
    store = ResumableJsonl(tmp_path / "p.jsonl")
    store.append([{"key": 1}])
    with pytest.raises(SelfAlignError, match="already done"):
        store.append([{"key": 1}])


def test_a_damaged_progress_file_is_a_clear_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"key": 1}\nnot json\n')
    with pytest.raises(SelfAlignError, match=r"p.jsonl:2: damaged progress file"):
        ResumableJsonl(path)
