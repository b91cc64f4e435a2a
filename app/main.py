"""ActTail Explorer dashboard: ``streamlit run app/main.py``.

Thin on purpose: the sidebar picks the model and xmin rule, ``app.state`` loads
them (cached, with progress), and one module per tab draws the rest. Every
setting is a widget bound to a URL query parameter, so a link reproduces the view.
"""
from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run app/main.py` puts app/ on sys.path, not the repository root that holds acttail_core.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from acttail_core.spectra import DEFAULT_RULE, XMIN_RULES  # noqa: E402
from app import allocation_tab, evaluate_tab, model_tab, spectra_tab, state  # noqa: E402

TABS = ("Model", "Spectra", "Allocation", "Evaluate")


def sidebar() -> None:
    with st.sidebar:
        st.header("Model")
        choice = st.selectbox(
            "Model",
            state.MODEL_CHOICES,
            key="model",
            bind="query-params",
            help="default: SmolLM2-135M, embedded in the package (no download). Or a local Hugging Face directory "
            "(safetensors), a .gguf file, or a hub id.",
        )
        if choice in state.MODEL_CHOICES_WITH_PATH:
            placeholder = {"local directory": "/path/to/model-dir", "gguf file": "/path/to/model.gguf", "hub id": "meta-llama/Llama-2-7b-hf"}[choice]
            st.text_input("Path or hub id", key="path", bind="query-params", placeholder=placeholder,
                          help="Press Enter to load.", on_change=state.mark_path_typed)
        devices = state.device_choices()
        st.selectbox("Device", devices, key="device", bind="query-params", help="cuda when a GPU is present; auto spreads a large model over all GPUs.")
        st.selectbox("dtype", state.DTYPE_CHOICES, key="dtype", bind="query-params", help="auto: float32 on CPU, bfloat16 on GPU.")
        st.header("Spectra")
        st.selectbox(
            "xmin rule",
            XMIN_RULES,
            index=XMIN_RULES.index(DEFAULT_RULE),
            key="rule",
            bind="query-params",
            help="Where the power-law tail starts. ks: minimise the KS distance (weightwatcher's default). "
            "peak: near the peak of the log-ESD (AlphaPruning). mid: the median eigenvalue (PL_Alpha_Hill). "
            f"It changes alpha, so it also changes the allocation. Default: {DEFAULT_RULE} (chosen by the allocation study).",
        )
        st.divider()
        st.caption("Every setting is kept in the page URL: copy it to share this view.")


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


def main() -> None:
    st.set_page_config(page_title="ActTail Explorer", page_icon=":material/bar_chart:", layout="wide")
    refuse_unbound_server()
    st.title("ActTail Explorer")
    st.markdown(
        "ActTail makes LLM inference cheaper without training: it zeroes most inputs of every linear projection, "
        "and gives each projection its own sparsity from the heavy-tail exponent **alpha** of its weight spectrum."
    )
    sidebar()
    request = state.model_request_from_state()
    if request is None:
        st.info("Enter a path or hub id in the sidebar and press Enter to load it.")
        return
    ctx = state.load_context(request, st.session_state.get("rule", DEFAULT_RULE))
    if ctx is None:
        return
    # Switching tabs reruns the app (bind), so every tab shows the latest budget; the tab is in the URL too.
    tabs = st.tabs(TABS, key="tab", bind="query-params")
    renderers = (model_tab.render, spectra_tab.render, allocation_tab.render, evaluate_tab.render)
    for tab, render in zip(tabs, renderers):
        with tab:
            try:
                render(ctx)
            except Exception as error:  # no raw tracebacks in the page; the log keeps it
                state.show_error(error)


main()
