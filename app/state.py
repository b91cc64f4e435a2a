"""Session and cache plumbing for the dashboard.

Nothing here computes an ActTail result: it decides *when* to call the engine
(once per model / rule, shared by every browser session), which budget is in
effect (the sliders' or an uploaded file's), and shows progress and errors
while the engine works.

Why not ``@st.cache_resource`` on the loaders themselves: Streamlit records the
elements a cached function draws and replays them on a cache hit, and a
progress bar that lives outside the function cannot be replayed
(``CacheReplayClosureError``). So ``st.cache_resource`` builds one process-wide
store per kind of object, and the loaders draw their progress outside any
cached function.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Generic, Hashable, Optional, TypeVar
from urllib.parse import urlencode

import streamlit as st
import torch

from acttail_core.allocation import AllocationSettings, allocate, check_target, uniform_budget
from acttail_core.budget import Budget, describe
from acttail_core.calibration import Calibration
from acttail_core.errors import ActTailError, BudgetError, CorpusError, ModelLoadError, SpectraError
from acttail_core.greedy import BUILDERS
from acttail_core.methods import KNOBS, is_measured
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
DEFAULT_SPARSITY = 0.5
DEFAULTS = AllocationSettings()
# Every widget bound to a URL query parameter (the key is the parameter's name), in the order a shared link
# spells them out. A text file's path for the Evaluate corpus is left out on purpose: a link must not make
# this server read a file of the link author's choosing and describe it.
URL_KEYS = (
    "model", "path", "dtype", "device", "rule",
    "sparsity", *(knob.name for knob in KNOBS), "method", "direction", "group",
    "esd_layer", "esd_type", "esd_expert", "spectra_table", "cmp_type", "act_layer", "act_type", "act_expert",
    "eval_corpus", "eval_tokens", "eval_mode", "eval_greedy", "sweep_methods", "sweep_grid",
    "tp_prompt", "tp_new", "tp_repeats",
)


# --------------------------------------------------------------------------- the session's own values

V = TypeVar("V")


class _Stored(Generic[V]):
    """One value the session keeps besides widget values: read (``default()`` the first time), set, deleted."""

    def __init__(self, default: Callable[[], V], key: Optional[str] = None) -> None:
        self.default, self.key = default, key

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = self.key or name

    def __get__(self, obj: Any, owner: Optional[type] = None) -> V:
        if self.key not in st.session_state:
            st.session_state[self.key] = self.default()
        return st.session_state[self.key]

    def __set__(self, obj: Any, value: V) -> None:
        st.session_state[self.key] = value

    def __delete__(self, obj: Any) -> None:
        st.session_state.pop(self.key, None)


def _none() -> None:
    return None


class Session:
    """Everything the dashboard keeps in ``st.session_state`` besides widget values, typed, in one place.

    Widget values live under their widgets' keys, which are also the URL's parameter names (``URL_KEYS``),
    and are read with ``widget()``. The ``current_*`` values are what the page shows, for whoever inspects
    the session (the tests; a notebook driving the app).
    """

    run_history: _Stored[list[dict]] = _Stored(list)  # every evaluation run, oldest first
    run_counter: _Stored[int] = _Stored(int)
    latest_run: _Stored[Optional[list[dict]]] = _Stored(_none)
    latest_sweep: _Stored[Optional[list[dict]]] = _Stored(_none)
    latest_throughput: _Stored[Optional[dict]] = _Stored(_none)
    compare_rows: _Stored[Optional[list[dict]]] = _Stored(_none)
    pins: _Stored[list] = _Stored(list)  # pinned budgets (app.pins.Pin)
    pins_restored: _Stored[set] = _Stored(set)
    compare_files_seen: _Stored[set] = _Stored(set, key="cmp_files_seen")
    active_upload: _Stored[Optional[dict]] = _Stored(_none)  # {"name", "budget", "model", ...}
    last_good_request: _Stored[Optional["ModelRequest"]] = _Stored(_none)
    last_good_rule: _Stored[Optional[str]] = _Stored(_none)
    path_typed: _Stored[bool] = _Stored(bool)
    pending_settings: _Stored[dict] = _Stored(dict, key="_pending_settings")
    applied_click: _Stored[Optional[tuple]] = _Stored(_none, key="_applied_click")
    allocation_render_ms: _Stored[Optional[float]] = _Stored(_none)
    current_budget: _Stored[Optional[Budget]] = _Stored(_none)
    current_label: _Stored[Optional[str]] = _Stored(_none)
    current_target: _Stored[Optional[float]] = _Stored(_none)
    calibration_result: _Stored[Optional[tuple[str, Calibration]]] = _Stored(_none)  # (model fingerprint, result)


session = Session()


def widget(key: str, default: Any = None) -> Any:
    """A widget's value (its key is its URL parameter), or ``default`` before the widget has been drawn."""
    return st.session_state.get(key, default)


def set_widget(key: str, value: Any) -> None:
    """Set a widget's value; only before the widget is drawn in this run (Streamlit refuses it after)."""
    st.session_state[key] = value


def gpu_available() -> bool:
    return torch.cuda.is_available()


def device_choices() -> tuple[str, ...]:
    """GPU first when there is one, so the default device is the GPU when present."""
    return ("cuda", "auto", "cpu") if gpu_available() else ("cpu",)


@dataclass(frozen=True)
class ModelRequest:
    """What the model bar asks for: the arguments of ``load_model``."""

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


@dataclass(frozen=True)
class ActiveBudget:
    """The budget in effect everywhere (Allocation, Compare, Activations, Evaluate) and where it came from."""

    budget: Budget
    label: str  # describe(budget), or the uploaded file's name
    uploaded: bool


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


@st.cache_resource(show_spinner=False)
def _budget_store() -> _Store:
    return _Store(capacity=64)


@st.cache_resource(show_spinner=False)
def activation_store() -> _Store:
    """Captured projection inputs (a few MB each), keyed by model, projection and token count."""
    return _Store(capacity=16)


@st.cache_resource(show_spinner=False)
def results_cache() -> dict:
    """Perplexity results by (weights, text, mode, budget): ``evaluate_budgets`` returns repeats from here."""
    return {}


@st.cache_resource(show_spinner=False)
def speed_log() -> dict:
    """Past perplexity rows per (model, device, dtype, mode): what time estimates are based on."""
    return {}


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
    """A ``ProgressFn`` that drives one ``st.progress`` bar, with the time spent and, once known, the time left.

    The bar is drawn at the first report, so one passed to work that turns out to be cached draws nothing.
    """

    def __init__(self, container: Any, text: str) -> None:
        self._container = container
        self._bar: Any = None
        self._text = text
        self._started = time.monotonic()

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if self._bar is None:
            self._bar = self._container.progress(0.0, text=self._text)
        fraction = 1.0 if total <= 0 else min(1.0, max(0.0, done / total))
        elapsed = time.monotonic() - self._started
        timing = f"{elapsed:.0f} s"
        if 0 < fraction < 1:  # the engine reports equal steps, so the rate so far predicts the rest
            timing += f", about {elapsed * (1 - fraction) / fraction:.0f} s left"
        self._bar.progress(fraction, text=f"{message or self._text} · {done}/{total} · {timing}")


ERROR_HINTS: dict[type, str] = {
    ModelLoadError: "Pick **default** in the model bar to return to the embedded model; local directories need "
    "config.json and safetensors weights, hub ids need network access or a local Hugging Face cache.",
    SpectraError: "Clear the spectra cache (`$ACTTAIL_CACHE/spectra`) and reload the page.",
    BudgetError: "Upload a budget JSON written by this tool for the model shown at the top "
    "(Allocation -> Download budget JSON, or `python -m acttail_core allocate`); one made for other weights of the "
    "same architecture needs **Allow a budget made for other weights**.",
    CorpusError: "Pick the **demo** corpus (shipped with the tool) or a UTF-8 text file with enough text.",
}


def hint_for(error: BaseException) -> str:
    for kind, hint in ERROR_HINTS.items():
        if isinstance(error, kind):
            return hint
    return "Check the settings at the top of the page; the server log has details."


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


# An error names a setting by the control that sets it on this page.
LABEL_OF_SETTING = {
    "seqlen": "the sequence length (a run's tokens, up to the model's context)",
    "max_tokens": "Tokens",
    "calib_corpus": "the calibration text",
    "corpus": "Corpus",
    "device": "Device",
    "dtype": "dtype",
    "backend": "the spectra backend",
    "prompt_len": "Prompt tokens",
    "new_tokens": "New tokens",
    "repeats": "Repeats",
    "sparsity": "Global sparsity",
    "allow_other_weights": "'Allow a budget made for other weights' (Allocation tab)",
}


def error_text(error: BaseException, what: str = "") -> str:
    """One readable line and a hint, never a traceback."""
    prefix = f"{what}: " if what else ""
    if isinstance(error, ActTailError):
        return f"{prefix}{error.worded(LABEL_OF_SETTING)}\n\n**Hint:** {hint_for(error)}"
    # a bug: log the traceback for the developer, show the user one line
    log.exception("unexpected error in the dashboard", exc_info=error)
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (f"{prefix}unexpected {type(error).__name__}: {first}"
            "\n\n**Hint:** this is a bug in ActTail Explorer; the server log has the traceback.")


def show_error(error: BaseException, what: str = "", container: Any = None) -> None:
    icon = ":material/error:" if isinstance(error, ActTailError) else ":material/bug_report:"
    (container or st).error(error_text(error, what), icon=icon)


# --------------------------------------------------------------------------- loading with visible progress


def load_context(request: ModelRequest, rule: str, notices: Any) -> tuple[Optional[AppContext], Optional[str]]:
    """Load the model and its spectra, showing progress in ``notices`` only while there is real work to do.

    Returns ``(context, None)``, or ``(None, message)`` when the model cannot be loaded: the caller shows the
    message at the top of the page (with its hint) and may fall back to the last model that loaded.
    """
    loaded = cached_model(request)
    spectra = cached_spectra(loaded, rule) if loaded is not None else None
    if loaded is None or spectra is None:
        from_link = path_from_link()
        label = "the model from the link" if from_link else request.ref
        slot = notices.empty()
        with slot.container():
            st.caption(f"Preparing **{label}** ({rule} rule)...")
            try:
                if loaded is None:
                    loaded = get_model(request, StreamlitProgress(st, f"loading {label}"))
                spectra = get_spectra(loaded, rule, StreamlitProgress(st, "spectra of every projection"))
            except Exception as error:
                if from_link:  # whoever made the link learns nothing about this machine's files
                    log.warning("could not load the path from a link: %s", error)
                    error = ModelLoadError(
                        "could not load the model named in the link: not found, or not a model this tool reads "
                        "(type the path in the model bar to see why)"
                    )
                slot.empty()
                return None, error_text(error, "Model")
        slot.empty()  # ready: the progress bars give their place back to the charts
    return AppContext(request=request, loaded=loaded, spectra=spectra, projections=spectra.projections()), None


def last_good_context(rule: str) -> Optional[AppContext]:
    """The last model this session loaded, if it is still in memory (the fallback after a failed load)."""
    request = session.last_good_request
    loaded = cached_model(request) if request is not None else None
    if loaded is None:
        return None
    spectra = cached_spectra(loaded, rule) or cached_spectra(loaded, session.last_good_rule or rule)
    if spectra is None:
        return None
    return AppContext(request=request, loaded=loaded, spectra=spectra, projections=spectra.projections())


def remember_good(ctx: AppContext) -> None:
    session.last_good_request = ctx.request
    session.last_good_rule = ctx.spectra.rule


def mark_path_typed() -> None:
    """``on_change`` of the path box: a path typed here may be echoed in errors, one from a link not."""
    session.path_typed = True


def path_from_link() -> bool:
    """Whether the model path came from the page URL (a shared link) rather than from typing in this session."""
    return widget("model") in MODEL_CHOICES_WITH_PATH and not session.path_typed


def model_request_from_state() -> Optional[ModelRequest]:
    """The ``ModelRequest`` the model bar describes, or None while a path is still empty."""
    choice = widget("model", "default")
    if choice in MODEL_CHOICES_WITH_PATH:
        ref = (widget("path") or "").strip()
        if not ref:
            return None
    else:
        ref = choice
    return ModelRequest(ref=ref, dtype=widget("dtype", "auto"),
                        device=widget("device", device_choices()[0]))


# --------------------------------------------------------------------------- the budget in effect


def set_pending(values: dict) -> None:
    """Widget values to set at the start of the next run (a widget's value cannot change once it is drawn)."""
    session.pending_settings = values


def apply_pending() -> None:
    """Write the values ``set_pending`` asked for into their widgets' keys, before any widget of this run exists."""
    pending = session.pending_settings
    del session.pending_settings
    for key, value in pending.items():
        set_widget(key, value)


def settings_from_state() -> tuple[float, AllocationSettings]:
    """The target sparsity and AllocationSettings the widgets describe (widget keys are the URL's parameter names)."""
    settings = AllocationSettings(
        method=widget("method", DEFAULTS.method),
        direction=widget("direction", DEFAULTS.direction),
        group=widget("group", DEFAULTS.group),
        **{knob.name: float(widget(knob.name, getattr(DEFAULTS, knob.name))) for knob in KNOBS},
    )
    return float(widget("sparsity", DEFAULT_SPARSITY)), settings


def budget_for(ctx: AppContext, target: float, settings: AllocationSettings, progress: Optional[ProgressFn] = None,
               spectra: Optional[Spectra] = None) -> Budget:
    """The engine's budget for these settings (memoised per model, rule, target and settings)."""
    spectra = spectra or ctx.spectra
    key = (ctx.loaded.fingerprint, spectra.rule, round(target, 9), settings)

    def make() -> Budget:
        if is_measured(settings.method):
            check_target(target, settings)
            return BUILDERS[settings.method](ctx.loaded, target, alphas=spectra.alphas(), progress=progress)
        return allocate(spectra, target, settings)

    return _budget_store().get_or_create(key, make)


def uniform_for(ctx: AppContext, target: float) -> Budget:
    return _budget_store().get_or_create(
        (ctx.loaded.fingerprint, "uniform", round(target, 9)),
        lambda: uniform_budget(ctx.projections, target, ctx.loaded.name, ctx.loaded.fingerprint, ctx.spectra.alphas()),
    )


def stored_calibration(ctx: AppContext) -> Optional[Calibration]:
    """This session's calibration of the loaded model, if any."""
    stored = session.calibration_result
    return stored[1] if stored and stored[0] == ctx.loaded.fingerprint else None


def with_calibration(ctx: AppContext, budget: Budget) -> Budget:
    """The budget with its calibration record while the sliders show exactly the calibrated settings."""
    found = stored_calibration(ctx)
    if found is None or found.sparsity != budget.target_sparsity or budget.xmin_rule != found.choice.rule:
        return budget
    choice = found.choice
    if (budget.knob("temperature"), budget.direction, budget.group) != (choice.temperature, choice.direction,
                                                                       choice.group):
        return budget
    return budget.model_copy(update={"calibration": found.record()})


def active_upload(ctx: AppContext) -> Optional[dict]:
    """The uploaded budget in effect for this model, if any (``{"name", "budget"}``)."""
    upload = session.active_upload
    if upload and upload.get("model") == ctx.loaded.fingerprint:
        return upload
    return None


def active_budget(ctx: AppContext, progress: Optional[ProgressFn] = None) -> ActiveBudget:
    """The budget every tab uses: an uploaded file while one is loaded, else the sliders' settings."""
    upload = active_upload(ctx)
    if upload is not None:
        current = ActiveBudget(upload["budget"], upload["name"], uploaded=True)
    else:
        target, settings = settings_from_state()
        budget = with_calibration(ctx, budget_for(ctx, target, settings, progress))
        current = ActiveBudget(budget, describe(budget), uploaded=False)
    session.current_budget, session.current_label = current.budget, current.label
    session.current_target = current.budget.target_sparsity
    return current


def share_link(tab: str) -> str:
    """A URL with every view setting spelled out (the live URL omits settings left at their defaults)."""
    params: dict[str, Any] = {}
    for key in URL_KEYS:
        value = widget(key)
        if value in (None, "", []):
            continue
        params[key] = list(value) if isinstance(value, (list, tuple)) else value  # repeated, as Streamlit binds them
    params["tab"] = tab
    pins = st.query_params.get("pins")
    if pins:
        params["pins"] = pins
    base = st.context.url or "http://localhost:8501/"
    return f"{base}?{urlencode(params, doseq=True)}"


def history() -> list[dict]:
    """The session's evaluation runs, oldest first (one row per method per run)."""
    return session.run_history


def projection_table(projections: list[Projection]):
    """Projection types with their shapes and counts, for the model summary."""
    import pandas as pd

    frame = pd.DataFrame(
        [{"type": p.type, "shape (out x in)": f"{p.out_features} x {p.in_features}", "params": p.params}
         for p in projections]
    )
    return (
        frame.groupby(["type", "shape (out x in)"], sort=False)
        .agg(count=("params", "size"), params_each=("params", "first"), params_total=("params", "sum"))
        .reset_index()
    )

