"""A layout that works from 800 px up, and how charts are put on the page.

Streamlit stacks ``st.columns`` only below a 640 px *viewport*, so at 800 px two
charts side by side got 380 px each and five controls 150 px each (one letter
per select box, labels broken mid-word). Instead:

* controls and metrics have fixed widths inside wrapping horizontal containers
  (Streamlit's own ``horizontal=True`` wraps them onto more rows);
* rows of charts are horizontal containers whose children grow from a minimum
  width and wrap below it, which needs one CSS rule: Streamlit gives
  ``width="stretch"`` children no minimum, so they would shrink instead.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, TypeVar

import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from app import charts, state

CHART_MIN_WIDTH = 460  # px: below this a heatmap's labels and colour bar crowd each other
_ROW_PREFIX = "wrap-row-"
STYLE = f"""<style>
div[class*="st-key-{_ROW_PREFIX}"] > div {{
  flex: 1 1 {CHART_MIN_WIDTH}px !important;
  min-width: min({CHART_MIN_WIDTH}px, 100%) !important;
}}
</style>"""


def inject_style() -> None:
    st.html(STYLE)


def chart_row(key: str) -> DeltaGenerator:
    """A row whose children (charts, or containers of them) sit side by side when they fit, stacked when not."""
    return st.container(horizontal=True, key=f"{_ROW_PREFIX}{key}", gap="medium")


def control_row(key: str) -> DeltaGenerator:
    """A row of fixed-width widgets or metrics that wraps onto more rows on a narrow page."""
    return st.container(horizontal=True, key=f"controls-{key}", gap="medium", vertical_alignment="bottom")


def show_chart(chart: Any, key: str, **kwargs: Any) -> Any:
    """Draw a chart builder's Altair chart, by its stable Vega-Lite dict (``charts.to_spec`` says why)."""
    return st.vega_lite_chart(charts.to_spec(chart), key=key, **kwargs)


P = TypeVar("P")  # anything with a ``name``: a Projection or a ProjectionSpectrum


def pick_expert(members: Sequence[P], key: str, help_text: str) -> Optional[P]:
    """The projection of a heatmap cell; in a cell of experts, the one picked in a select box bound to the URL
    under ``key`` by its label ("expert 3"), so a link names the same expert."""
    if len(members) <= 1:
        return members[0] if members else None
    labels = [f"expert {m.name.rsplit('.', 2)[-2]}" for m in members]  # "...experts.3.gate" -> expert 3
    if state.widget(key) not in labels:
        state.set_widget(key, labels[0])
    picked = st.selectbox("Expert", labels, key=key, bind="query-params", width=150, help=help_text)
    return members[labels.index(picked)]
