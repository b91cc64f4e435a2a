"""The dashboard's responsiveness in a real browser, recorded in bench/results/dashboard_latency_cpu.json.

    .venv/bin/python bench/dashboard_latency.py [--out bench/results/dashboard_latency_cpu.json]

Runs the browser test's timing part (tests/test_browser.py, `streamlit run app/main.py` driven by Playwright and
Debian's Chromium) with ACTTAIL_LATENCY_OUT set, at 1400 and 800 px: the first chart's time after opening the page
on a warm server (performance.now() at the first drawn mark, median of 3) and, for 12 keyboard moves of the
sparsity slider, the time from the keydown to the budget heatmap's redraw, both measured inside the page. The issue
asks for a first chart under 3 s and a slider median under 300 ms (95th percentile under 500 ms); the test does not
assert them, since a loaded machine would fail it, so this script is where they are checked and kept.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRST_CHART_MS, SLIDER_MEDIAN_MS, SLIDER_P95_MS = 3000, 300, 500


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dashboard_latency_cpu.json")
    args = parser.parse_args()
    out = args.out.resolve()
    env = dict(os.environ, ACTTAIL_LATENCY_OUT=str(out))
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_browser.py",
               "-k", "first_chart_and_slider"]
    code = subprocess.call(command, cwd=ROOT, env=env)
    if code != 0:
        return code
    report = json.loads(out.read_text())
    met = True
    for width, row in report["widths"].items():
        ok = (row["first_chart_median_ms"] < FIRST_CHART_MS and row["slider_median_ms"] < SLIDER_MEDIAN_MS
              and row["slider_p95_ms"] < SLIDER_P95_MS)
        met &= ok
        print(f"{width} px: first chart {row['first_chart_median_ms']:.0f} ms, slider median "
              f"{row['slider_median_ms']:.0f} ms / p95 {row['slider_p95_ms']:.0f} ms -> "
              f"{'within' if ok else 'OUTSIDE'} the targets ({FIRST_CHART_MS} ms; {SLIDER_MEDIAN_MS} / "
              f"{SLIDER_P95_MS} ms)")
    print(f"recorded in {out}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
