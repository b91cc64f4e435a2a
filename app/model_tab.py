"""The Model tab: what was loaded, where it runs, and which projections ActTail will sparsify."""
from __future__ import annotations

import streamlit as st

from acttail_core.projections import projection_coverage
from app.state import AppContext, projection_table


def render(ctx: AppContext) -> None:
    summary = ctx.loaded.summary()
    st.subheader(f"Model: {summary['name']}")
    st.markdown(
        f"Architecture **{summary['architecture']}** (model_type `{summary['model_type']}`, "
        f"hidden size {summary['hidden_size']})"
    )
    columns = st.columns(5)
    columns[0].metric("Layers", summary["layers"], help="decoder layers")
    columns[1].metric("Projections", len(ctx.projections), help="linear layers whose inputs are sparsified (7 per layer for Llama-like models)")
    columns[2].metric("Parameters", f"{summary['parameters'] / 1e6:,.1f} M", help=f"{summary['parameters']:,} parameters in total")
    columns[3].metric("Device", summary["device"], help="where the weights live; choose it in the sidebar")
    columns[4].metric("dtype", summary["dtype"], help="auto = float32 on CPU, bfloat16 on GPU")
    st.caption(
        f"Source: `{ctx.loaded.source}` · weight fingerprint `{summary['fingerprint']}` "
        "(budget files remember it, so a budget made for other weights is flagged)"
    )
    st.markdown("**Projections** (their inputs are what ActTail sparsifies):")
    st.dataframe(projection_table(ctx.projections), hide_index=True, width="content")
    coverage = projection_coverage(ctx.loaded.model)
    taken_and_skipped = "\n".join(f"* {line}" for line in coverage.lines())
    if coverage.mapped:
        st.caption(taken_and_skipped)
    else:  # every linear layer was taken without a map: the user should know
        st.warning(taken_and_skipped, icon=":material/info:")
