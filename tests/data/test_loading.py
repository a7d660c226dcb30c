"""`load_rows`: every kind of data reference loads; every bad input gets a one-line message saying what is wrong."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import pytest

from selfalign.data.loading import builtin_sets, load_rows, parse_builtin_name, read_reference_rows, validate_rows
from selfalign.errors import SelfAlignError

ROWS = [
    {"prompt": "How do I boil an egg?", "response": "Simmer it for nine minutes.", "label": 0},
    {"prompt": "Name a prime number.", "response": "Seven.", "label": 0},
    {"prompt": "Give me a word for happy.", "response": "Cheerful.", "label": 1},
]


def _write(path: Path, rows: list[dict]) -> Path:
    """Write `rows` in the format `path`'s suffix names."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as parquet

        parquet.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise AssertionError(suffix)
    return path


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep what datasets.load_dataset caches inside the test's folder."""
    import datasets.config

    cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


# --- each kind of reference ------------------------------------------------------------------------------------


def test_builtin_split_written_either_way_is_the_same():
    dashed = load_rows("builtin:redteam-test", ["prompt", "category"])
    coloned = load_rows("builtin:redteam:test", ["prompt", "category"])
    assert dashed.to_list() == coloned.to_list()
    assert len(dashed) >= 100
    assert set(dashed["split"]) == {"test"}
    assert parse_builtin_name("redteam-test")[1] == parse_builtin_name("redteam:test")[1] == ["test"]
    # a set whose own name has a dash
    assert set(load_rows("builtin:benign-sensitive-train", ["prompt"])["split"]) == {"train"}


def test_builtin_without_split_is_every_split_with_a_split_column():
    dataset = load_rows("builtin:redteam", ["prompt"])
    train = read_reference_rows("builtin:redteam:train")
    dev = read_reference_rows("builtin:redteam:dev")
    test = read_reference_rows("builtin:redteam:test")
    assert len(dataset) == len(train) + len(dev) + len(test)
    assert {"id", "prompt", "category", "difficulty", "split"} <= set(dataset.column_names)
    assert dataset["split"] == ["train"] * len(train) + ["dev"] * len(dev) + ["test"] * len(test)


@pytest.mark.parametrize("name", sorted(builtin_sets()))
def test_every_builtin_set_loads_with_its_columns(name):
    builtin = builtin_sets()[name]
    dataset = load_rows(f"builtin:{name}", builtin.columns)
    assert set(builtin.columns) | {"split"} == set(dataset.column_names)
    assert set(dataset["split"]) == set(builtin.splits)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_local_files_load(tmp_path, suffix):
    path = _write(tmp_path / f"rows{suffix}", ROWS)
    dataset = load_rows(str(path), ["prompt", "response", "label"])
    assert dataset.to_list() == ROWS  # CSV integers come back as integers
    assert load_rows(str(path), ["prompt"], keep_other_columns=False).column_names == ["prompt"]


def test_json_file_may_wrap_its_rows_in_data(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": ROWS}), encoding="utf-8")
    assert load_rows(str(path), ["prompt"])["prompt"] == [row["prompt"] for row in ROWS]


def test_csv_keeps_text_columns_as_text(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text("id,prompt,label\n0001,Say hi,1\n0002,Say bye,0\n", encoding="utf-8")
    dataset = load_rows(str(path), ["prompt", "label"])
    assert dataset["id"] == ["0001", "0002"]
    assert dataset["label"] == [1, 0]


def test_hub_reference_to_a_local_dataset_folder(tmp_path, hf_cache):
    folder = tmp_path / "my-dataset"
    folder.mkdir()
    _write(folder / "train.jsonl", ROWS[:2])
    _write(folder / "test.jsonl", ROWS[2:])
    train = load_rows(f"hf:{folder}", ["prompt", "label"])  # split defaults to train
    assert train.to_list() == ROWS[:2]
    assert load_rows(f"hf:{folder}:test", ["prompt"])["prompt"] == [ROWS[2]["prompt"]]
    mapped = load_rows(f"hf:{folder}:train", ["question"], column_map={"question": "prompt"}, keep_other_columns=False)
    assert mapped.to_list() == [{"question": row["prompt"]} for row in ROWS[:2]]
    with pytest.raises(SelfAlignError, match="has no split 'validation'") as exc:
        load_rows(f"hf:{folder}:validation", ["prompt"])
    _one_line(exc)


def test_column_mapping_renames_source_columns(tmp_path):
    rows = [{"init_prompt": "Tell me a joke.", "other": 1}, {"init_prompt": "Name a colour.", "other": 2}]
    path = _write(tmp_path / "mapped.jsonl", rows)
    dataset = load_rows(str(path), ["prompt"], column_map={"prompt": "init_prompt"})
    assert dataset["prompt"] == ["Tell me a joke.", "Name a colour."]
    assert "init_prompt" not in dataset.column_names
    assert dataset["other"] == [1, 2]


# --- bad inputs ------------------------------------------------------------------------------------------------


def test_missing_column_lists_the_columns_present(tmp_path):
    path = _write(tmp_path / "rows.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(SelfAlignError, match=r"no column 'prompt'; columns present: answer, question") as exc:
        load_rows(str(path), ["prompt"])
    _one_line(exc)
    with pytest.raises(SelfAlignError, match=r"no column 'init_prompt' \(for 'prompt'\); columns present: answer"):
        load_rows(str(path), ["prompt"], column_map={"prompt": "init_prompt"})


def test_column_missing_from_some_rows_names_the_row(tmp_path):
    path = _write(tmp_path / "rows.jsonl", [{"prompt": "a", "label": 1}, {"prompt": "b"}])
    with pytest.raises(SelfAlignError, match="row 2 has no 'label' field"):
        load_rows(str(path), ["prompt", "label"])


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "fine"}\n\n{"prompt": "not closed"\n{"prompt": "after"}\n', encoding="utf-8")
    with pytest.raises(SelfAlignError, match=re.escape(f"{path}:3: malformed JSON")) as exc:
        load_rows(str(path), ["prompt"])
    _one_line(exc)


def test_malformed_json_file_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"prompt": "a"},\n{"prompt": }\n]\n', encoding="utf-8")
    with pytest.raises(SelfAlignError, match=re.escape(f"{path}:3: malformed JSON")):
        load_rows(str(path), ["prompt"])


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"prompt": "a"}\n["prompt"]\n', encoding="utf-8")
    with pytest.raises(SelfAlignError, match=re.escape(f"{path}:2: expected a JSON object, got list")):
        load_rows(str(path), ["prompt"])


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_non_utf8_input_names_the_file(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    text = {
        ".jsonl": '{"prompt": "caf\u00e9"}\n',
        ".json": '[{"prompt": "caf\u00e9"}]',
        ".csv": "prompt\ncaf\u00e9\n",
    }[suffix]
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(SelfAlignError, match=re.escape(str(path)) + r".*not valid UTF-8") as exc:
        load_rows(str(path), ["prompt"])
    _one_line(exc)


def test_damaged_parquet_names_the_file(tmp_path):
    path = tmp_path / "damaged.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(SelfAlignError, match=re.escape(f"{path}: cannot read as Parquet")):
        load_rows(str(path), ["prompt"])


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_missing_file(tmp_path, suffix):
    path = tmp_path / f"absent{suffix}"
    with pytest.raises(SelfAlignError, match=re.escape(f"{path}: file not found")):
        load_rows(str(path), ["prompt"])


def test_empty_prompts_and_exact_duplicates_are_dropped_with_counts_in_the_log(tmp_path, caplog):
    rows = [
        {"prompt": "Keep me."},
        {"prompt": ""},
        {"prompt": "   \t "},
        {"prompt": None},
        {"prompt": "Keep me."},
        {"prompt": "Keep me too."},
        {"prompt": "Keep me too."},
        {"prompt": "keep me."},  # differs in case: not an exact duplicate
    ]
    path = _write(tmp_path / "messy.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="selfalign.data.loading"):
        dataset = load_rows(str(path), ["prompt"])
    assert dataset["prompt"] == ["Keep me.", "Keep me too.", "keep me."]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == [f"{path}: dropped 3 empty prompts and 2 exact duplicates"]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="selfalign.data.loading"):
        assert len(load_rows(str(path), ["prompt"], clean=False)) == len(rows)
    assert caplog.records == []


def test_duplicates_are_judged_on_the_asked_columns(tmp_path, caplog):
    rows = [{"prompt": "Same", "response": "one"}, {"prompt": "Same", "response": "two"}]
    path = _write(tmp_path / "pairs.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="selfalign.data.loading"):
        assert len(load_rows(str(path), ["prompt", "response"])) == 2
        assert len(load_rows(str(path), ["prompt"])) == 1
    assert [record.getMessage() for record in caplog.records] == [
        f"{path}: dropped 0 empty prompts and 1 exact duplicates"
    ]


def test_nothing_usable(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(SelfAlignError, match="no rows"):
        load_rows(str(empty), ["prompt"])
    blank = _write(tmp_path / "blank.jsonl", [{"prompt": " "}, {"prompt": ""}])
    with pytest.raises(SelfAlignError, match="no usable rows left"):
        load_rows(str(blank), ["prompt"])


def test_rows_that_disagree_on_a_type(tmp_path):
    path = _write(tmp_path / "mixed.jsonl", [{"prompt": "a"}, {"prompt": 3}])
    with pytest.raises(SelfAlignError, match="rows disagree on a column's type") as exc:
        load_rows(str(path), ["prompt"])
    _one_line(exc)


def test_unknown_builtin_name_lists_the_available_sets():
    available = "available: benign-sensitive, capability, helpful, judge-labeled, redteam"
    with pytest.raises(SelfAlignError, match=available) as exc:
        load_rows("builtin:red-team", ["prompt"])
    _one_line(exc)
    with pytest.raises(SelfAlignError, match="unknown builtin data set 'redteam-val'"):
        load_rows("builtin:redteam-val", ["prompt"])


def test_unknown_split_lists_the_splits():
    with pytest.raises(SelfAlignError, match="builtin:redteam has no split 'val'; splits: train, dev, test") as exc:
        load_rows("builtin:redteam:val", ["prompt"])
    _one_line(exc)
    with pytest.raises(SelfAlignError, match="splits: dev, test"):
        load_rows("builtin:judge-labeled:train", ["prompt"])


def test_hub_name_offline_is_a_one_line_error(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SelfAlignError, match=r"cannot load hf:selfalign-tests/no-such-dataset .*HF_HUB_OFFLINE") as exc:
        load_rows("hf:selfalign-tests/no-such-dataset:test", ["prompt"])
    _one_line(exc)


@pytest.mark.parametrize("reference", ["notes.txt", "data.xlsx", "folder/without/suffix", "s3://bucket/rows"])
def test_unsupported_reference_lists_what_is_accepted(reference):
    with pytest.raises(SelfAlignError, match=r"cannot read data reference .*accepted: builtin:NAME\[:split\]") as exc:
        load_rows(reference, ["prompt"])
    assert ".jsonl/.json/.csv/.parquet" in _one_line(exc) and "hf:ORG/NAME" in str(exc.value)


# --- validate_rows ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_validate_rows_accepts_zero_one_labels(tmp_path, suffix):
    path = _write(tmp_path / f"good{suffix}", ROWS)
    assert validate_rows(str(path), ["prompt", "response", "label"]) == (
        f"{path}: 3 rows, columns: prompt, response, label"
    )


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([1, 2], "row 2: label must be 0 or 1, got 2"),
        ([0, -1], "row 2: label must be 0 or 1, got -1"),
        ([1, 0.5], "row 2: label must be 0 or 1, got 0.5"),
        ([1, None], "row 2: label must be 0 or 1, got None"),
        ([True, False], "row 1: label must be 0 or 1, got True"),
        (["no", "yes"], "row 1: label must be 0 or 1, got 'no'"),
        ([1, "yes"], "rows disagree on a column's type"),
    ],
)
def test_validate_rows_rejects_other_labels(tmp_path, labels, message):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": f"p{i}", "label": label} for i, label in enumerate(labels)])
    with pytest.raises(SelfAlignError, match=re.escape(f"{path}: {message}")) as exc:
        validate_rows(str(path), ["prompt", "label"])
    _one_line(exc)
