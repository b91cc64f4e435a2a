"""AppTest (streamlit.testing.v1) tests of every tab of the dashboard.

The default model and its spectra come from the engine's caches (the first
load in a test process takes a few seconds; the app's process-wide store makes
later AppTests instant). Measuring functions are mocked where the button, not
the measurement, is under test; the tiny model runs the real engine where the
wiring is.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from acttail_core.allocation import AllocationSettings, allocate
from acttail_core.budget import load_budget
from acttail_core.models import cache_root, load_model
from acttail_core.spectra import compute_spectra
from tests.conftest import byte_tokenizer, make_tiny_family

APP = str(Path(__file__).resolve().parents[1] / "app" / "main.py")
TIMEOUT = 180

pytestmark = pytest.mark.timeout(400)


def run_app(**query: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    for key, value in query.items():
        at.query_params[key] = value
    at.run()
    return at


def open_tab(at: AppTest, tab: str) -> AppTest:
    """Switch tab as a click does: the tab is bound to the URL, and a rerun follows it."""
    at.query_params["tab"] = tab
    return at.run()


def assert_clean(at: AppTest) -> None:
    """No exception element (a traceback) and no error box."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def metric(at: AppTest, label: str) -> str:
    for element in at.metric:
        if element.label.startswith(label):
            return element.value
    raise AssertionError(f"no metric {label!r}: {[m.label for m in at.metric]}")


# Streamlit gives a chart without a selection no element id, so charts are found by their titles.
TITLES = {
    "alpha_heatmap": "alpha per projection (", "esd_plot": "ESD of ", "alpha_by_type": "alpha per projection type",
    "alpha_by_layer": "alpha per layer", "budget_heatmap": "Sparsity per projection",
    "difference_heatmap": "Budget minus uniform", "sparsity_by_layer": "Sparsity per layer",
    "alpha_vs_sparsity": "alpha against sparsity", "sparsity_by_type": "Mean sparsity per projection type",
    "params_by_type": "Weights per projection type", "activation_histogram": "Input magnitudes of",
    "sweep_chart": "Sweep (run", "history_chart": "Run history", "compare_ppl": "Pinned budgets",
    "throughput": "Throughput", "perplexity": "Perplexity (lower",
}


def _specs(at: AppTest) -> list[tuple[dict, object]]:
    return [(json.loads(chart.proto.spec), chart) for chart in at.get("vega_lite_chart")]


def chart_keys(at: AppTest) -> list[str]:
    """Which of the known charts are on the page (by title), in page order; 'compare_map' for a pinned map."""
    found = []
    for spec, _ in _specs(at):
        if "minus uniform at the same target" in spec["title"].get("subtitle", ""):
            found.append("compare_map")
            continue
        found += [key for key, prefix in TITLES.items() if spec["title"]["text"].startswith(prefix)][:1]
    return found


def figure(at: AppTest, key: str) -> dict:
    """A chart's Vega-Lite spec (its data travels separately: ``chart_data``)."""
    return _chart(at, key)[0]


def _chart(at: AppTest, key: str):
    for spec, chart in _specs(at):
        if spec["title"]["text"].startswith(TITLES[key]):
            return spec, chart
    raise AssertionError(f"no chart {key!r}: {chart_keys(at)}")


def chart_data(at: AppTest, key: str, column: str) -> pd.DataFrame:
    """The dataset of chart ``key`` that has ``column`` (Streamlit sends each as Arrow)."""
    _, chart = _chart(at, key)
    for raw in [chart.proto.data.data] + [dataset.data.data for dataset in chart.proto.datasets]:
        frame = pa.ipc.open_stream(raw).read_pandas() if raw else pd.DataFrame()
        if column in frame:
            return frame
    raise AssertionError(f"no dataset with {column!r} in chart {key!r}")


def title(spec: dict) -> str:
    return f"{spec['title']['text']} | {spec['title'].get('subtitle', '')}"


def query_param(at: AppTest, key: str) -> str:
    value = at.query_params[key]
    return value if isinstance(value, str) else value[-1]


def code_text(at: AppTest) -> str:
    return " ".join(c.value for c in at.code)


# --------------------------------------------------------------------------- page, model, errors


def test_opens_on_the_charts_and_names_the_model(default_loaded):
    at = run_app()
    assert_clean(at)
    assert at.title[0].value == "ActTail Explorer · SmolLM2-135M-Instruct"
    assert "30 layers, 210 projections" in at.caption[0].value
    assert [tab.label for tab in at.tabs] == ["Spectra", "Allocation", "Compare", "Activations", "Evaluate", "Model"]
    assert chart_keys(at)[0] == "alpha_heatmap"  # the first tab is a chart, not a table
    assert "budget_heatmap" not in chart_keys(at)  # only the open tab draws its charts
    assert at.selectbox(key="model").value == "default"


def test_model_tab_has_the_facts_and_a_chart(default_loaded):
    at = run_app(tab="Model")
    assert_clean(at)
    assert any("Architecture **LlamaForCausalLM**" in m.value for m in at.markdown)
    assert metric(at, "Layers") == "30" and metric(at, "Projections") == "210" and metric(at, "Device") == "cpu"
    assert chart_data(at, "params_by_type", "millions")["type"].tolist() == ["q", "k", "v", "o", "gate", "up", "down"]


def test_bad_model_path_from_a_link_is_not_echoed():
    """A link's path is loaded, but neither echoed nor described: the link's author learns nothing of our files."""
    at = run_app(model="local directory", path="/definitely/not/a/model")
    assert not at.exception
    assert len(at.error) == 1
    assert "could not load the model named in the link" in at.error[0].value and "Hint" in at.error[0].value
    assert "/definitely" not in repr(at._tree)
    assert len(at.tabs) == 0  # nothing loaded before in this session: nothing to fall back to


def test_bad_model_path_typed_here_shows_why_at_the_top_and_keeps_the_last_model(default_loaded):
    at = run_app(tab="Allocation")
    assert_clean(at)
    at.selectbox(key="model").set_value("local directory").run()
    at.text_input(key="path").input("/definitely/not/a/model").run()
    assert not at.exception
    assert len(at.error) == 1
    message = at.error[0].value
    assert "/definitely/not/a/model" in message and "not found" in message and "**Hint:**" in message
    # The error is shown, not folded away, and the previous model stays usable: tabs, charts, sliders.
    assert any("Still showing **SmolLM2-135M-Instruct**" in info.value for info in at.info)
    assert at.title[0].value.endswith("SmolLM2-135M-Instruct") and len(at.tabs) == 6
    at.slider(key="sparsity").set_value(0.6).run()
    assert at.session_state["current_target"] == pytest.approx(0.6)
    assert "budget_heatmap" in chart_keys(at)


@pytest.mark.slow  # a whole AppTest run, seconds
def test_a_server_listening_everywhere_by_accident_serves_nothing(monkeypatch):
    import streamlit

    monkeypatch.setattr(type(streamlit.context), "url", property(lambda self: "http://192.0.2.1:8501/"))
    original = streamlit.get_option
    assert original("server.address") == "127.0.0.1"  # .streamlit/config.toml, read from the repository root

    def address(value):
        return lambda key: value if key == "server.address" else original(key)

    monkeypatch.setattr(streamlit, "get_option", address(None))  # as when started from another folder
    at = run_app()
    assert len(at.error) == 1 and "listens on every network interface" in at.error[0].value
    assert len(at.tabs) == 0
    monkeypatch.setattr(streamlit, "get_option", address("0.0.0.0"))  # exposed on purpose
    at = run_app()
    assert_clean(at)
    assert len(at.tabs) == 6


# --------------------------------------------------------------------------- Spectra tab


def test_spectra_tab_heatmap_esd_lines_and_csv(default_loaded):

    at = run_app()
    for chart in ("alpha_heatmap", "esd_plot", "alpha_by_type", "alpha_by_layer"):
        assert chart in chart_keys(at)
    assert "10 of 210 cells outside" in title(figure(at, "alpha_heatmap"))  # the clipped colour scale says so
    marks = chart_data(at, "alpha_heatmap", "mark")["mark"]
    assert (marks != "").sum() == 10
    at.selectbox(key="esd_layer").set_value(7)
    at.selectbox(key="esd_type").set_value("up")
    at.run()
    assert_clean(at)
    entry = compute_spectra(default_loaded).by_name()["model.layers.7.mlp.up_proj"]
    assert f"alpha = **{entry.alpha:.3f}**" in " ".join(c.value for c in at.caption)
    assert any("spectra" in d.proto.label for d in at.get("download_button"))


def test_esd_choice_comes_from_the_url(default_loaded):
    at = run_app(esd_layer="12", esd_type="down")
    assert_clean(at)
    assert (at.selectbox(key="esd_layer").value, at.selectbox(key="esd_type").value) == (12, "down")
    assert "model.layers.12.mlp.down_proj" in title(figure(at, "esd_plot"))


@pytest.mark.slow  # the dashboard on the real default model
def test_xmin_rule_is_selectable():
    at = run_app(rule="ks", tab="Allocation")
    assert_clean(at)
    assert at.selectbox(key="rule").value == "ks"
    assert at.session_state["current_label"].endswith("projection, ks)")


# --------------------------------------------------------------------------- Allocation tab


def test_sliders_change_the_budget_and_its_views(default_loaded):

    at = run_app(tab="Allocation")
    assert_clean(at)
    assert metric(at, "Effective sparsity") == "0.5000"
    for chart in ("budget_heatmap", "difference_heatmap", "sparsity_by_layer", "alpha_vs_sparsity",
                  "sparsity_by_type", "alpha_by_layer"):
        assert chart in chart_keys(at)

    at.slider(key="sparsity").set_value(0.7).run()
    assert_clean(at)
    assert metric(at, "Effective sparsity") == "0.7000"
    shown = chart_data(at, "budget_heatmap", "sparsity")
    assert (shown["params"] * shown["sparsity"]).sum() / shown["params"].sum() == pytest.approx(0.7)
    scale = figure(at, "difference_heatmap")["encoding"]["color"]["scale"]
    assert scale["domainMid"] == 0 and scale["scheme"] == "redblue"  # diverging, centred on 0

    at.slider(key="temperature").set_value(0.0).run()
    assert chart_data(at, "difference_heatmap", "difference")["difference"].abs().max() < 1e-9

    at.selectbox(key="method").set_value("linear").run()
    at.selectbox(key="direction").set_value("keep-heavy").run()
    at.selectbox(key="group").set_value("type").run()
    assert_clean(at)
    expected = allocate(compute_spectra(default_loaded), 0.7,
                        AllocationSettings(method="linear", direction="keep-heavy", group="type"))
    shown = chart_data(at, "budget_heatmap", "sparsity").set_index("name")["sparsity"]
    assert shown.to_dict() == pytest.approx(expected.sparsity_by_name())
    # group=type: one curve per type in the alpha -> sparsity view
    assert chart_data(at, "alpha_vs_sparsity", "curve")["curve"].nunique() == 7
    assert at.session_state["allocation_render_ms"] < 3000
    print(f"allocation fragment (allocate + charts), server side: {at.session_state['allocation_render_ms']:.0f} ms")


@pytest.mark.slow  # the dashboard on the real default model
def test_query_params_reproduce_the_view():
    at = run_app(sparsity="0.65", temperature="2.5", method="acttail", direction="keep-heavy", group="layer",
                 tab="Allocation", esd_layer="3")
    assert_clean(at)
    assert at.session_state["current_target"] == 0.65
    assert at.session_state["current_label"] == "acttail (T=2.5, keep-heavy, layer, mid)"
    link = code_text(at)
    for part in ("sparsity=0.65", "temperature=2.5", "direction=keep-heavy", "group=layer", "model=default",
                 "tab=Allocation", "esd_layer=3", "eval_tokens=", "sweep_methods=dense"):
        assert part in link


def test_budget_json_download_is_valid(default_loaded):
    at = run_app(sparsity="0.6", tab="Allocation")
    labels = [d.proto.label for d in at.get("download_button")]
    assert "Download budget JSON" in labels
    from acttail_core.projections import find_projections

    budget = allocate(compute_spectra(default_loaded), 0.6)
    reread = load_budget(budget.to_json(), projections=find_projections(default_loaded.model),
                         fingerprint=default_loaded.fingerprint)
    assert reread == budget and at.session_state["current_target"] == 0.6


def test_uploaded_budget_is_validated_and_used_everywhere(default_loaded):

    at = run_app(tab="Allocation")
    at.file_uploader(key="budget_upload").upload("broken.json", b"{not json", "application/json")
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and "not valid JSON" in at.error[0].value and "Hint" in at.error[0].value
    assert any("Nothing changed" in c.value for c in at.caption)
    assert at.session_state["current_target"] == 0.5 and metric(at, "Method") == "acttail"

    good = allocate(compute_spectra(default_loaded, rule="ks"), 0.8, AllocationSettings(method="linear", eps=0.4))
    at.file_uploader(key="budget_upload").set_value(("good.json", good.to_json().encode(), "application/json"))
    at.run()
    assert_clean(at)
    # The file is in charge everywhere: the greyed sliders and the model bar show its settings, so do the URL
    # and the share link, which rebuilds it exactly.
    assert at.slider(key="sparsity").disabled and at.slider(key="sparsity").value == pytest.approx(0.8)
    assert at.selectbox(key="method").value == "linear" and at.slider(key="eps").value == pytest.approx(0.4)
    assert at.selectbox(key="rule").value == "ks"
    assert metric(at, "Effective sparsity") == "0.8000" and at.session_state["current_label"] == "good.json"
    link = code_text(at)
    assert "sparsity=0.8" in link and "method=linear" in link and "rule=ks" in link
    assert any("rebuilds exactly this budget" in c.value for c in at.caption)
    open_tab(at, "Evaluate")
    assert any("**good.json** at target 0.80 (an uploaded file)" in m.value for m in at.markdown)
    open_tab(at, "Activations")
    assert metric(at, "Sparsity here") == f"{good.sparsity_by_name()['model.layers.0.self_attn.q_proj']:.3f}"

    # Hand-edited: the link can carry only the recorded settings, and says it does not rebuild the file.
    edited = json.loads(good.to_json())
    edited["temperature"] = None
    gate, up = (next(e for e in edited["projections"] if e["name"] == f"model.layers.0.mlp.{kind}_proj")
                for kind in ("gate", "up"))  # same shape: swapping them keeps the weighted mean
    for field in ("sparsity", "keep"):
        gate[field], up[field] = up[field], gate[field]
    open_tab(at, "Allocation")
    at.file_uploader(key="budget_upload").set_value(("edited.json", json.dumps(edited).encode(), "application/json"))
    at.run()
    assert_clean(at)
    assert any("do not rebuild it" in c.value for c in at.caption)


def test_budget_for_other_weights_needs_the_checkbox(default_loaded):

    at = run_app(tab="Allocation")
    other = json.loads(allocate(compute_spectra(default_loaded), 0.5).to_json())
    other["model_fingerprint"] = "0123456789abcdef"
    at.file_uploader(key="budget_upload").upload("other.json", json.dumps(other).encode(), "application/json")
    at.run()
    assert len(at.error) == 1 and "made for weights 0123456789abcdef" in at.error[0].value
    at.checkbox(key="allow_other_weights").check().run()
    assert not at.error and not at.exception
    assert at.session_state["current_label"] == "other.json"
    assert any("made for weights 0123456789abcdef" in w.value for w in at.warning)


def _fake_greedy(calls):
    from acttail_core.budget import make_budget
    from acttail_core.projections import find_projections

    def fake_greedy(loaded, sparsity, alphas=None, **_):  # the real one measures error curves (tests/test_greedy.py)
        calls.append(sparsity)
        projections = find_projections(loaded.model)
        return make_budget(projections, [sparsity] * len(projections), model_name=loaded.name,
                           model_fingerprint=loaded.fingerprint, method="greedy", target_sparsity=sparsity,
                           group="layer")

    return fake_greedy


def patch_greedy(monkeypatch, calls: list) -> None:
    """Replace greedy where the dashboard and the sweep find it (the registry of measured methods)."""
    from acttail_core.greedy import BUILDERS

    monkeypatch.setitem(BUILDERS, "greedy", _fake_greedy(calls))


def test_greedy_is_a_method_of_the_allocation_tab(default_loaded, monkeypatch):
    calls = []
    patch_greedy(monkeypatch, calls)
    at = run_app(tab="Allocation", sparsity="0.61")
    assert "greedy" in at.selectbox(key="method").options
    at.selectbox(key="method").set_value("greedy").run()
    assert_clean(at)
    assert at.session_state["current_label"] == "greedy (layer)" and calls == [0.61]
    assert any("greedy does not use alpha" in info.value for info in at.info)


# --------------------------------------------------------------------------- Compare tab


def test_pinned_budgets_side_by_side_in_the_url_and_evaluated_together(default_loaded, monkeypatch):
    import acttail_core.evaluate as evaluate

    patch_greedy(monkeypatch, [])
    at = run_app(tab="Allocation", sparsity="0.55")
    at.button(key="pin_budget").click().run()
    at.slider(key="temperature").set_value(1.0).run()
    at.button(key="pin_budget").click().run()
    at.button(key="pin_budget").click().run()  # the same budget again: not pinned twice
    open_tab(at, "Compare")
    assert_clean(at)
    at.button(key="cmp_pin_greedy").click().run()
    file_budget = allocate(compute_spectra(default_loaded), 0.7, AllocationSettings(method="linear"))
    at.file_uploader(key="cmp_files").upload("mine.json", file_budget.to_json().encode(), "application/json").run()
    assert_clean(at)
    assert chart_keys(at).count("compare_map") == 4
    labels = [m.value for m in at.markdown if "effective sparsity" in m.value]
    assert "a file: not in the link" in labels[3] and "in the link" in labels[0]
    tokens = query_param(at, "pins").split(",")
    assert tokens[0] == "acttail~0.55~0.15~0.3~keep-light~projection~mid" and len(tokens) == 3
    assert chart_data(at, "sparsity_by_type", "label")["label"].nunique() == 4
    at.selectbox(key="cmp_type").set_value("v").run()
    assert "v projection of each layer" in title(figure(at, "sparsity_by_layer"))

    seen = {}

    def fake_evaluate_budgets(loaded, runs, settings=None, progress=None, **_):
        seen["labels"] = [label for label, _ in runs]
        if progress:
            progress(1, 1, "done")
        return [evaluate.PerplexityResult(label, 0.0 if b is None else b.effective_sparsity, 20.0 + i, 3.0,
                                          settings.max_tokens, 0.0, 0.1) for i, (label, b) in enumerate(runs)]

    monkeypatch.setattr(evaluate, "evaluate_budgets", fake_evaluate_budgets)
    at.button(key="cmp_evaluate").click().run()
    assert_clean(at)
    assert seen["labels"][:4] == ["dense", "uniform @ 0.55", "uniform @ 0.70", labels[0].split("**")[1]]
    assert len(seen["labels"]) == 7 and "compare_ppl" in chart_keys(at)
    assert {row["kind"] for row in at.session_state["run_history"]} == {"compare"}

    # A link with the pins brings them back, rebuilt by the engine (the file cannot travel).
    shared = run_app(tab="Compare", pins=",".join(tokens))
    assert_clean(shared)
    assert chart_keys(shared).count("compare_map") == 3
    shared.button(key="unpin_0").click().run()
    assert chart_keys(shared).count("compare_map") == 2
    assert query_param(shared, "pins").split(",") == tokens[1:]


def test_a_bad_pin_in_a_link_is_one_line(default_loaded):
    at = run_app(tab="Compare", pins="acttail~zero~1~0.3~keep-light~projection~mid")
    assert not at.exception
    assert len(at.error) == 1 and "not a number" in at.error[0].value


def test_calibrate_button_applies_the_engine_s_choice(default_loaded, monkeypatch):
    """The button calls calibration.calibrate at the current target; Apply sets the sliders and the sidebar's rule,
    and the budget then carries the calibration record (the real search is tested in tests/test_calibration.py)."""
    from acttail_core import calibration

    calls = []

    def fake_calibrate(loaded, sparsity, **kwargs):
        calls.append(sparsity)
        kwargs["spectra_for"]("ks")  # the dashboard's spectra store serves every rule
        choice = calibration.Choice(0.35, "keep-light", "type", "ks")
        search = calibration.SearchResult(choice, 5.0, 5.5, [(calibration.UNIFORM, 5.5), (choice, 5.0)])
        return calibration.Calibration(sparsity, search, calibration.DEFAULT_TEXTS, 2046, 1024, 12.0)

    monkeypatch.setattr(calibration, "calibrate", fake_calibrate)
    at = run_app(tab="Allocation", sparsity="0.65")
    at.button(key="calibrate").click().run()
    assert_clean(at)
    assert calls == [0.65]
    assert any("acttail keep-light type ks T=0.35" in m.value for m in at.markdown)
    assert at.session_state["current_budget"].calibration is None  # nothing applied yet
    at.button(key="apply_calibration").click().run()
    assert_clean(at)
    budget = at.session_state["current_budget"]
    recorded = (budget.knob("temperature"), budget.direction, budget.group, budget.xmin_rule)
    assert recorded == (0.35, "keep-light", "type", "ks")
    assert budget.calibration is not None and budget.calibration.runs == 2
    assert budget.calibration.nll == 5.0 and budget.target_sparsity == 0.65
    at.slider(key="temperature").set_value(0.5).run()  # moved off the calibrated settings: no record claimed
    assert at.session_state["current_budget"].calibration is None


# --------------------------------------------------------------------------- Evaluate tab


@pytest.fixture
def tiny_model_dir(tiny_loaded, tmp_path) -> Path:
    """The conftest's tiny random Llama saved as a local Hugging Face directory, loadable from the model bar."""
    folder = tmp_path / "tiny-llama"
    tiny_loaded.model.save_pretrained(folder, safe_serialization=True)
    tiny_loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def fresh_caches():
    """The server-wide result cache and speed log start empty (the tiny model's weights are the same in every test)."""
    from app import state

    state.results_cache().clear()
    state.speed_log().clear()


def test_quick_perplexity_fills_the_history_with_one_bar_and_estimates(tiny_model_dir, monkeypatch, fresh_caches):
    import acttail_core.evaluate as evaluate

    patch_greedy(monkeypatch, [])
    at = run_app(model="local directory", path=str(tiny_model_dir), sparsity="0.6", tab="Evaluate")
    assert_clean(at)
    assert at.title[0].value == "ActTail Explorer · tiny-llama"
    assert any("not known until the first run" in c.value for c in at.caption)
    at.number_input(key="eval_tokens").set_value(128)
    at.checkbox(key="eval_greedy").check()
    at.button(key="run_perplexity").click().run()
    assert_clean(at)
    history = at.session_state["run_history"]
    assert [row["label"] for row in history] == ["dense", "uniform", "acttail (T=0.15, keep-light, projection, mid)",
                                                  "greedy (layer)"]
    assert [row["target_sparsity"] for row in history] == [None, 0.6, 0.6, 0.6]
    assert all(row["ppl"] > 1 and row["tokens"] == 127 for row in history) and {row["run"] for row in history} == {1}
    # The next estimate comes from the measured speed.
    assert any("at the speed measured earlier on this model" in c.value for c in at.caption)

    calls = []
    real = evaluate.perplexity
    monkeypatch.setattr(evaluate, "perplexity", lambda *a, **k: calls.append(1) or real(*a, **k))
    at.button(key="run_perplexity").click().run()
    assert calls == [] and all(row["cached"] for row in at.session_state["run_history"][4:])  # not measured again

    open_tab(at, "Allocation")
    at.slider(key="sparsity").set_value(0.4).run()
    open_tab(at, "Evaluate")
    at.button(key="run_perplexity").click().run()
    history = at.session_state["run_history"]
    assert {row["run"] for row in history} == {1, 2, 3}
    assert len(calls) == 2  # uniform and acttail at 0.4; dense, and the fake greedy (uniform's sparsities), cached
    assert {d.proto.label for d in at.get("download_button")} >= {"Download history (CSV)", "Download history (JSON)"}
    chart = figure(at, "history_chart")
    history_points = chart_data(at, "history_chart", "label")
    uniform = history_points[history_points["label"] == "uniform"]
    assert sorted(uniform["sparsity"]) == pytest.approx([0.4, 0.6])  # one line across runs at two targets
    assert chart["layer"][0]["encoding"]["x"]["title"] == "effective sparsity"


def test_sweep_draws_perplexity_against_sparsity_and_caches(tiny_model_dir):
    at = run_app(model="local directory", path=str(tiny_model_dir), tab="Evaluate", eval_tokens="128",
                 sweep_grid="0.3 0.6")
    at.button(key="run_sweep").click().run()
    assert_clean(at)
    rows = at.session_state["latest_sweep"]
    assert [(r["method"], r["target_sparsity"]) for r in rows] == [
        ("dense", 0.0), ("uniform", 0.3), ("settings", 0.3), ("uniform", 0.6), ("settings", 0.6)]
    chart = figure(at, "sweep_chart")
    assert chart["layer"][0]["encoding"]["y"]["scale"]["type"] == "log"
    points = chart_data(at, "sweep_chart", "label")
    assert sorted(points[points["label"] == "uniform"]["sparsity"]) == pytest.approx([0.3, 0.6])
    assert {"Sweep (CSV)", "Sweep (JSON)"} <= {d.proto.label for d in at.get("download_button")}
    at.text_input(key="sweep_grid").set_value("0.3 0.6 0.8").run()
    at.button(key="run_sweep").click().run()
    rows = at.session_state["latest_sweep"]
    assert [r["cached"] for r in rows] == [True, True, True, True, True, False, False]


def test_throughput_shows_the_spread_and_says_when_it_is_noise(tiny_model_dir):
    at = run_app(model="local directory", path=str(tiny_model_dir), tab="Evaluate", tp_prompt="8", tp_new="2",
                 tp_repeats="3")
    at.button(key="run_throughput").click().run()
    assert_clean(at)
    rows = at.session_state["latest_throughput"]["rows"]
    assert [r["label"] for r in rows][:2] == ["dense", "uniform @ 0.50"]
    assert all(len(r["prefill_runs"]) == 3 and len(r["decode_runs"]) == 3 for r in rows)
    spread = chart_data(at, "throughput", "low")
    assert len(spread) == 3 and (spread["low"] <= spread["tokens_per_s"]).all()
    assert (spread["tokens_per_s"] <= spread["high"]).all()  # each panel carries the min..max of the repeats
    note = at.session_state["latest_throughput"]["note"]
    if note:  # on a CPU the repeats usually overlap: then the page says so
        assert any(note == w.value for w in at.warning)


def test_evaluate_error_is_shown_not_raised(tiny_model_dir):
    at = run_app(model="local directory", path=str(tiny_model_dir), tab="Evaluate")
    at.selectbox(key="eval_corpus").set_value("text file").run()
    at.text_input(key="eval_corpus_path").set_value("/no/such/file.txt").run()
    at.button(key="run_perplexity").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "Hint" in at.error[0].value
    assert at.session_state["run_history"] == []


# --------------------------------------------------------------------------- Activations tab


def test_activations_histogram_marks_the_budgets_cuts(default_loaded):
    at = run_app(tab="Activations", act_layer="5", act_type="down", sparsity="0.7")
    assert_clean(at)
    budget = at.session_state["current_budget"]
    sparsity = budget.sparsity_by_name()["model.layers.5.mlp.down_proj"]
    assert metric(at, "Sparsity here") == f"{sparsity:.3f}"
    legend = figure(at, "activation_histogram")["layer"][0]["encoding"]["color"]["scale"]["domain"]
    assert legend[1].startswith("TopK cut") and legend[2].startswith("threshold mode")
    keep = budget.keep_by_name()["model.layers.5.mlp.down_proj"]
    assert metric(at, "TopK keeps per token") == f"{keep} of 1536"
    open_tab(at, "Allocation")
    at.slider(key="sparsity").set_value(0.3).run()
    open_tab(at, "Activations")
    assert metric(at, "Sparsity here") != f"{sparsity:.3f}"  # follows the budget, from the same captured input


# --------------------------------------------------------------------------- other families


@pytest.mark.parametrize("family, projections", [("phi3", 14), ("mixtral", 32), ("starcoder2", 12)])
def test_fused_moe_and_unmapped_model_directories_load(family, projections, tmp_path, monkeypatch):
    """Phi-3 (fused q|k|v and gate|up), Mixtral (experts) and a family without a map, from local directories: the
    charts draw, the Model tab says what was taken and skipped, and the Spectra tab drills into one expert."""
    corpora = cache_root() / "corpora"  # the demo texts (calibration for the Activations tab) from the real cache
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "corpora").symlink_to(corpora)
    folder = tmp_path / family
    make_tiny_family(family).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    at = run_app(model="local directory", path=str(folder))
    assert_clean(at)
    assert "alpha_heatmap" in chart_keys(at)
    if family == "mixtral":
        cells = chart_data(at, "alpha_heatmap", "alpha_text")
        assert len(cells) == 2 * 7 and cells["alpha_text"].str.endswith("of 4 experts").sum() == 2 * 3  # shared cells
        at.selectbox(key="esd_layer").set_value(1)
        at.selectbox(key="esd_type").set_value("down").run()
        at.selectbox(key="esd_expert").set_value("expert 2").run()
        assert_clean(at)
        entry = compute_spectra(load_model(str(folder))).by_name()["model.layers.1.mlp.experts.2.down"]
        assert f"alpha = **{entry.alpha:.3f}**" in " ".join(c.value for c in at.caption)
    open_tab(at, "Allocation")
    assert_clean(at)
    assert {"budget_heatmap", "difference_heatmap", "sparsity_by_layer"} <= set(chart_keys(at))
    assert ("esd_expert=expert+2" in code_text(at)) == (family == "mixtral")  # the share link names the expert
    open_tab(at, "Model")
    assert_clean(at)
    assert metric(at, "Projections") == str(projections)
    notices = " ".join(c.value for c in at.caption) + " ".join(w.value for w in at.warning)
    assert "taken: " in notices and "skipped: " in notices and "lm_head (outside the decoder layers)" in notices
    assert ("is not in the projection map" in notices) == (family == "starcoder2")
    if family == "phi3":
        assert "taken: self_attn.qkv_proj -> q, k, v; self_attn.o_proj -> o; mlp.gate_up_proj -> gate, up" in notices
    if family == "mixtral":
        assert "mlp.experts -> gate, up, down of 4 experts" in notices and "mlp.gate (router)" in notices
    # The Activations tab reaches a slice of a fused layer (Phi-3's q) and one expert (Mixtral's).
    open_tab(at, "Activations")
    if family == "mixtral":
        at.selectbox(key="act_type").set_value("up").run()
        at.selectbox(key="act_expert").set_value("expert 3").run()
    assert_clean(at)
    expected = {"phi3": "model.layers.0.self_attn.qkv_proj.q", "mixtral": "model.layers.0.mlp.experts.3.up",
                "starcoder2": "model.layers.0.self_attn.q_proj"}[family]
    assert figure(at, "activation_histogram")["title"]["text"] == f"Input magnitudes of {expected}"
