"""Refresh the README's screenshots (assets/*.png) from the real app.

Runs the browser end-to-end test (tests/test_browser.py: `streamlit run app/main.py`
driven by Playwright and Debian's Chromium) with ACTTAIL_UPDATE_ASSETS=1, which
copies its screenshot of every tab into assets/.

    .venv/bin/python scripts/screenshots.py
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    env = dict(os.environ, ACTTAIL_UPDATE_ASSETS="1")
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_browser.py"]
    sys.exit(subprocess.call(command, cwd=ROOT, env=env))
