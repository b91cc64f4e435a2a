"""The Model tab: what was loaded, where it runs, and which projections ActTail will sparsify."""
from __future__ import annotations

import streamlit as st

from acttail_core.projections import projection_coverage
from app import charts, layout
from app.state import AppContext, projection_table


def render(ctx: AppContext, active: bool = True) -> None:
    if not active:
        return
    summary = ctx.loaded.summary()
    st.subheader(f"Model: {summary['display_name']}")
    st.markdown(
        f"Architecture **{summary['architecture']}** (model_type `{summary['model_type']}`, "
        f"hidden size {summary['hidden_size']})"
    )
    with layout.control_row("model-metrics"):
        st.metric("Layers", summary["layers"], help="decoder layers", width=110)
        st.metric("Projections", len(ctx.projections), width=130,
                  help="linear layers whose inputs are sparsified (7 per layer for Llama-like models)")
        st.metric("Parameters", f"{summary['parameters'] / 1e6:,.1f} M", width=150,
                  help=f"{summary['parameters']:,} parameters in total")
        st.metric("Device", summary["device"], help="where the weights live; choose it at the top", width=110)
        st.metric("dtype", summary["dtype"], help="auto = float32 on CPU, bfloat16 on GPU", width=120)
    st.caption(
        f"Source: `{ctx.loaded.source}` · weight fingerprint `{summary['fingerprint']}` "
        "(budget files remember it, so a budget made for other weights is flagged)"
    )
    with layout.chart_row("model"):
        layout.show_chart(charts.params_by_type(ctx.projections), key="params_by_type")
        with st.container():
            st.markdown("**Projections** (their inputs are what ActTail sparsifies):")
            st.dataframe(projection_table(ctx.projections), hide_index=True, width="content")
            coverage = projection_coverage(ctx.loaded.model)
            taken_and_skipped = "\n".join(f"* {line}" for line in coverage.lines())
            if coverage.mapped:
                st.caption(taken_and_skipped)
            else:  # every linear layer was taken without a map: the user should know
                st.warning(taken_and_skipped, icon=":material/info:")
