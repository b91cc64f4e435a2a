"""Pinned budgets: any number of budgets kept side by side in the Compare tab.

A budget made from settings is pinned as a short token (method~target~T~eps~direction~group~rule) that also
goes into the page URL (``pins``), so a shared link brings its pins back, rebuilt by the engine. A pinned file
cannot travel in a link; the Compare tab says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import streamlit as st

from acttail_core.allocation import AllocationSettings, settings_of
from acttail_core.budget import Budget, budget_key, describe
from acttail_core.errors import ActTailError
from acttail_core.spectra import XMIN_RULES
from app import state
from app.state import AppContext

URL_PARAM = "pins"
_SEPARATOR = "~"


@dataclass(frozen=True)
class Pin:
    label: str
    budget: Budget
    model: str  # the fingerprint of the weights it was made for (pins of another model are set aside)
    token: Optional[str]  # None for an uploaded file: not in the URL


def token_of(budget: Budget) -> str:
    target, settings = settings_of(budget)
    return _SEPARATOR.join([settings.method, f"{target:g}", f"{settings.temperature:g}", f"{settings.eps:g}",
                            settings.direction, settings.group, budget.xmin_rule or ""])


def parse_token(token: str) -> tuple[float, AllocationSettings, Optional[str]]:
    """(target, settings, xmin rule) from a pin token; ActTailError for anything malformed."""
    parts = token.split(_SEPARATOR)
    if len(parts) != 7:
        raise ActTailError(f"pinned budget {token[:60]!r} in the link is not method~target~T~eps~direction~group~rule")
    method, target, temperature, eps, direction, group, rule = parts
    try:
        settings = AllocationSettings(method=method, temperature=float(temperature), eps=float(eps),
                                      direction=direction, group=group).validate()
        value = float(target)
    except ValueError:
        raise ActTailError(f"pinned budget {token[:60]!r} in the link has a value that is not a number") from None
    if rule and rule not in XMIN_RULES:
        raise ActTailError(f"pinned budget {token[:60]!r} in the link names an unknown xmin rule")
    return value, settings, rule or None


def pins() -> list[Pin]:
    return state.session.pins


def pins_for(ctx: AppContext) -> list[Pin]:
    return [pin for pin in pins() if pin.model == ctx.loaded.fingerprint]


def _sync_url() -> None:
    tokens = [pin.token for pin in pins() if pin.token]
    if tokens:
        st.query_params[URL_PARAM] = ",".join(tokens)
    elif URL_PARAM in st.query_params:
        del st.query_params[URL_PARAM]


def add(ctx: AppContext, budget: Budget, name: Optional[str] = None) -> Optional[Pin]:
    """Pin a budget (``name``: an uploaded file's name; None = rebuildable from its settings). None if already
    pinned (the same per-projection sparsities)."""
    key = budget_key(budget)
    if any(budget_key(pin.budget) == key for pin in pins_for(ctx)):
        return None
    label = f"{name or describe(budget)} @ {budget.target_sparsity:.2f}"
    pin = Pin(label, budget, ctx.loaded.fingerprint, None if name else token_of(budget))
    pins().append(pin)
    _sync_url()
    return pin


def keep_only(ctx: AppContext, labels: list[str]) -> None:
    """Unpin this model's budgets whose labels are not in ``labels``."""
    state.session.pins = [pin for pin in pins() if pin.model != ctx.loaded.fingerprint or pin.label in labels]
    _sync_url()


def restore_from_url(ctx: AppContext) -> Optional[str]:
    """Rebuild the pins named in the page URL once per session and model; an error message if some could not be."""
    tokens = [t for t in st.query_params.get(URL_PARAM, "").split(",") if t]
    done = state.session.pins_restored
    if not tokens or ctx.loaded.fingerprint in done:
        return None
    done.add(ctx.loaded.fingerprint)
    problems = []
    for token in tokens:
        try:
            target, settings, rule = parse_token(token)
            spectra = state.get_spectra(ctx.loaded, rule) if rule else ctx.spectra
            add(ctx, state.budget_for(ctx, target, settings, spectra=spectra))
        except ActTailError as error:
            problems.append(str(error))
    return "; ".join(problems) or None
