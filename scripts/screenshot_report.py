"""Render an evaluation report.html in headless Chromium and save a PNG screenshot of it.

    python scripts/screenshot_report.py EVAL_DIR/report.html [OUT.png] [--height 3000]

Needs Debian's chromium (`apt-get install chromium`). Flags as this workplace's notes advise: no sandbox (root), no
GPU, no background networking, a fresh profile.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def screenshot(html: Path, png: Path, width: int = 1200, height: int = 3000) -> Path:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise RuntimeError("no chromium found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={png.resolve()}",
             html.resolve().as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("png", type=Path, nargs="?")
    parser.add_argument("--height", type=int, default=3000)
    args = parser.parse_args()
    png = args.png or args.html.with_suffix(".png")
    print(screenshot(args.html, png, height=args.height))


if __name__ == "__main__":
    sys.exit(main())
