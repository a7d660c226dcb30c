"""`selfalign configs list|show|copy`, driven in-process through the console entry point."""

from __future__ import annotations

from selfalign.shipped_configs import shipped_config, shipped_names
from tests.cli_runner import run_cli


def test_list_names_every_shipped_config_with_its_description(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "250")  # rich would wrap the descriptions to a narrow terminal
    code, out, _ = run_cli(monkeypatch, capsys, "configs", "list")
    assert code == 0
    for name in shipped_names():
        assert f" {name} " in out, name
    assert "The demo: the whole loop on the embedded model" in out
    assert "pip install 'selfalign[deepspeed]'" in out  # brackets are text, not rich markup


def test_show_prints_the_file(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "configs", "show", "training/embedded-cpu")
    assert code == 0 and out == shipped_config("training/embedded-cpu").read_text()


def test_an_unknown_name_is_a_one_line_error_listing_the_names(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "configs", "show", "nope")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: no shipped config named 'nope'; shipped configs: ")
    assert "accelerate/ddp" in err


def test_copy_writes_configs_name_and_needs_force_to_replace(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(monkeypatch, capsys, "configs", "copy", "demo")
    assert code == 0 and out.strip() == "wrote configs/demo.yaml"
    assert (tmp_path / "configs" / "demo.yaml").read_bytes() == shipped_config("demo").read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, "configs", "copy", "demo")
    assert code == 2 and err.strip() == "error: configs/demo.yaml exists; pass --force to replace it"
    code, out, _ = run_cli(monkeypatch, capsys, "configs", "copy", "demo", "mine.yaml", "--force")
    assert code == 0 and (tmp_path / "mine.yaml").exists()
