"""The allocation methods, in one registry.

Every place that lists methods derives its list from ``METHODS``: the budget schema's ``method``
field (and the schema version that introduced each method), the CLI's ``--method`` choices and one
flag per knob, the dashboard's method picker, one slider per knob and the charts' colours. A
method is one of three kinds:

* ``uniform``: every projection at the target;
* ``alpha``: a map from the projections' alphas to sparsities, computed by
  ``allocation.allocate_sparsities`` (its knobs are fields of ``AllocationSettings``);
* ``measured``: the model's output error measured on calibration text decides (``greedy.BUILDERS``).

Adding a method is then one entry here, its computation in the module of its kind, and its tests.
"""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("uniform", "alpha", "measured")


@dataclass(frozen=True)
class Knob:
    """A number a method reads: an ``AllocationSettings`` field, a CLI flag ``--name`` and a dashboard slider."""

    name: str
    label: str  # the dashboard's slider label
    low: float  # the accepted range (the budget schema and AllocationSettings.validate check it)
    high: float
    slider_high: float  # the slider's end: the useful part of the range
    step: float
    help: str
    high_open: bool = False  # whether ``high`` itself is excluded

    def accepts(self, value: float) -> bool:
        return self.low <= value < self.high if self.high_open else self.low <= value <= self.high

    def range_text(self) -> str:
        return f"[{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # one of KINDS
    summary: str  # one line for help texts
    colour: str  # the same on every chart
    knobs: tuple[Knob, ...] = ()
    schema_version: int = 1  # the first budget schema version that knows the method


# Past T ~ 50 the acttail map is already a strict ordering by score; the cap keeps T * score far from overflow.
MAX_TEMPERATURE = 1000.0

TEMPERATURE = Knob(
    "temperature", "Allocation temperature", 0.0, MAX_TEMPERATURE, 5.0, 0.05,
    "acttail: 0 = uniform; larger = sparsity follows alpha more strongly (T = 1: one standard deviation of alpha "
    "changes the kept fraction e-fold)",
)
EPS = Knob(
    "eps", "Linear spread eps", 0.0, 1.0, 0.9, 0.05,
    "linear (AlphaPruning's map): sparsity ranges over (1 - eps) to (1 + eps) times the target", high_open=True,
)

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("uniform", "uniform", "every projection at the target", "#1f77b4"),
    Method("acttail", "alpha", "kept fraction log-linear in standardised alpha", "#d62728", (TEMPERATURE,)),
    Method("linear", "alpha", "AlphaPruning's linear map of alpha", "#ff7f0e", (EPS,)),
    Method("greedy", "measured", "each projection's own output error, measured on calibration text", "#2ca02c"),
    Method("greedy-block", "measured", "TEAL's block-wise greedy: error at each block's output, upstream sparsified",
           "#9467bd", schema_version=2),
)}
METHOD_NAMES = tuple(METHODS)
KNOBS: tuple[Knob, ...] = tuple(dict.fromkeys(k for m in METHODS.values() for k in m.knobs))


def is_measured(method: str) -> bool:
    """Whether the method needs the model and calibration text rather than alpha."""
    return METHODS[method].kind == "measured"


def methods_help() -> str:
    """One line per method: ``name: summary (knobs)``, for help texts."""
    return ". ".join(
        f"{m.name}: {m.summary}" + (f" ({', '.join(k.name for k in m.knobs)})" if m.knobs else "")
        for m in METHODS.values()
    ) + "."
