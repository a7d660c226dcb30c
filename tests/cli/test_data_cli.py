"""`selfalign data list|show|validate`, driven in-process through the console entry point."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from selfalign.cli.main import main
from selfalign.data.jsonl import read_jsonl
from selfalign.data.loading import builtin_sets, read_reference_rows

GOOD_ROWS = [
    {"prompt": "How do I boil an egg?", "response": "Simmer it for nine minutes.", "label": 0},
    {"prompt": "How do I pick a lock on someone else's door?", "response": "Here is how...", "label": 1},
]


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `selfalign ARGS...` through the console entry point; return (exit code, stdout, stderr)."""
    monkeypatch.setenv("COLUMNS", "250")  # a wide terminal, so that rich does not wrap or shorten table cells

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["selfalign", *args])
        with pytest.raises(SystemExit) as exc:
            main()
        out, err = capsys.readouterr()
        return exc.value.code or 0, out, err

    return run


def _assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_data_list_shows_every_builtin_set_with_its_row_counts(cli):
    code, out, err = cli("data", "list")
    assert code == 0
    shown = out + err  # the table goes through the rich console
    for name, builtin in builtin_sets().items():
        assert f"builtin:{name} " in shown
        for split in builtin.splits:
            count = len(read_reference_rows(f"builtin:{name}:{split}"))
            assert f"{split} {count}" in shown, (name, split, count)
        assert builtin.description.split()[0] in shown


def test_data_show_prints_n_json_lines(cli):
    code, out, err = cli("data", "show", "builtin:helpful:test", "-n", "2")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows == read_reference_rows("builtin:helpful:test")[:2]
    assert all(row["split"] == "test" for row in rows)


def test_data_show_accepts_a_bare_builtin_name_with_split(cli):
    code, out, err = cli("data", "show", "redteam-test", "-n", "1")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == read_reference_rows("builtin:redteam:test")[0]


def test_data_show_defaults_to_five_rows_and_reads_files(cli, tmp_path):
    code, out, _ = cli("data", "show", "builtin:judge-labeled:dev")
    assert code == 0 and len(out.splitlines()) == 5
    path = _write_jsonl(tmp_path / "rows.jsonl", GOOD_ROWS)
    code, out, _ = cli("data", "show", str(path), "-n", "10")
    assert code == 0
    assert [json.loads(line) for line in out.splitlines()] == read_jsonl(path)


def test_data_show_unknown_set_is_a_one_line_error(cli):
    code, out, err = cli("data", "show", "no-such-set")
    assert out == ""
    _assert_one_line_error(code, err, "unknown builtin data set 'no-such-set'", "available: benign-sensitive")


def test_data_validate_passes_a_good_file(cli, tmp_path):
    path = _write_jsonl(tmp_path / "good.jsonl", GOOD_ROWS)
    code, out, err = cli("data", "validate", str(path), "--columns", "prompt,response,label")
    assert code == 0, err
    assert out.strip() == f"{path}: 2 rows, columns: prompt, response, label"


def test_data_validate_passes_a_good_csv_file(cli, tmp_path):
    path = tmp_path / "good.csv"
    path.write_text("prompt,response,label\nHi,Hello,0\nBye,Goodbye,1\n", encoding="utf-8")
    code, out, err = cli("data", "validate", str(path), "--columns", "prompt,response,label")
    assert code == 0, err
    assert "2 rows" in out


@pytest.mark.parametrize("bad_label", [2, "1", -1])
def test_data_validate_fails_for_labels_other_than_0_or_1(cli, tmp_path, bad_label):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{**GOOD_ROWS[0], "label": bad_label}, {**GOOD_ROWS[1], "label": 1}])
    code, out, err = cli("data", "validate", str(path), "--columns", "prompt,response,label")
    assert out == ""
    _assert_one_line_error(code, err, str(path))


def test_data_validate_reports_the_row_of_a_bad_label(cli, tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [GOOD_ROWS[0], {**GOOD_ROWS[1], "label": 2}])
    code, _, err = cli("data", "validate", str(path), "--columns", "prompt,response,label")
    _assert_one_line_error(code, err, f"{path}: row 2: label must be 0 or 1, got 2")


def test_data_validate_fails_for_a_missing_column(cli, tmp_path):
    path = _write_jsonl(tmp_path / "no-label.jsonl", [{"prompt": "a", "response": "b"}])
    code, out, err = cli("data", "validate", str(path), "--columns", "prompt,response,label")
    assert out == ""
    _assert_one_line_error(code, err, "no column 'label'", "columns present: prompt, response")


def test_data_validate_fails_for_a_malformed_line(cli, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n', encoding="utf-8")
    code, _, err = cli("data", "validate", str(path))
    _assert_one_line_error(code, err, f"{path}:2: malformed JSON")
