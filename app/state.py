"""Session and cache plumbing for the dashboard.

Nothing here computes an ActTail result: it decides *when* to call the engine
(once per model / rule, shared by every browser session) and shows progress
and errors while it does.

Why not ``@st.cache_resource`` on the loaders themselves: Streamlit records the
elements a cached function draws and replays them on a cache hit, and a
progress bar that lives outside the function cannot be replayed
(``CacheReplayClosureError``). So ``st.cache_resource`` builds one process-wide
store per kind of object, and the loaders draw their progress outside any
cached function.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
import functools
from typing import Any, Callable, Hashable, Optional, TypeVar

import streamlit as st
import torch

from acttail_core.errors import ActTailError, BudgetError, CorpusError, ModelLoadError, SpectraError
from acttail_core.models import LoadedModel, load_model
from acttail_core.progress import ProgressFn
from acttail_core.projections import Projection
from acttail_core.spectra import Spectra
from acttail_core.streaming import spectra_of

log = logging.getLogger("acttail.app")

# Labels double as URL values (widgets bound to query parameters store their label).
MODEL_CHOICES = ("default", "gemma3-270m", "local directory", "gguf file", "hub id")
MODEL_CHOICES_WITH_PATH = ("local directory", "gguf file", "hub id")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def gpu_available() -> bool:
    return torch.cuda.is_available()


def device_choices() -> tuple[str, ...]:
    """GPU first when there is one, so the default device is the GPU when present."""
    return ("cuda", "auto", "cpu") if gpu_available() else ("cpu",)


@dataclass(frozen=True)
class ModelRequest:
    """What the sidebar asks for: the arguments of ``load_model``."""

    ref: str
    dtype: str = "auto"
    device: str = "cpu"


@dataclass
class AppContext:
    """Everything the tabs need about the current model, computed once per model and rule."""

    request: ModelRequest
    loaded: LoadedModel
    spectra: Spectra
    projections: list[Projection]


# --------------------------------------------------------------------------- process-wide stores


class _Store:
    """A small thread-safe LRU of expensive objects, with one lock per key so two
    sessions asking for the same model load it once."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._guard = threading.Lock()
        self._key_locks: dict[Hashable, threading.Lock] = {}

    def peek(self, key: Hashable) -> Optional[Any]:
        with self._guard:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def get_or_create(self, key: Hashable, create: Callable[[], Any]) -> Any:
        hit = self.peek(key)
        if hit is not None:
            return hit
        with self._guard:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            hit = self.peek(key)
            if hit is not None:
                return hit
            value = create()
            with self._guard:
                self._items[key] = value
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)  # models are big: keep only the most recent few
            return value


@st.cache_resource(show_spinner=False)
def _model_store() -> _Store:
    return _Store(capacity=2)


@st.cache_resource(show_spinner=False)
def _spectra_store() -> _Store:
    return _Store(capacity=12)


def cached_model(request: ModelRequest) -> Optional[LoadedModel]:
    return _model_store().peek(request)


def get_model(request: ModelRequest, progress: Optional[ProgressFn] = None) -> LoadedModel:
    return _model_store().get_or_create(
        request, lambda: load_model(request.ref, dtype=request.dtype, device=request.device, progress=progress)
    )


def cached_spectra(loaded: LoadedModel, rule: str) -> Optional[Spectra]:
    return _spectra_store().peek((loaded.fingerprint, loaded.device, rule))


def get_spectra(loaded: LoadedModel, rule: str, progress: Optional[ProgressFn] = None) -> Spectra:
    # The engine keeps its own disk cache; this store saves re-reading it on every rerun. spectra_of reads
    # the weights layer by layer from the model's directory when a device map offloaded some of them.
    return _spectra_store().get_or_create(
        (loaded.fingerprint, loaded.device, rule), lambda: spectra_of(loaded, rule=rule, progress=progress)
    )


# --------------------------------------------------------------------------- progress and errors


class StreamlitProgress:
    """A ``ProgressFn`` that drives one ``st.progress`` bar."""

    def __init__(self, container: Any, text: str) -> None:
        self._bar = container.progress(0.0, text=text)

    def __call__(self, done: int, total: int, message: str = "") -> None:
        fraction = 1.0 if total <= 0 else min(1.0, max(0.0, done / total))
        self._bar.progress(fraction, text=message or None)


ERROR_HINTS: dict[type, str] = {
    ModelLoadError: "Pick **default** in the sidebar to return to the embedded model; local directories need "
    "config.json and safetensors weights, hub ids need network access or a local Hugging Face cache.",
    SpectraError: "Clear the spectra cache (`$ACTTAIL_CACHE/spectra`) and reload the page.",
    BudgetError: "Upload a budget JSON written by this tool for the model shown in the sidebar "
    "(Allocation -> Download budget JSON, or `python -m acttail_core allocate`); one made for other weights of the "
    "same architecture needs **Allow a budget made for other weights**.",
    CorpusError: "Pick the **demo** corpus (shipped with the tool) or a UTF-8 text file with enough text.",
}


def hint_for(error: BaseException) -> str:
    for kind, hint in ERROR_HINTS.items():
        if isinstance(error, kind):
            return hint
    return "Check the settings in the sidebar; the server log has details."


F = TypeVar("F", bound=Callable[..., None])


def guarded(render: F) -> F:
    """Show any error of a page section with ``show_error`` instead of a traceback.

    Fragments need this themselves: a fragment rerun does not pass through main's try block.
    """

    @functools.wraps(render)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            render(*args, **kwargs)
        except Exception as error:
            show_error(error)

    return wrapper  # type: ignore[return-value]


def show_error(error: BaseException, what: str = "") -> None:
    """One readable line and a hint, never a traceback."""
    prefix = f"{what}: " if what else ""
    if isinstance(error, ActTailError):
        st.error(f"{prefix}{error}\n\n**Hint:** {hint_for(error)}", icon=":material/error:")
    else:  # a bug: log the traceback for the developer, show the user one line
        log.exception("unexpected error in the dashboard")
        st.error(
            f"{prefix}unexpected {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            "\n\n**Hint:** this is a bug in ActTail Explorer; the server log has the traceback.",
            icon=":material/bug_report:",
        )


# --------------------------------------------------------------------------- loading with visible progress


def load_context(request: ModelRequest, rule: str) -> Optional[AppContext]:
    """Load the model and its spectra, showing progress only when there is real work to do.

    Returns None (after showing an error) when the model cannot be loaded.
    """
    loaded = cached_model(request)
    spectra = cached_spectra(loaded, rule) if loaded is not None else None
    if loaded is None or spectra is None:
        from_link = path_from_link()
        label = "the model from the link" if from_link else request.ref
        with st.status(f"Preparing **{label}** ({rule} rule)...", expanded=True) as status:
            try:
                if loaded is None:
                    loaded = get_model(request, StreamlitProgress(st, f"loading {label}"))
                spectra = get_spectra(loaded, rule, StreamlitProgress(st, "spectra of every projection"))
            except Exception as error:  # shown once, in the status box and as an error below it
                status.update(label=f"Could not prepare {label}", state="error", expanded=False)
                if from_link:  # whoever made the link learns nothing about this machine's files
                    log.warning("could not load the path from a link: %s", error)
                    error = ModelLoadError(
                        "could not load the model named in the link: not found, or not a model this tool reads "
                        "(type the path in the sidebar to see why)"
                    )
                show_error(error, "Model")
                return None
            status.update(label=f"{label}: model and spectra ready", state="complete", expanded=False)
    return AppContext(request=request, loaded=loaded, spectra=spectra, projections=spectra.projections())


def mark_path_typed() -> None:
    """``on_change`` of the sidebar's path box: a path typed here may be echoed in errors, one from a link not."""
    st.session_state["path_typed"] = True


def path_from_link() -> bool:
    """Whether the model path came from the page URL (a shared link) rather than from typing in this session."""
    return st.session_state.get("model") in MODEL_CHOICES_WITH_PATH and not st.session_state.get("path_typed", False)


def model_request_from_state() -> Optional[ModelRequest]:
    """The ``ModelRequest`` the sidebar widgets describe, or None while a path is still empty."""
    choice = st.session_state.get("model", "default")
    if choice in MODEL_CHOICES_WITH_PATH:
        ref = (st.session_state.get("path") or "").strip()
        if not ref:
            return None
    else:
        ref = choice
    return ModelRequest(ref=ref, dtype=st.session_state.get("dtype", "auto"), device=st.session_state.get("device", device_choices()[0]))


def history() -> list[dict]:
    """The session's evaluation runs, oldest first (one row per method per run)."""
    return st.session_state.setdefault("run_history", [])


def projection_table(projections: list[Projection]):
    """Projection types with their shapes and counts, for the model summary."""
    import pandas as pd

    frame = pd.DataFrame(
        [{"type": p.type, "shape (out x in)": f"{p.out_features} x {p.in_features}", "params": p.params} for p in projections]
    )
    return (
        frame.groupby(["type", "shape (out x in)"], sort=False)
        .agg(count=("params", "size"), params_each=("params", "first"), params_total=("params", "sum"))
        .reset_index()
    )
