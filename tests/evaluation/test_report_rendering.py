"""The HTML report renders in headless Chromium and shows its plots (skipped where Chromium is not installed)."""

import importlib.util
import shutil
from pathlib import Path

import pytest

from selfalign.reporting.report import write_report
from tests.evaluation.test_metrics import CONFIG, sample

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    from selfalign.evaluation.metrics import compute_metrics

    samples = [sample("base", "harmful", 1, False), sample("base", "harmful", 0, True, complies=0),
               sample("base", "benign", 0, False), sample("dpo", "harmful", 0, True, complies=0),
               sample("dpo", "harmful", 0, True, complies=0), sample("dpo", "benign", 0, True, complies=0)]  # fmt: skip
    metrics = compute_metrics(samples, {"dpo": [{"outcome": 1.0}, {"outcome": 0.5}]}, CONFIG)
    write_report(tmp_path, metrics, samples, examples=1)
    spec = importlib.util.spec_from_file_location("screenshot_report", ROOT / "scripts" / "screenshot_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    png = module.screenshot(tmp_path / "report.html", tmp_path / "report.png", height=1600)

    from PIL import Image

    image = Image.open(png).convert("L")
    assert image.size == (1200, 1600)
    colours = image.getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 50  # plots and text, not a blank page
