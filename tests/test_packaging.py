"""The wheel works without a checkout: it holds the shipped configs, and `selfalign run` with no config runs its
packaged demo from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from selfalign.pipeline.engine import STAGE_ORDER
from selfalign.shipped_configs import shipped_names

ROOT = Path(__file__).resolve().parents[1]


def _run(command: list[str | Path], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    finished = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, f"{command}: {finished.stdout}\n{finished.stderr}"
    return finished


def _build_wheel(tmp_path: Path) -> Path:
    """Build from a copy of the sources, so the checkout gets no build/ folder and the root configs/ link cannot
    stand in for files missing from the package."""
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    _run([*pip_wheel, source, "-w", tmp_path / "dist"], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("selfalign-*.whl")
    return wheel


def test_the_wheel_ships_the_configs_and_runs_its_demo_outside_a_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        files = {info.filename for info in archive.infolist() if not info.is_dir()}
    assert {f"selfalign/configs/{name}.yaml" for name in shipped_names()} <= files

    # A fresh environment that sees the installed torch, transformers, ... but gets selfalign from the wheel only.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=tmp_path)
    python, selfalign = venv / "bin" / "python", venv / "bin" / "selfalign"
    install = ["install", "--no-deps", "--no-index", "--ignore-installed", "--quiet", wheel]
    _run([sys.executable, "-m", "pip", "--python", python, *install], cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # the tests' src/ must not leak
    env.update(HF_HUB_OFFLINE="1", COLUMNS="250")
    imported = _run([python, "-c", "import selfalign; print(selfalign.__file__)"], elsewhere, env).stdout.strip()
    assert Path(imported).is_relative_to(venv), imported  # not the editable install or the checkout

    dry_run = _run([selfalign, "run", "--dry-run"], elsewhere, env)
    planned = [line.split()[0] for line in dry_run.stdout.splitlines() if line.strip()]
    assert planned == STAGE_ORDER, dry_run.stdout
    assert "runs/demo/tune-judge/" in dry_run.stdout and not (elsewhere / "runs").exists()
    packaged_demo = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert f"config: {packaged_demo / 'selfalign' / 'configs' / 'demo.yaml'} (the packaged demo" in dry_run.stderr

    listed = _run([selfalign, "configs", "list"], elsewhere, env).stdout
    assert all(f" {name} " in listed for name in shipped_names()), listed

    _run([selfalign, "configs", "copy", "demo"], elsewhere, env)
    edited = _run([selfalign, "run", "configs/demo.yaml", "out=edited", "--dry-run"], elsewhere, env)
    assert "edited/tune-judge/" in edited.stdout and "config:" not in edited.stderr
