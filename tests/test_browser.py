"""End to end in a real browser: `streamlit run app/main.py` driven by Playwright with Debian's Chromium.

At 1400 and 800 px wide: the first chart on a warm server and the heatmap redrawn after each slider move, both
timed inside the page and reported, not asserted (a shared CI machine's load would make a timed assertion flaky;
`python bench/dashboard_latency.py` records the numbers in bench/results/); the layout at 800 px (nothing wider
than the page, charts stacked, controls readable, metrics whole). Then a researcher's session: a bad model path
(the error at the top, the last model kept), a heatmap click (ESD, URL), the allocation views, the budget
download, pins and the Compare tab, an uploaded budget reflected everywhere, the activations, a perplexity run
(the bar advances), a sweep, the throughput check with its spread. Screenshots of every tab at both widths go to
a temporary folder, and to assets/ when ACTTAIL_UPDATE_ASSETS=1 (`python scripts/screenshots.py` does that).

Chromium is not optional here: without /usr/bin/chromium the test fails with
the command that installs it (CI installs it with apt).
"""
from __future__ import annotations

import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from acttail_core.allocation import AllocationSettings, allocate
from acttail_core.budget import load_budget
from acttail_core.spectra import compute_spectra

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("ACTTAIL_CHROMIUM", "/usr/bin/chromium")
ASSETS = ROOT / "assets"
WIDE, NARROW = 1400, 800
HEIGHT = 1000
STARTUP_TIMEOUT_S = 90
RENDER_TIMEOUT_MS = 120_000
RUN_TIMEOUT_MS = 300_000
SLIDER_MOVES = 12
TABS = ("Spectra", "Allocation", "Compare", "Activations", "Evaluate", "Model")
CHART = '[data-testid="stVegaLiteChart"]'

pytestmark = [pytest.mark.timeout(900), pytest.mark.browser, pytest.mark.slow]  # a Chromium session of minutes

# performance.now() (ms since navigation) when the first chart has drawn its first mark.
FIRST_CHART_PROBE = f"""(() => {{
  window.__firstChart = null;
  const observer = new MutationObserver(() => {{
    if (window.__firstChart === null && document.querySelector('{CHART} svg path')) {{
      window.__firstChart = performance.now(); observer.disconnect(); }}
  }});
  observer.observe(document, {{ subtree: true, childList: true }});
}})()"""

# From the slider's keydown to the first change of the budget heatmap's drawing (Vega's SVG renderer redraws in
# one pass, so the first mutation is the redraw). Only the target chart is observed, so nothing else counts.
SLIDER_PROBE = f"""() => {{
  const probe = window.__slider = {{ down: null, done: null, arm() {{ this.down = null; this.done = null; }} }};
  for (const chart of document.querySelectorAll('{CHART}'))
    for (const text of chart.querySelectorAll('svg text'))
      if (text.textContent === 'Sparsity per projection') probe.chart = chart;
  document.addEventListener('keydown', () => {{ if (probe.down === null) probe.down = performance.now(); }}, true);
  new MutationObserver(() => {{ if (probe.down !== null && probe.done === null) probe.done = performance.now(); }})
    .observe(probe.chart, {{ subtree: true, childList: true, characterData: true, attributes: true }});
  return !!probe.chart;
}}"""

# Every value the progress bar shows while a run is under way.
PROGRESS_PROBE = """() => {
  window.__progress = [];
  new MutationObserver(() => {
    for (const bar of document.querySelectorAll('[data-testid="stProgress"] [role="progressbar"]')) {
      const value = bar.getAttribute('aria-valuenow');
      if (value !== null && window.__progress[window.__progress.length - 1] !== value) window.__progress.push(value);
    }
  }).observe(document.body, { subtree: true, childList: true, attributes: true });
}"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"streamlit exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"streamlit did not become healthy in {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("streamlit") / "server.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [
                sys.executable, "-m", "streamlit", "run", "app/main.py",
                "--server.headless", "true", "--server.port", str(port),
                "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
            ],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, server, log_path)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log_text = log_path.read_text()
        assert "Traceback" not in log_text, f"the server logged a traceback:\n{log_text[-3000:]}"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: the browser test needs it. Install it with "
            "`sudo apt-get install -y chromium` (or `bash scripts/setup.sh --test`), or set ACTTAIL_CHROMIUM.",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def _save(page, shots: Path, name: str) -> Path:
    """Screenshot the whole app at the page's current width; also into assets/ when asked to refresh them.

    Streamlit scrolls inside its main block, so a "full page" screenshot would stop at the viewport: the
    viewport is stretched to the content's height for the shot instead. Assets are stored with a 256-colour
    palette (a third of the size; the charts use far fewer colours).
    """
    width = page.viewport_size["width"]
    height = page.evaluate(
        """() => { const main = document.querySelector('[data-testid="stMainBlockContainer"]');
                   return main ? main.scrollHeight : document.body.scrollHeight; }"""
    )
    page.set_viewport_size({"width": width, "height": int(height) + 120})
    page.wait_for_timeout(1500)  # charts re-lay out to the new size
    path = shots / f"{name}.png"
    page.screenshot(path=str(path))
    page.set_viewport_size({"width": width, "height": HEIGHT})
    if os.environ.get("ACTTAIL_UPDATE_ASSETS") == "1":
        ASSETS.mkdir(exist_ok=True)
        Image.open(path).convert("RGB").quantize(256).save(ASSETS / f"{name}.png", optimize=True)
    return path


def _wait_idle(page) -> None:
    """Wait until no script run is in progress (Streamlit shows a running icon while one is)."""
    page.wait_for_timeout(400)  # the icon appears only once the rerun request is under way
    page.wait_for_function(
        """() => !document.querySelector('[data-testid="stStatusWidgetRunningIcon"]')""", timeout=RUN_TIMEOUT_MS,
        polling=100,
    )


def _open_tab(page, name: str):
    """Switch tab (bound to the URL, so the page reruns) and wait for that run to finish."""
    page.get_by_role("tab", name=name).click()
    panel = page.get_by_role("tabpanel", name=name)
    panel.wait_for(state="visible", timeout=RENDER_TIMEOUT_MS)
    _wait_idle(page)
    return panel


def _wait_chart(scope, title: str):
    chart = scope.locator(CHART).filter(has_text=title).first
    chart.locator("svg path").first.wait_for(state="attached", timeout=RENDER_TIMEOUT_MS)
    return chart


def _metric_value(page, label: str) -> str:
    metric = page.locator('[data-testid="stMetric"]', has_text=label).first
    return metric.locator('[data-testid="stMetricValue"]').inner_text().strip()


def _first_chart_ms(context, url: str) -> float:
    page = context.new_page()
    page.add_init_script(FIRST_CHART_PROBE)
    page.goto(url)
    page.wait_for_function("() => window.__firstChart !== null", timeout=RENDER_TIMEOUT_MS)
    elapsed = page.evaluate("window.__firstChart")
    _wait_idle(page)
    page.close()
    return elapsed


def _slider_latencies(page) -> list[float]:
    """Move the sparsity slider with the keyboard: up then back down; each move's in-page latency (ms)."""
    allocation = _open_tab(page, "Allocation")
    _wait_chart(allocation, "Sparsity per projection")
    page.wait_for_timeout(1500)
    assert page.evaluate(SLIDER_PROBE), "the budget heatmap was not found"
    thumb = allocation.get_by_role("slider", name="Global sparsity")
    start = float(_metric_value(page, "Target sparsity"))
    latencies = []
    for step in range(SLIDER_MOVES):
        key = "ArrowRight" if step < SLIDER_MOVES // 2 else "ArrowLeft"
        thumb.focus()
        page.evaluate("() => window.__slider.arm()")
        page.keyboard.press(key)
        page.wait_for_function("() => window.__slider.done !== null", timeout=30_000, polling=10)
        latencies.append(page.evaluate("() => window.__slider.done - window.__slider.down"))
        _wait_idle(page)  # the rest of the fragment (the other charts) finishes before the next move
    assert float(_metric_value(page, "Target sparsity")) == pytest.approx(start)  # up and back down again
    return latencies


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def _check_narrow_layout(page) -> None:
    """At 800 px: nothing wider than the page, chart rows stacked, select boxes readable, metrics whole."""
    problems = page.evaluate(
        """() => {
      const out = [];
      if (document.documentElement.scrollWidth > window.innerWidth + 1) out.push('page scrolls sideways');
      for (const box of document.querySelectorAll('[data-testid="stSelectbox"]')) {
        const r = box.getBoundingClientRect();
        if (r.width > 0 && r.width < 100) out.push('select box ' + Math.round(r.width) + ' px wide');
      }
      for (const value of document.querySelectorAll('[data-testid="stMetricValue"] div, [data-testid="stMetricValue"]'))
        if (value.scrollWidth > value.clientWidth + 1 && value.clientWidth > 0)
          out.push('metric cut: ' + value.textContent);
      for (const label of document.querySelectorAll('[data-testid="stWidgetLabel"] p'))
        if (label.getBoundingClientRect().height > 30) out.push('label wraps: ' + label.textContent);
      const charts = [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')]
        .map(c => c.getBoundingClientRect()).filter(r => r.width > 0);
      for (const r of charts) if (r.right > window.innerWidth + 1) out.push('chart past the edge');
      return out;
    }"""
    )
    assert not problems, problems


def _check_stacked(panel, first: str, second: str) -> None:
    a = _wait_chart(panel, first).bounding_box()
    b = _wait_chart(panel, second).bounding_box()
    assert b["y"] >= a["y"] + a["height"] - 1, f"{second!r} is not below {first!r} at 800 px"


def _check_side_by_side(panel, first: str, second: str) -> None:
    a = _wait_chart(panel, first).bounding_box()
    b = _wait_chart(panel, second).bounding_box()
    assert abs(b["y"] - a["y"]) < 5 and b["x"] > a["x"] + a["width"] - 1, f"{first!r} and {second!r} not side by side"


def test_first_chart_and_slider_redraw_at_both_widths(app_url, browser, shots):
    report = {}
    for width in (WIDE, NARROW):
        context = browser.new_context(viewport={"width": width, "height": HEIGHT})
        # A warm server and a browser that has seen the page (as a user opening it again).
        _first_chart_ms(context, f"{app_url}/")
        first = [_first_chart_ms(context, f"{app_url}/") for _ in range(3)]
        page = context.new_page()
        page.goto(f"{app_url}/?tab=Allocation")
        page.get_by_role("slider", name="Global sparsity").wait_for(timeout=RENDER_TIMEOUT_MS)
        latencies = _slider_latencies(page)
        report[width] = {
            "first_chart_ms": first, "first_chart_median_ms": statistics.median(first),
            "slider_ms": latencies, "slider_median_ms": statistics.median(latencies),
            "slider_p95_ms": _p95(latencies), "load_average": os.getloadavg()[0],
        }
        if width == NARROW:
            _check_narrow_layout(page)
            allocation = page.get_by_role("tabpanel", name="Allocation")
            _check_stacked(allocation, "Sparsity per projection", "Budget minus uniform")
        else:
            allocation = page.get_by_role("tabpanel", name="Allocation")
            _check_side_by_side(allocation, "Sparsity per projection", "Budget minus uniform")
        context.close()
    # bench/dashboard_latency.py names a file here to record the numbers; otherwise they stay with the screenshots.
    out = Path(os.environ.get("ACTTAIL_LATENCY_OUT") or shots / "latency.json")
    out.write_text(json.dumps({"cpu_cores": os.cpu_count(), "widths": report}, indent=1) + "\n")
    for width, row in report.items():
        print(f"{width} px: first chart {row['first_chart_median_ms']:.0f} ms (median of "
              f"{[round(v) for v in row['first_chart_ms']]}); slider -> redrawn heatmap median "
              f"{row['slider_median_ms']:.0f} ms, p95 {row['slider_p95_ms']:.0f} ms "
              f"{[round(v) for v in row['slider_ms']]}; load average {row['load_average']:.1f}")


def test_a_researchers_session(app_url, browser, shots, tmp_path, default_loaded):
    context = browser.new_context(viewport={"width": WIDE, "height": HEIGHT}, accept_downloads=True)
    page = context.new_page()
    page.goto(f"{app_url}/")

    # Opens where the charts are, naming the model.
    spectra = page.get_by_role("tabpanel", name="Spectra")
    heatmap = _wait_chart(spectra, "alpha per projection (mid rule)")
    assert page.locator("h1", has_text="SmolLM2-135M-Instruct").count() == 1
    assert page.get_by_role("tab", selected=True).inner_text() == "Spectra"
    assert heatmap.locator("svg text", has_text="10 of 210 cells outside").count() == 1  # the clipped scale says so
    _wait_idle(page)

    # A click on a cell opens its ESD, and the choice is in the URL.
    heatmap.locator('path[aria-label*="layer: 14;"][aria-label*="type: down;"]').first.click()
    spectra.locator(CHART).filter(has_text="ESD of model.layers.14.mlp.down_proj").first.wait_for(
        timeout=RENDER_TIMEOUT_MS)
    page.wait_for_function(
        "() => location.search.includes('esd_layer=14') && location.search.includes('esd_type=down')", timeout=30_000)
    _wait_idle(page)

    # A bad path: the reason and its hint at the top of the page at once, and the last model still works.
    page.get_by_role("combobox", name="Model").click()
    page.get_by_role("option", name="local directory").click()
    page.get_by_placeholder("/path/to/model-dir").fill("/definitely/not/a/model")
    page.get_by_placeholder("/path/to/model-dir").press("Enter")
    error = page.locator('[data-testid="stAlert"]', has_text="/definitely/not/a/model").first
    error.wait_for(timeout=RENDER_TIMEOUT_MS)
    assert "Hint:" in error.inner_text() and error.bounding_box()["y"] < HEIGHT  # on the first screen, unfolded
    page.locator('[data-testid="stAlert"]', has_text="Still showing SmolLM2-135M-Instruct").first.wait_for(
        timeout=30_000)
    assert page.get_by_role("tab").count() == len(TABS)
    page.get_by_role("combobox", name="Model").click()
    page.get_by_role("option", name="default").click()
    page.locator('[data-testid="stAlert"]', has_text="/definitely/not/a/model").wait_for(state="detached",
                                                                                       timeout=RENDER_TIMEOUT_MS)
    _wait_idle(page)

    # Allocation: the maps, the per-layer lines, the map's curve; the budget JSON downloads and validates.
    allocation = _open_tab(page, "Allocation")
    for title in ("Sparsity per projection", "Budget minus uniform", "Sparsity per layer", "alpha against sparsity",
                  "Mean sparsity per projection type", "alpha per layer"):
        _wait_chart(allocation, title)
    with page.expect_download(timeout=30_000) as download_info:
        allocation.get_by_role("button", name="Download budget JSON").click()
    budget_path = tmp_path / "budget.json"
    download_info.value.save_as(budget_path)
    budget = load_budget(budget_path)
    assert budget.target_sparsity == pytest.approx(0.5) and len(budget.projections) == 210

    # Two pins (T = 0.15, then 0.3) for the Compare tab; both go into the URL.
    allocation.get_by_role("button", name="Pin for comparison").click()
    _wait_idle(page)
    temperature = allocation.get_by_role("slider", name="Allocation temperature")
    for key in ("ArrowRight",) * 3:
        temperature.focus()
        page.keyboard.press(key)
        _wait_idle(page)
    allocation.locator('[data-testid="stCode"]', has_text="temperature=0.3").wait_for(timeout=30_000)
    allocation.get_by_role("button", name="Pin for comparison").click()
    _wait_idle(page)
    page.wait_for_function("() => decodeURIComponent(location.search).split('~').length > 10", timeout=30_000)
    for key in ("ArrowLeft",) * 3:
        temperature.focus()
        page.keyboard.press(key)
        _wait_idle(page)
    allocation.locator('[data-testid="stCode"]', has_text="temperature=0.15").wait_for(timeout=30_000)
    _save(page, shots, "allocation")

    # Activations: the histogram with both cuts.
    activations = _open_tab(page, "Activations")
    histogram = _wait_chart(activations, "Input magnitudes of model.layers.0.self_attn.q_proj")
    assert histogram.locator("svg text", has_text="TopK cut").count() >= 1
    assert histogram.locator("svg text", has_text="threshold mode").count() >= 1

    # Evaluate: a quick perplexity run whose bar advances, then a sweep, then the throughput check.
    evaluate = _open_tab(page, "Evaluate")
    tokens = evaluate.get_by_role("spinbutton", name="Tokens", exact=True)
    tokens.fill("128")
    tokens.press("Enter")
    _wait_idle(page)
    evaluate.get_by_text("not known until the first run", exact=False).first.wait_for(timeout=30_000)
    page.evaluate(PROGRESS_PROBE)
    evaluate.get_by_role("button", name="Run perplexity").click()
    evaluate.get_by_text("Run history (1 runs", exact=False).first.wait_for(timeout=RUN_TIMEOUT_MS)
    shown = [int(v) for v in page.evaluate("window.__progress")]
    assert len([v for v in shown if 0 < v < 100]) >= 2, shown  # it advanced during the run, not only at its end
    evaluate.get_by_text("at the speed measured earlier on this model", exact=False).first.wait_for(timeout=30_000)

    grid = evaluate.get_by_role("textbox", name="Sparsity targets")
    grid.fill("0.3, 0.6")
    grid.press("Enter")
    _wait_idle(page)
    evaluate.get_by_role("button", name="Run sweep").click()
    sweep = _wait_chart(evaluate, "Sweep (run 2)")
    assert sweep.locator("svg text", has_text="perplexity (log)").count() == 1
    with page.expect_download(timeout=30_000) as download_info:
        evaluate.get_by_role("button", name="Sweep (CSV)").click()
    sweep_csv = tmp_path / "sweep.csv"
    download_info.value.save_as(sweep_csv)
    assert sweep_csv.read_text().count("\n") == 6  # header + dense + 2 methods x 2 targets

    for name, value in (("Prompt tokens", "8"), ("New tokens", "2"), ("Repeats", "3")):
        box = evaluate.get_by_role("spinbutton", name=name, exact=True)
        box.fill(value)
        box.press("Enter")
        _wait_idle(page)
    evaluate.get_by_role("button", name="Measure throughput").click()
    throughput = _wait_chart(evaluate, "Throughput (tokens/s")
    assert throughput.locator("svg text", has_text="whiskers: min..max of the repeats").count() == 1
    assert evaluate.locator('[data-testid="stAlert"]').filter(has_text="rror").count() == 0
    _save(page, shots, "evaluate")

    # Compare: both pins side by side, evaluated together with dense and uniform.
    compare = _open_tab(page, "Compare")
    maps = compare.locator(CHART).filter(has_text="minus uniform at the same target")
    maps.nth(1).locator("svg path").first.wait_for(state="attached", timeout=RENDER_TIMEOUT_MS)
    assert maps.count() == 2
    compare.get_by_role("button", name="Evaluate pinned budgets").click()
    _wait_chart(compare, "Pinned budgets: perplexity against sparsity")
    _save(page, shots, "compare")

    # Screenshots of the other tabs, then every tab again at 800 px (the same session and results).
    for name, slug in (("Activations", "activations"), ("Model", "model"), ("Spectra", "spectra")):
        _open_tab(page, name)
        page.wait_for_timeout(1000)
        _save(page, shots, slug)
    page.set_viewport_size({"width": NARROW, "height": HEIGHT})
    for name in TABS:
        _open_tab(page, name)
        page.wait_for_timeout(1500)
        _check_narrow_layout(page)
        _save(page, shots, f"{name.lower()}-800")
    context.close()

    # An uploaded budget drives every view, the greyed sliders, the URL and the share link.
    uploaded = allocate(compute_spectra(default_loaded), 0.8, AllocationSettings(method="linear", eps=0.4))
    upload_path = tmp_path / "mine.json"
    upload_path.write_text(uploaded.to_json())
    context = browser.new_context(viewport={"width": WIDE, "height": HEIGHT})
    page = context.new_page()
    page.goto(f"{app_url}/?tab=Allocation")
    allocation = page.get_by_role("tabpanel", name="Allocation")
    _wait_chart(allocation, "Sparsity per projection")
    _wait_idle(page)
    allocation.locator('[data-testid="stFileUploaderDropzoneInput"]').first.set_input_files(str(upload_path))
    allocation.get_by_text("Using the uploaded budget", exact=False).first.wait_for(timeout=RENDER_TIMEOUT_MS)
    _wait_idle(page)
    slider = allocation.get_by_role("slider", name="Global sparsity")
    assert float(slider.input_value()) == pytest.approx(0.8) and slider.is_disabled()  # an <input type="range">
    assert "sparsity=0.8" in page.url and "method=linear" in page.url
    link = allocation.locator('[data-testid="stCode"]').first.inner_text()
    assert "sparsity=0.8" in link and "eps=0.4" in link
    allocation.get_by_text("rebuilds exactly this budget", exact=False).first.wait_for(timeout=30_000)
    evaluate = _open_tab(page, "Evaluate")
    evaluate.get_by_text("mine.json", exact=False).first.wait_for(timeout=30_000)
    context.close()
