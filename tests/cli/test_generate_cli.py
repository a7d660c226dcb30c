import json

import pytest

from tests.cli_runner import run_cli


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_generate_writes_one_row_per_prompt_in_order(tiny_model_dir, tmp_path, monkeypatch, capsys):
    prompts = [f"Question {i}: what is {i} plus {i}?" + " more" * (i % 3) for i in range(7)]
    source = write_lines(tmp_path / "p.jsonl", [json.dumps({"id": i, "prompt": p}) for i, p in enumerate(prompts)])
    out = tmp_path / "out" / "o.jsonl"
    code, stdout, _ = run_cli(
        monkeypatch, capsys, "generate", "--model", str(tiny_model_dir), "--prompts", str(source),
        "--out", str(out), "--max-new-tokens", "5", "--batch-size", "3", "--dtype", "float32",
    )  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == list(range(7))
    assert [row["prompt"] for row in rows] == prompts
    for row in rows:
        assert set(row) >= {"completion", "prompt_tokens", "completion_tokens", "finish_reason"}
        assert 0 <= row["completion_tokens"] <= 5 and row["prompt_tokens"] > 0
    assert "wrote 7 completions" in stdout


@pytest.mark.parametrize(
    ("lines", "extra", "message"),
    [
        (None, [], "file not found"),
        (['{"prompt": "ok"}', '{"prompt": "broken"'], [], r"p.jsonl:2: malformed JSON"),
        (['{"text": "hello", "id": 1}'], [], "no column 'prompt'; columns present: id, text"),
        ([], [], "no rows"),
        (['{"prompt": "ok"}'], ["--model", "embedded:llama-9000"], "unknown embedded model 'llama-9000'"),
        (['{"prompt": "   "}'], [], "row 1: 'prompt' is empty"),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(tmp_path, monkeypatch, capsys, lines, extra, message):
    source = tmp_path / "p.jsonl"
    if lines is not None:
        write_lines(source, lines) if lines else source.write_text("")
    code, stdout, stderr = run_cli(
        monkeypatch, capsys, "generate", "--prompts", str(source), "--out", str(tmp_path / "o.jsonl"), *extra
    )
    assert code == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert __import__("re").search(message, stderr), stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_non_utf8_prompts_file(tmp_path, monkeypatch, capsys):
    source = tmp_path / "p.jsonl"
    source.write_bytes(b'{"prompt": "caf\xe9"}\n')
    code, _, stderr = run_cli(monkeypatch, capsys, "generate", "--prompts", str(source), "--out", str(tmp_path / "o"))
    assert code == 2 and "p.jsonl:1: not valid UTF-8" in stderr


def test_every_command_has_help(monkeypatch, capsys):
    for command in (["--help"], ["generate", "--help"], ["models", "prepare", "--help"], ["data", "list", "--help"]):
        code, stdout, _ = run_cli(monkeypatch, capsys, *command)
        assert code == 0 and "Usage" in stdout


def test_models_prepare_prints_a_local_folder(tiny_model_dir, monkeypatch, capsys):
    code, stdout, _ = run_cli(monkeypatch, capsys, "models", "prepare", str(tiny_model_dir))
    assert code == 0 and stdout.strip() == str(tiny_model_dir)
