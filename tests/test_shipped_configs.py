"""The config files shipped in the package: one folder, named from the checkout's configs/ and from the package."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfalign.errors import SelfAlignError
from selfalign.pipeline.config import DEFAULT_CONFIG, load_run_config
from selfalign.shipped_configs import (
    SHIPPED_CONFIGS,
    copy_shipped,
    describe,
    describe_shipped,
    shipped_config,
    shipped_names,
)

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {
    "demo", "preferences-demo", "reference-mistral-7b", "mistral-7b-helpful-mix", "training/embedded-cpu",
    "training/reference-mistral-7b", "accelerate/cpu-2proc", "accelerate/ddp", "accelerate/fsdp",
    "accelerate/deepspeed-zero3",
}  # fmt: skip


def test_the_checkouts_configs_folder_is_the_packaged_one():
    """One source of truth: configs/ at the root links to the package's folder, so README paths name its files."""
    assert (ROOT / "configs").is_symlink() and (ROOT / "configs").resolve() == SHIPPED_CONFIGS.resolve()


def test_every_shipped_config_has_a_name_and_a_description():
    described = dict(describe_shipped())
    assert set(described) >= EXPECTED
    assert all(description and "\n" not in description for description in described.values()), described
    assert described["demo"].startswith("The demo: the whole loop on the embedded model")


def test_every_shipped_config_loads_with_the_loader_of_its_kind():
    """Recursively, whatever is added later: a run config unless its folder or its header's command says otherwise."""
    from accelerate.commands.config.config_args import load_config_from_file

    from selfalign.pipeline.sweep import load_sweep
    from selfalign.preferences.config import load_preferences_config
    from selfalign.training.config import load_training_config

    for name in shipped_names():
        path = shipped_config(name)
        if name.startswith("training/"):
            load_training_config(path)
        elif name.startswith("accelerate/"):
            load_config_from_file(str(path))
        elif name.startswith("sweeps/"):
            load_sweep(path)
        elif path.read_text().startswith("# selfalign preferences "):
            load_preferences_config(path)
        else:
            load_run_config(path)


def test_names_with_or_without_the_folder_and_suffix_name_one_file():
    assert shipped_config("demo") == shipped_config("demo.yaml") == shipped_config("configs/demo.yaml")
    assert shipped_config("training/embedded-cpu") == SHIPPED_CONFIGS / "training" / "embedded-cpu.yaml"


def test_an_unknown_name_is_one_line_that_lists_the_names():
    with pytest.raises(SelfAlignError) as error:
        shipped_config("dem")
    message = str(error.value)
    assert "\n" not in message and message.startswith("no shipped config named 'dem'; shipped configs: ")
    assert "demo" in message and "training/embedded-cpu" in message


def test_the_description_skips_the_command_and_stops_at_the_first_sentence(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("# selfalign run x.yaml\n# Short words here. More words\n# on the next line.\nseed: 0\n# later\n")
    assert describe(path) == "Short words here"
    path.write_text("#   selfalign run x.yaml\n# A clause: " + "more " * 40 + "\nseed: 0\n")
    assert describe(path) == "A clause"  # a long sentence keeps its first clause
    path.write_text("# " + "word " * 40 + "\nseed: 0\n")
    assert describe(path) == "word " * 32 + "..."  # cut at a word within 160 characters
    path.write_text("seed: 0\n")
    assert describe(path) == ""


def test_run_with_no_config_reads_the_packaged_demo_even_beside_another_demo(tmp_path, monkeypatch):
    """An explicit path wins; with none, the packaged demo runs, whatever configs/demo.yaml this folder holds."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("seed: 7\n")
    assert DEFAULT_CONFIG == SHIPPED_CONFIGS / "demo.yaml"
    assert load_run_config(None).seed == 0
    assert load_run_config("configs/demo.yaml").seed == 7


def test_copy_writes_configs_name_here_and_refuses_to_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    written = copy_shipped("training/embedded-cpu")
    assert written == Path("configs/training/embedded-cpu.yaml")
    assert written.read_bytes() == shipped_config("training/embedded-cpu").read_bytes()
    written.write_text("preset: reference\n")
    with pytest.raises(SelfAlignError, match=r"configs/training/embedded-cpu.yaml exists; pass --force"):
        copy_shipped("training/embedded-cpu")
    assert written.read_text() == "preset: reference\n"
    copy_shipped("training/embedded-cpu", force=True)
    assert written.read_bytes() == shipped_config("training/embedded-cpu").read_bytes()


def test_copy_to_a_folder_or_a_file(tmp_path):
    (tmp_path / "mine").mkdir()
    assert copy_shipped("demo", tmp_path / "mine") == tmp_path / "mine" / "demo.yaml"
    assert copy_shipped("demo", tmp_path / "a" / "b.yaml").read_bytes() == shipped_config("demo").read_bytes()


def test_copy_never_writes_onto_the_shipped_file_itself(monkeypatch):
    """In a checkout configs/ is the package's folder: a forced copy there would rewrite the source."""
    monkeypatch.chdir(ROOT)
    before = shipped_config("demo").read_bytes()
    with pytest.raises(SelfAlignError, match="is the shipped config itself"):
        copy_shipped("demo", force=True)
    assert shipped_config("demo").read_bytes() == before
