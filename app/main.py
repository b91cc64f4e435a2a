"""ActTail Explorer dashboard: ``streamlit run app/main.py``.

Thin on purpose: the model bar picks the model and xmin rule, ``app.state`` loads
them (cached, with progress), and one module per tab draws the rest. Every
setting is a widget bound to a URL query parameter, so a link reproduces the view.
Only the open tab draws its charts (the tabs are bound to the URL, so switching
reruns the page); every tab's widgets are always drawn, so their settings survive
a switch and stay in the URL.
"""
from __future__ import annotations

import altair as alt
import streamlit as st

from acttail_core.spectra import DEFAULT_RULE, XMIN_RULES
from app import (  # installed with acttail_core by `pip install -e .` (scripts/setup.sh)
    activations_tab,
    allocation_tab,
    compare_tab,
    evaluate_tab,
    layout,
    model_tab,
    spectra_tab,
    state,
)

# Altair checks every chart part against the Vega-Lite schema as it is made (about half of a slider move's
# server time); tests/test_app_charts.py validates every builder's whole spec instead.
alt.utils.schemapi.disable_debug_mode()

# The app opens on the first tab, where the charts are; the Model tab's facts are also in the page title.
TABS = ("Spectra", "Allocation", "Compare", "Activations", "Evaluate", "Model")
RENDERERS = (spectra_tab.render, allocation_tab.render, compare_tab.render, activations_tab.render,
             evaluate_tab.render, model_tab.render)
PATH_PLACEHOLDERS = {"local directory": "/path/to/model-dir", "gguf file": "/path/to/model.gguf",
                     "hub id": "meta-llama/Llama-2-7b-hf"}


def model_bar() -> None:
    """Model, device, dtype and xmin rule, in one row that wraps on a narrow page."""
    with layout.control_row("model"):
        choice = st.selectbox(
            "Model", state.MODEL_CHOICES, key="model", bind="query-params", width=190,
            help="default: SmolLM2-135M, embedded in the package (no download). Or a local Hugging Face directory "
            "(safetensors), a .gguf file, or a hub id.",
        )
        if choice in state.MODEL_CHOICES_WITH_PATH:
            st.text_input("Path or hub id", key="path", bind="query-params", placeholder=PATH_PLACEHOLDERS[choice],
                          help="Press Enter to load.", on_change=state.mark_path_typed, width=320)
        st.selectbox("Device", state.device_choices(), key="device", bind="query-params", width=110,
                     help="cuda when a GPU is present; auto spreads a large model over all GPUs.")
        st.selectbox("dtype", state.DTYPE_CHOICES, key="dtype", bind="query-params", width=120,
                     help="auto: float32 on CPU, bfloat16 on GPU.")
        st.selectbox(
            "xmin rule", XMIN_RULES, index=XMIN_RULES.index(DEFAULT_RULE), key="rule", bind="query-params", width=120,
            help="Where the power-law tail starts. ks: minimise the KS distance (weightwatcher's default). "
            "peak: near the peak of the log-ESD (AlphaPruning). mid: the median eigenvalue (PL_Alpha_Hill). "
            f"It changes alpha, so it also changes the allocation. Default: {DEFAULT_RULE} (chosen by the allocation "
            "study).",
        )


def refuse_unbound_server() -> None:
    """Stop when a browser reached a server that listens on every interface without being told to.

    `.streamlit/config.toml` binds 127.0.0.1, but Streamlit reads it only from the working directory;
    started elsewhere, it would serve this machine's models and files to the network.
    """
    if st.context.url and not st.get_option("server.address"):
        st.error(
            "This dashboard was started without `server.address`, so it listens on every network interface. "
            "Start it from the repository root (its `.streamlit/config.toml` binds 127.0.0.1), or pass "
            "`--server.address 127.0.0.1`; to expose it on purpose, pass the address to listen on "
            "(e.g. `--server.address 0.0.0.0`).",
            icon=":material/lock:",
        )
        st.stop()


def header(ctx: state.AppContext) -> None:
    summary = ctx.loaded.summary()
    st.title(f"ActTail Explorer · {summary['display_name']}")
    st.caption(
        f"{summary['architecture']}, {summary['layers']} layers, {len(ctx.projections)} projections, "
        f"{summary['parameters'] / 1e6:,.1f} M parameters on {summary['device']} ({summary['dtype']}), "
        f"{ctx.spectra.rule} rule. ActTail zeroes most inputs of every linear projection and gives each projection "
        "its own sparsity from the heavy-tail exponent **alpha** of its weight spectrum. Every setting is in the "
        "page URL: copy it to share this view."
    )


def main() -> None:
    st.set_page_config(page_title="ActTail Explorer", page_icon=":material/bar_chart:", layout="wide")
    refuse_unbound_server()
    state.apply_pending()
    layout.inject_style()
    title = st.container()
    model_bar()
    notices = st.container()  # model-load progress and errors: at the top, where they are seen
    request = state.model_request_from_state()
    rule = state.widget("rule", DEFAULT_RULE)
    if request is None:
        notices.info("Enter a path or hub id in the model bar and press Enter to load it.")
        ctx = state.last_good_context(rule)
    else:
        ctx, problem = state.load_context(request, rule, notices)
        if problem is not None:
            notices.error(problem, icon=":material/error:")
            ctx = state.last_good_context(rule)
            if ctx is not None:
                notices.info(f"Still showing **{ctx.loaded.display_name}**, the last model that loaded; everything "
                             "below works on it.", icon=":material/undo:")
    if ctx is None:
        title.title("ActTail Explorer")
        return
    state.remember_good(ctx)
    with title:
        header(ctx)
    tabs = st.tabs(TABS, key="tab", bind="query-params")
    # The open tab runs last: every other tab's widgets then exist, so its share link can spell out all settings.
    for tab, render in sorted(zip(tabs, RENDERERS), key=lambda pair: pair[0].open is True):
        with tab:
            try:
                render(ctx, tab.open is not False)  # None (no state tracking): draw everything
            except Exception as error:  # no raw tracebacks in the page; the log keeps it
                state.show_error(error)


main()
