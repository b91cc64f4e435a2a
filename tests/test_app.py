"""AppTest (streamlit.testing.v1) tests of every tab of the dashboard.

The default model and its spectra come from the engine's caches (the first
load in a test process takes a few seconds; the app's process-wide store makes
later AppTests instant). The Evaluate tab's measuring functions are mocked where
the button, not the measurement, is under test.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from acttail_core.allocation import AllocationSettings, allocate
from acttail_core.budget import load_budget

APP = str(Path(__file__).resolve().parents[1] / "app" / "main.py")
TIMEOUT = 120

pytestmark = pytest.mark.timeout(300)


def run_app(**query: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    for key, value in query.items():
        at.query_params[key] = value
    at.run()
    return at


def assert_clean(at: AppTest) -> None:
    """No exception element (a traceback) and no error box."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def metric(at: AppTest, label: str) -> str:
    for element in at.metric:
        if element.label.startswith(label):
            return element.value
    raise AssertionError(f"no metric {label!r}: {[m.label for m in at.metric]}")


def plotly_keys(at: AppTest) -> list[str]:
    """The keys (e.g. 'alpha_heatmap') of the plotly charts on the page, from their element ids."""
    return [chart.proto.id for chart in at.get("plotly_chart")]


# --------------------------------------------------------------------------- Model tab


def test_default_model_loads_with_nothing_typed(default_loaded):
    at = run_app()
    assert_clean(at)
    assert at.title[0].value == "ActTail Explorer"
    assert "heavy-tail exponent" in at.markdown[0].value
    assert [tab.label for tab in at.tabs] == ["Model", "Spectra", "Allocation", "Evaluate"]
    assert any("Architecture **LlamaForCausalLM**" in m.value for m in at.markdown)
    assert metric(at, "Layers") == "30"
    assert metric(at, "Projections") == "210"
    assert metric(at, "Device") == "cpu"
    assert at.sidebar.selectbox(key="model").value == "default"


def test_bad_model_path_from_a_link_is_not_echoed():
    """A link's path is loaded, but neither echoed nor described: the link's author learns nothing of our files."""
    at = run_app(model="local directory", path="/definitely/not/a/model")
    assert not at.exception
    assert len(at.error) == 1
    assert "could not load the model named in the link" in at.error[0].value and "Hint" in at.error[0].value
    assert "/definitely" not in repr(at._tree)
    assert len(at.tabs) == 0  # nothing drawn on a model that is not there


def test_bad_model_path_typed_here_shows_why():
    at = run_app(model="local directory")
    at.sidebar.text_input(key="path").input("/definitely/not/a/model").run()
    assert not at.exception
    assert len(at.error) == 1
    assert "/definitely/not/a/model" in at.error[0].value and "not found" in at.error[0].value


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
    assert len(at.tabs) == 4


# --------------------------------------------------------------------------- Spectra tab


def test_spectra_tab_heatmap_esd_and_csv(default_loaded):
    at = run_app()
    keys = " ".join(plotly_keys(at))
    for chart in ("alpha_heatmap", "esd_plot", "alpha_by_type"):
        assert chart in keys
    at.selectbox(key="esd_layer").set_value(7)
    at.selectbox(key="esd_type").set_value("up")
    at.run()
    assert_clean(at)
    captions = " ".join(c.value for c in at.caption)
    from acttail_core.spectra import compute_spectra

    entry = compute_spectra(default_loaded).by_name()["model.layers.7.mlp.up_proj"]
    assert f"alpha = **{entry.alpha:.3f}**" in captions
    download = at.get("download_button")
    assert any("spectra" in d.proto.label for d in download)


def test_xmin_rule_is_selectable():
    at = run_app(rule="ks")
    assert_clean(at)
    assert at.sidebar.selectbox(key="rule").value == "ks"
    budget = at.session_state["current_budget"]
    assert budget.xmin_rule == "ks"


# --------------------------------------------------------------------------- Allocation tab


def test_sliders_change_the_budget(default_loaded):
    at = run_app()
    budget = at.session_state["current_budget"]
    assert budget.method == AllocationSettings().method and budget.target_sparsity == 0.5
    assert metric(at, "Effective sparsity") == "0.5000"

    at.slider(key="sparsity").set_value(0.7).run()
    assert_clean(at)
    budget = at.session_state["current_budget"]
    assert budget.target_sparsity == pytest.approx(0.7)
    assert budget.effective_sparsity == pytest.approx(0.7, abs=1e-9)
    assert metric(at, "Effective sparsity") == "0.7000"
    assert len({round(e.sparsity, 6) for e in budget.projections}) > 1  # alpha-driven, not uniform

    at.slider(key="temperature").set_value(0.0).run()
    assert {round(e.sparsity, 9) for e in at.session_state["current_budget"].projections} == {0.7}

    at.selectbox(key="method").set_value("linear").run()
    budget = at.session_state["current_budget"]
    assert budget.method == "linear" and budget.eps == pytest.approx(AllocationSettings().eps)

    at.selectbox(key="direction").set_value("keep-heavy").run()
    at.selectbox(key="group").set_value("type").run()
    budget = at.session_state["current_budget"]
    assert (budget.direction, budget.group) == ("keep-heavy", "type")
    assert budget.effective_sparsity == pytest.approx(0.7, abs=1e-9)

    # The app's budget is exactly the engine's for the same settings (the app computes nothing itself).
    from acttail_core.spectra import compute_spectra

    expected = allocate(compute_spectra(default_loaded), 0.7, AllocationSettings(method="linear", temperature=0.0, direction="keep-heavy", group="type"))
    assert budget.sparsity_by_name() == pytest.approx(expected.sparsity_by_name())
    assert at.session_state["allocation_render_ms"] < 2000
    print(f"allocation fragment (allocate + charts), server side: {at.session_state['allocation_render_ms']:.0f} ms")


def test_query_params_reproduce_the_view():
    at = run_app(sparsity="0.65", temperature="2.5", method="acttail", direction="keep-heavy", group="layer", tab="Allocation")
    assert_clean(at)
    budget = at.session_state["current_budget"]
    assert (budget.target_sparsity, budget.temperature, budget.direction, budget.group) == (0.65, 2.5, "keep-heavy", "layer")
    link = at.code[0].value
    for part in ("sparsity=0.65", "temperature=2.5", "direction=keep-heavy", "group=layer", "model=default", "tab=Allocation"):
        assert part in link


def test_budget_json_download_is_valid(default_loaded):
    at = run_app(sparsity="0.6")
    labels = [d.proto.label for d in at.get("download_button")]
    assert "Download budget JSON" in labels
    # The button serves budget.to_json() of the current budget (the browser test downloads the file itself).
    budget = at.session_state["current_budget"]
    from acttail_core.projections import find_projections

    reread = load_budget(budget.to_json(), projections=find_projections(default_loaded.model), fingerprint=default_loaded.fingerprint)
    assert reread == budget and reread.target_sparsity == 0.6


def test_uploaded_budget_is_validated(default_loaded):
    at = run_app()
    before = at.session_state["current_budget"]

    at.file_uploader(key="budget_upload").upload("broken.json", b"{not json", "application/json")
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and "not valid JSON" in at.error[0].value and "Hint" in at.error[0].value
    assert at.session_state["current_budget"].sparsity_by_name() == before.sparsity_by_name()  # nothing changed

    wrong = json.loads(before.to_json())
    wrong["projections"] = wrong["projections"][:-1]
    wrong["effective_sparsity"] = sum(p["params"] * p["sparsity"] for p in wrong["projections"]) / sum(p["params"] for p in wrong["projections"])
    wrong["target_sparsity"] = wrong["effective_sparsity"]
    at.file_uploader(key="budget_upload").set_value(("short.json", json.dumps(wrong).encode(), "application/json"))
    at.run()
    assert len(at.error) == 1 and "does not match this model" in at.error[0].value
    assert at.session_state["current_budget"].sparsity_by_name() == before.sparsity_by_name()

    from acttail_core.spectra import compute_spectra

    good = allocate(compute_spectra(default_loaded), 0.8, AllocationSettings(method="linear"))
    at.file_uploader(key="budget_upload").set_value(("good.json", good.to_json().encode(), "application/json"))
    at.run()
    assert_clean(at)
    assert at.session_state["current_budget"] == good
    assert at.slider(key="sparsity").disabled  # the file, not the sliders, is in charge now
    assert metric(at, "Effective sparsity") == "0.8000"


def test_budget_for_other_weights_needs_the_checkbox(default_loaded):
    at = run_app()
    other = json.loads(at.session_state["current_budget"].to_json())
    other["model_fingerprint"] = "0123456789abcdef"
    at.file_uploader(key="budget_upload").upload("other.json", json.dumps(other).encode(), "application/json")
    at.run()
    assert len(at.error) == 1 and "made for weights 0123456789abcdef" in at.error[0].value
    at.checkbox(key="allow_other_weights").check().run()
    assert not at.error and not at.exception
    assert at.session_state["current_budget"].model_fingerprint == "0123456789abcdef"
    assert any("made for weights 0123456789abcdef" in w.value for w in at.warning)


def test_greedy_is_a_method_of_the_allocation_tab(default_loaded, monkeypatch):
    import app.allocation_tab as allocation_tab
    from acttail_core.budget import make_budget
    from acttail_core.projections import find_projections

    calls = []

    def fake_greedy(loaded, sparsity, alphas=None, **_):  # the real one measures error curves (tests/test_greedy.py)
        calls.append(sparsity)
        projections = find_projections(loaded.model)
        return make_budget(projections, [sparsity] * len(projections), model_name=loaded.name,
                           model_fingerprint=loaded.fingerprint, method="greedy", target_sparsity=sparsity)

    monkeypatch.setattr(allocation_tab, "greedy_budget", fake_greedy)
    at = run_app(tab="Allocation", sparsity="0.6")
    assert "greedy" in at.selectbox(key="method").options
    at.selectbox(key="method").set_value("greedy").run()
    assert_clean(at)
    assert at.session_state["current_budget"].method == "greedy" and calls == [0.6]


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
    assert (budget.temperature, budget.direction, budget.group, budget.xmin_rule) == (0.35, "keep-light", "type", "ks")
    assert budget.calibration is not None and budget.calibration.runs == 2
    assert budget.calibration.nll == 5.0 and budget.target_sparsity == 0.65
    at.slider(key="temperature").set_value(0.5).run()  # moved off the calibrated settings: no record claimed
    assert at.session_state["current_budget"].calibration is None


# --------------------------------------------------------------------------- Evaluate tab


@pytest.fixture
def tiny_model_dir(tiny_loaded, tmp_path) -> Path:
    """The conftest's tiny random Llama saved as a local Hugging Face directory, loadable from the sidebar."""
    folder = tmp_path / "tiny-llama"
    tiny_loaded.model.save_pretrained(folder, safe_serialization=True)
    tiny_loaded.tokenizer.save_pretrained(folder)
    return folder


class FakeResult:
    def __init__(self, **fields):
        self.fields = fields

    def as_dict(self) -> dict:
        return dict(self.fields)


def test_evaluate_buttons_fill_the_history(tiny_model_dir, monkeypatch):
    import acttail_core.evaluate as evaluate

    calls = {}

    def fake_compare(loaded, budget, corpus="demo", seqlen=None, max_tokens=None, mode="topk", include_dense=True, include_uniform=True, progress=None, **_):
        calls["compare"] = dict(model=loaded.name, budget=budget, corpus=corpus, max_tokens=max_tokens, mode=mode)
        if progress:
            progress(1, 1, "done")
        methods = ["dense"] * include_dense + ["uniform"] * include_uniform + [budget.method]
        return [
            FakeResult(method=m, sparsity=0.0 if m == "dense" else budget.target_sparsity, ppl=10.0 + i, nll=2.3, tokens=max_tokens,
                       realized_sparsity=0.0 if m == "dense" else budget.target_sparsity, seconds=0.1)
            for i, m in enumerate(methods)
        ]

    def fake_throughput(loaded, budgets, prompt_len=128, new_tokens=32, repeats=3, mode="topk", progress=None, **_):
        calls["throughput"] = dict(budgets=budgets, prompt_len=prompt_len)
        return [
            FakeResult(method="dense" if b is None else b.method, sparsity=0.0 if b is None else b.target_sparsity,
                       prefill_tokens_per_s=1000.0, decode_tokens_per_s=50.0, prompt_len=prompt_len, new_tokens=new_tokens)
            for b in budgets
        ]

    monkeypatch.setattr(evaluate, "compare", fake_compare)
    monkeypatch.setattr(evaluate, "throughput", fake_throughput)

    at = run_app(model="local directory", path=str(tiny_model_dir), sparsity="0.6", tab="Evaluate")
    assert_clean(at)
    assert metric(at, "Layers") == "2"
    at.number_input(key="eval_tokens").set_value(128)
    at.button(key="run_perplexity").click().run()
    assert_clean(at)
    assert calls["compare"]["model"] == str(tiny_model_dir)
    assert calls["compare"]["max_tokens"] == 128 and calls["compare"]["corpus"] == "demo"
    assert calls["compare"]["budget"].target_sparsity == pytest.approx(0.6)
    history = at.session_state["run_history"]
    assert [row["method"] for row in history] == ["dense", "uniform", "acttail"]
    assert {row["run"] for row in history} == {1}

    at.button(key="run_throughput").click().run()
    assert_clean(at)
    assert [b is None for b in calls["throughput"]["budgets"]] == [True, False, False]
    history = at.session_state["run_history"]
    assert len(history) == 6 and history[-1]["kind"] == "throughput" and history[-1]["decode_tokens_per_s"] == 50.0

    # A second allocation accumulates in the same history.
    at.slider(key="sparsity").set_value(0.4).run()
    at.button(key="run_perplexity").click().run()
    history = at.session_state["run_history"]
    assert {row["run"] for row in history} == {1, 2, 3}
    labels = {row["label"] for row in history}
    assert any("@ 0.40" in label for label in labels) and any("@ 0.60" in label for label in labels)
    assert {d.proto.label for d in at.get("download_button")} >= {"Download history (CSV)", "Download history (JSON)"}
    assert "history_chart" in " ".join(plotly_keys(at))


def test_evaluate_real_engine_on_tiny_model(tiny_model_dir):
    """The real evaluate.compare on the tiny model (seconds): the wiring, not the numbers."""
    at = run_app(model="local directory", path=str(tiny_model_dir), sparsity="0.5", tab="Evaluate")
    at.number_input(key="eval_tokens").set_value(128)
    at.button(key="run_perplexity").click().run()
    assert_clean(at)
    history = at.session_state["run_history"]
    assert [row["method"] for row in history][:2] == ["dense", "uniform"]
    assert all(row["ppl"] > 1 for row in history)


def test_evaluate_error_is_shown_not_raised(tiny_model_dir):
    at = run_app(model="local directory", path=str(tiny_model_dir), tab="Evaluate")
    at.selectbox(key="eval_corpus").set_value("text file").run()
    at.text_input(key="eval_corpus_path").set_value("/no/such/file.txt").run()
    at.button(key="run_perplexity").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "Hint" in at.error[0].value
    assert at.session_state["run_history"] == []


def test_greedy_comparison_when_the_engine_offers_it(tiny_model_dir, monkeypatch):
    import acttail_core.evaluate as evaluate
    import acttail_core.greedy as greedy
    from acttail_core.budget import make_budget

    def fake_greedy(loaded, sparsity, alphas=None, progress=None, **_):
        from acttail_core.projections import find_projections

        projections = find_projections(loaded.model)
        return make_budget(projections, [sparsity] * len(projections), model_name=loaded.name,
                           model_fingerprint=loaded.fingerprint, method="greedy", target_sparsity=sparsity)

    def fake_compare(loaded, budget, include_dense=True, include_uniform=True, max_tokens=None, **_):
        methods = ["dense"] * include_dense + ["uniform"] * include_uniform + [budget.method]
        return [FakeResult(method=m, sparsity=budget.target_sparsity, ppl=12.0, nll=2.5, tokens=max_tokens,
                           realized_sparsity=budget.target_sparsity, seconds=0.1) for m in methods]

    monkeypatch.setattr(greedy, "greedy_budget", fake_greedy)
    monkeypatch.setattr(evaluate, "compare", fake_compare)
    at = run_app(model="local directory", path=str(tiny_model_dir), tab="Evaluate")
    at.checkbox(key="eval_greedy").check()
    at.button(key="run_perplexity").click().run()
    assert_clean(at)
    assert [row["method"] for row in at.session_state["run_history"]] == ["dense", "uniform", "acttail", "greedy"]


def test_evaluate_tab_explains_a_missing_engine(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "acttail_core.evaluate", None)  # makes `import acttail_core.evaluate` fail
    at = run_app(tab="Evaluate")
    assert not at.exception and not at.error
    assert any("evaluation engine" in info.value for info in at.info)
    assert metric(at, "Effective sparsity") == "0.5000"  # the other tabs still work


# --------------------------------------------------------------------------- other families


@pytest.mark.parametrize("family, projections", [("phi3", 14), ("mixtral", 32), ("starcoder2", 12)])
def test_fused_moe_and_unmapped_model_directories_load(family, projections, tmp_path, monkeypatch):
    """Phi-3 (fused q|k|v and gate|up), Mixtral (experts) and a family without a map, from local directories: every
    tab draws, the Model tab says what was taken and skipped, and the Spectra tab drills into one expert."""
    from acttail_core.models import load_model
    from acttail_core.spectra import compute_spectra
    from tests.conftest import byte_tokenizer, make_tiny_family

    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / family
    make_tiny_family(family).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    at = run_app(model="local directory", path=str(folder))
    assert not at.exception and not at.error, [e.value for e in at.exception] + [e.value for e in at.error]
    assert metric(at, "Projections") == str(projections)
    notices = " ".join(c.value for c in at.caption) + " ".join(w.value for w in at.warning)
    assert "taken: " in notices and "skipped: " in notices and "lm_head (outside the decoder layers)" in notices
    assert ("is not in the projection map" in notices) == (family == "starcoder2")
    assert "alpha_heatmap" in " ".join(plotly_keys(at)) and "current_budget" in at.session_state
    if family == "phi3":
        assert "taken: self_attn.qkv_proj -> q, k, v; self_attn.o_proj -> o; mlp.gate_up_proj -> gate, up" in notices
    if family == "mixtral":
        assert "mlp.experts -> gate, up, down of 4 experts" in notices and "mlp.gate (router)" in notices
        at.selectbox(key="esd_layer").set_value(1)
        at.selectbox(key="esd_type").set_value("down").run()
        at.selectbox(key="esd_expert").set_value(2).run()
        assert not at.exception and not at.error
        entry = compute_spectra(load_model(str(folder))).by_name()["model.layers.1.mlp.experts.2.down"]
        assert f"alpha = **{entry.alpha:.3f}**" in " ".join(c.value for c in at.caption)
