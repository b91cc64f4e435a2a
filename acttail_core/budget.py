"""The budget JSON: a versioned, validated record of per-projection sparsity.

Schema (``schema_version`` 2; version 1 files still load)::

    {
      "schema_version": 2,
      "model_name": "default",            "model_fingerprint": "ed60cef1939e2ebe",
      "method": "acttail",                 # uniform | acttail | linear | greedy | greedy-block
      "target_sparsity": 0.7,
      "params": {"temperature": 0.15},     # the method's knobs by name (methods.METHODS), {} for none
      "direction": "keep-light",           # keep-heavy | keep-light | null
      "group": "projection",               # projection | type | layer | null
      "xmin_rule": "ks",                   # ks | peak | mid | null
      "weighting": "params",
      "effective_sparsity": 0.7,           # sum(params * sparsity) / sum(params)
      "tool_version": "0.1.0", "created_at": "2026-11-29T14:00:00+00:00",
      "calibration": null,                 # or how `calibrate` chose the settings above:
      # {"texts": ["demo:lcet10", "demo:asyoulik"], "tokens": 2046, "seqlen": 1024,
      #  "search": "coordinate", "runs": 11, "seconds": 412.0,
      #  "uniform_nll": 6.65, "nll": 6.18}   (mean NLL per token on the calibration text; ppl = exp)
      "projections": [
        {"name": "model.layers.0.self_attn.q_proj", "layer": 0, "type": "q",
         "in_features": 576, "out_features": 576, "params": 331776,
         "alpha": 3.1, "sparsity": 0.62, "keep": 219}, ...
      ]
    }

Version 2 added ``calibration``, the method ``greedy-block`` and ``params``; a version 1 file has
none of them (each is refused there, naming the field) and keeps its knobs in the fields
``temperature`` and ``eps`` instead (refused in version 2); it loads unchanged otherwise, and
``Budget.knob(name)`` reads a knob from either version.

``keep`` is the number of input entries kept per token: ``round((1 - sparsity) * in_features)``
(halves rounded up), at least 1.

Parsing is strict: JSON types exactly as above (``1`` for ``schema_version``, not ``"1"``,
``1.0`` or ``true``), no duplicate keys, at most ``MAX_BUDGET_BYTES``, no NaN, ``target_sparsity``
equal to the body's weighted mean, and, given the model, every entry's name, layer, type and
shape equal to the model's. A budget made for other weights (another fingerprint) is refused
unless the caller allows it explicitly.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from . import __version__
from .errors import BudgetError, setting
from .methods import EPS, METHOD_NAMES, METHODS, TEMPERATURE
from .projections import Projection
from .safe_io import write_text

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # what this tool writes
READABLE_VERSIONS = (1, 2)
MAX_TARGET = 0.95  # the highest global target any method accepts
MAX_BUDGET_BYTES = 4 << 20  # a 400B-parameter model's budget is about 250 kB


def keep_count(sparsity: float, in_features: int) -> int:
    """Entries kept per token for a sparsity: round half up, as documented in the schema."""
    return int(math.floor((1.0 - sparsity) * in_features + 0.5))


class BudgetEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, strict=True)

    name: str = Field(min_length=1)
    layer: int = Field(ge=0)
    type: str = Field(min_length=1)
    in_features: int = Field(gt=0)
    out_features: int = Field(gt=0)
    params: int = Field(gt=0)
    alpha: Optional[float] = None
    sparsity: float = Field(ge=0.0, lt=1.0)
    keep: int = Field(ge=1)  # a projection whose every input is zeroed is not sparsity, it is removal

    @model_validator(mode="after")
    def _consistent(self) -> "BudgetEntry":
        if self.params != self.in_features * self.out_features:
            raise ValueError(f"params must equal in_features * out_features ({self.in_features * self.out_features})")
        expected = keep_count(self.sparsity, self.in_features)
        if self.keep != expected:
            raise ValueError(f"keep must be round((1 - sparsity) * in_features) = {expected}, got {self.keep}")
        return self


class CalibrationRecord(BaseModel):
    """How ``calibrate`` chose a budget's settings (schema version 2)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, strict=True)

    texts: list[str] = Field(min_length=1)
    tokens: int = Field(gt=0)  # tokens scored per run
    seqlen: int = Field(gt=1)
    search: Literal["coordinate"]
    runs: int = Field(ge=1)  # perplexity runs the search made
    seconds: float = Field(ge=0.0)
    uniform_nll: float  # mean NLL per token (nats) of uniform at the target, on the calibration text
    nll: float  # the same for the chosen settings


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, protected_namespaces=(), strict=True)

    schema_version: int
    model_name: str
    model_fingerprint: str = Field(min_length=1)
    method: str
    target_sparsity: float = Field(ge=0.0, le=MAX_TARGET)
    params: dict[str, float] = Field(default_factory=dict)  # version 2: the method's knobs by name
    temperature: Optional[float] = Field(default=None, ge=TEMPERATURE.low, le=TEMPERATURE.high)  # version 1 only
    eps: Optional[float] = Field(default=None, ge=EPS.low, lt=EPS.high)  # version 1 only
    direction: Optional[Literal["keep-heavy", "keep-light"]] = None
    group: Optional[Literal["projection", "type", "layer"]] = None
    xmin_rule: Optional[Literal["ks", "peak", "mid"]] = None
    weighting: Literal["params"] = "params"
    effective_sparsity: float = Field(ge=0.0, lt=1.0)
    tool_version: str
    created_at: str
    calibration: Optional[CalibrationRecord] = None
    projections: list[BudgetEntry] = Field(min_length=1)

    @field_validator("schema_version")
    @classmethod
    def _version(cls, value: int) -> int:
        if value not in READABLE_VERSIONS:
            raise ValueError(f"unsupported schema_version {value}; this tool reads versions 1 and 2")
        return value

    @field_validator("method")
    @classmethod
    def _method(cls, value: str, info: ValidationInfo) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; expected one of {', '.join(METHOD_NAMES)}")
        if METHODS[value].schema_version > 1 and info.data.get("schema_version") == 1:
            raise ValueError(f"method {value!r} needs schema_version 2")
        return value

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        if value and info.data.get("schema_version") == 1:
            raise ValueError("needs schema_version 2 (version 1 keeps temperature and eps as fields)")
        method = METHODS.get(info.data.get("method", ""))
        knobs = {knob.name: knob for knob in method.knobs} if method else {}
        for name, number in value.items():
            if name not in knobs:
                raise ValueError(f"{name!r} is not a knob of method {info.data.get('method')!r} "
                                 f"(its knobs: {', '.join(knobs) or 'none'})")
            if not knobs[name].accepts(number):
                raise ValueError(f"{name} must be in {knobs[name].range_text()}, got {number}")
        return value

    @field_validator("temperature", "eps")
    @classmethod
    def _version_1_knob(cls, value: Optional[float], info: ValidationInfo) -> Optional[float]:
        if value is not None and info.data.get("schema_version", 1) > 1:
            raise ValueError(f"a version-2 budget keeps {info.field_name} in params")
        return value

    @field_validator("calibration")
    @classmethod
    def _calibration(cls, value: Optional[CalibrationRecord], info: ValidationInfo) -> Optional[CalibrationRecord]:
        if value is not None and info.data.get("schema_version") == 1:
            raise ValueError("a calibration record needs schema_version 2")
        return value

    @field_validator("created_at")
    @classmethod
    def _created_at(cls, value: str) -> str:
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"not an ISO 8601 date and time: {value[:40]!r}") from None
        return value

    @model_validator(mode="after")
    def _body(self) -> "Budget":
        seen: set[str] = set()
        for entry in self.projections:
            if entry.name in seen:
                raise ValueError(f"duplicate projection name {entry.name!r}")
            seen.add(entry.name)
        measured = weighted_sparsity(self.projections)
        if abs(measured - self.effective_sparsity) > 1e-6:
            raise ValueError(
                f"effective_sparsity {self.effective_sparsity} does not match the projections' weighted mean "
                f"{measured:.6f}"
            )
        if abs(self.target_sparsity - self.effective_sparsity) > 1e-6:  # every method meets its target exactly
            raise ValueError(
                f"target_sparsity {self.target_sparsity} does not match the projections' weighted mean {measured:.6f}"
            )
        return self

    # ---------------------------------------------------------------- helpers
    def knob(self, name: str) -> Optional[float]:
        """A knob's value (``params`` in version 2, a field of its own in version 1), None when not recorded."""
        return self.params.get(name) if self.schema_version > 1 else getattr(self, name, None)

    def sparsity_by_name(self) -> dict[str, float]:
        return {e.name: e.sparsity for e in self.projections}

    def keep_by_name(self) -> dict[str, int]:
        return {e.name: e.keep for e in self.projections}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([e.model_dump() for e in self.projections])

    def to_json(self) -> str:
        """The file as its version writes it: knobs in ``params`` (version 2) or as fields (version 1)."""
        legacy = {"temperature", "eps"} if self.schema_version > 1 else {"params"}
        return self.model_dump_json(indent=1, exclude=legacy)


def weighted_sparsity(entries: Sequence[Any]) -> float:
    """Parameter-weighted mean sparsity of budget entries (or anything with .params and .sparsity)."""
    total = sum(e.params for e in entries)
    return sum(e.params * e.sparsity for e in entries) / total


def make_budget(
    projections: Sequence[Projection],
    sparsities: Sequence[float],
    *,
    model_name: str,
    model_fingerprint: str,
    method: str,
    target_sparsity: float,
    alphas: Optional[Sequence[float]] = None,
    params: Optional[dict[str, float]] = None,
    direction: Optional[str] = None,
    group: Optional[str] = None,
    xmin_rule: Optional[str] = None,
    calibration: Optional[dict] = None,
) -> Budget:
    """Build (and validate) a budget from per-projection sparsities; ``calibration`` as ``CalibrationRecord``."""
    entries = []
    for i, (proj, s) in enumerate(zip(projections, sparsities)):
        alpha = None if alphas is None else float(alphas[i])
        if alpha is not None and not math.isfinite(alpha):
            alpha = None
        entries.append(
            dict(
                name=proj.name,
                layer=proj.layer,
                type=proj.type,
                in_features=proj.in_features,
                out_features=proj.out_features,
                params=proj.params,
                alpha=alpha,
                sparsity=float(s),
                keep=keep_count(float(s), proj.in_features),
            )
        )
    total = sum(p.params for p in projections)
    effective = sum(p.params * float(s) for p, s in zip(projections, sparsities)) / total
    data = dict(
        schema_version=SCHEMA_VERSION,
        model_name=model_name,
        model_fingerprint=model_fingerprint,
        method=method,
        target_sparsity=float(target_sparsity),
        params=dict(params or {}),
        direction=direction,
        group=group,
        xmin_rule=xmin_rule,
        weighting="params",
        effective_sparsity=effective,
        tool_version=__version__,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        calibration=calibration,
        projections=entries,
    )
    return parse_budget(data)


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "budget"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        message = "missing field"
    elif first["type"] == "extra_forbidden":
        message = "unknown field"
    more = f" (and {error.error_count() - 1} more problems)" if error.error_count() > 1 else ""
    return f"{source}: {where}: {message}{more}"


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    """json's object hook: plain json.loads keeps the last of two equal keys, silently."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _DuplicateKey(key)
        data[key] = value
    return data


def parse_json(raw: bytes, source: str = "budget") -> Any:
    """JSON from untrusted bytes: size-capped, duplicate keys refused, pathological input one ``BudgetError`` line."""
    if len(raw) > MAX_BUDGET_BYTES:
        raise BudgetError(f"{source}: {len(raw)} bytes, more than a budget can be ({MAX_BUDGET_BYTES >> 20} MB)")
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise BudgetError(f"{source}: duplicate key {str(exc)[:60]!r}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BudgetError(f"{source}: not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    except RecursionError:
        raise BudgetError(f"{source}: not a budget (JSON nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise BudgetError(f"{source}: not valid JSON ({str(exc).splitlines()[0][:120]})") from None


def parse_budget(data: Any, source: str = "budget") -> Budget:
    if not isinstance(data, dict):
        raise BudgetError(f"{source}: expected a JSON object at the top level")
    try:
        return Budget.model_validate(data)
    except ValidationError as exc:
        raise BudgetError(_describe(exc, source)) from None
    except RecursionError:  # a dict built in Python, nested absurdly deep
        raise BudgetError(f"{source}: not a budget (nested too deeply)") from None


def load_budget(
    source: str | Path | bytes | dict,
    projections: Optional[Sequence[Projection]] = None,
    fingerprint: Optional[str] = None,
    allow_other_weights: bool = False,
) -> Budget:
    """Read and validate a budget from a path, raw JSON bytes/str, or a dict.

    Given the model's ``projections`` (and optionally its ``fingerprint``), also
    checks that the budget was made for that model (see ``check_budget_matches``).
    """
    label = "budget"
    if isinstance(source, dict):
        data = source
    else:
        if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith("{")):
            path = Path(source)
            label = str(path)
            raw = _read_capped(path)
        else:
            raw = source.encode("utf-8", "surrogatepass") if isinstance(source, str) else source
        data = parse_json(raw, label)
    budget = parse_budget(data, label)
    if projections is not None:
        check_budget_matches(budget, projections, fingerprint, allow_other_weights)
    return budget


def _read_capped(path: Path) -> bytes:
    if not path.is_file():
        raise BudgetError(f"budget file not found: {path}" if not path.exists() else f"{path}: not a regular file")
    try:
        with path.open("rb") as handle:
            return handle.read(MAX_BUDGET_BYTES + 1)  # parse_json reports the excess
    except OSError as exc:
        raise BudgetError(f"could not read {path}: {exc.strerror or exc}") from None


def check_budget_matches(
    budget: Budget,
    projections: Sequence[Projection],
    fingerprint: Optional[str] = None,
    allow_other_weights: bool = False,
) -> None:
    """Raise ``BudgetError`` unless the budget's projections are exactly the model's (name, layer, type, shape).

    With ``fingerprint``, a budget made for other weights (a fine-tune of the same architecture) is refused
    too, unless ``allow_other_weights``: its alphas were measured on other weights.
    """
    by_name = {p.name: p for p in projections}
    names = [e.name for e in budget.projections]
    missing = [p.name for p in projections if p.name not in set(names)]
    if missing:
        raise BudgetError(
            f"budget for model {budget.model_name!r} does not match this model: "
            f"{len(missing)} projections missing, e.g. {missing[0]}"
        )
    for i, entry in enumerate(budget.projections):
        proj = by_name.get(entry.name)
        if proj is None:
            raise BudgetError(f"projections[{i}].name: {entry.name!r} is not a projection of this model")
        if (entry.in_features, entry.out_features) != (proj.in_features, proj.out_features):
            raise BudgetError(
                f"projections[{i}].in_features: {entry.name} is {entry.out_features}x{entry.in_features} in the budget "
                f"but {proj.out_features}x{proj.in_features} in the model"
            )
        for field in ("layer", "type"):
            if getattr(entry, field) != getattr(proj, field):
                raise BudgetError(
                    f"projections[{i}].{field}: {entry.name} has {field} {getattr(entry, field)!r} in the budget "
                    f"but {getattr(proj, field)!r} in the model"
                )
    if fingerprint is not None and budget.model_fingerprint != fingerprint:
        if not allow_other_weights:
            raise BudgetError(
                f"model_fingerprint: budget was made for weights {budget.model_fingerprint[:16]}, the loaded model is "
                f"{fingerprint}; use {setting('allow_other_weights')} to use it anyway"
            )
        log.warning("budget was made for weights %s, the loaded model is %s", budget.model_fingerprint, fingerprint)


def save_budget(budget: Budget, path: str | Path) -> Path:
    """Write atomically through the one output writer (``safe_io``)."""
    return write_text(path, budget.to_json())


# --------------------------------------------------------------------------- reading budgets side by side


def describe(budget: Budget) -> str:
    """A short label of how a budget was made, e.g. ``acttail (T=0.15, keep-light, projection, mid)``."""
    if budget.method == "uniform":
        return "uniform"
    knobs = []
    if budget.knob("temperature") is not None:
        knobs.append(f"T={budget.knob('temperature'):g}")
    if budget.knob("eps") is not None:
        knobs.append(f"eps={budget.knob('eps'):g}")
    knobs += [value for value in (budget.direction, budget.group, budget.xmin_rule) if value]
    return f"{budget.method} ({', '.join(knobs)})" if knobs else budget.method


def budget_key(budget: Budget) -> str:
    """A digest of what a budget does to the model (every projection's sparsity), not of when or why it was made."""
    body = json.dumps([[e.name, round(e.sparsity, 12)] for e in budget.projections])
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def sparsity_difference(budget: Budget, reference: Budget) -> dict[str, float]:
    """Per projection, ``budget`` minus ``reference`` sparsity (both must cover the same projections)."""
    theirs = reference.sparsity_by_name()
    if set(theirs) != {e.name for e in budget.projections}:
        raise BudgetError("the two budgets cover different projections: made for different models")
    return {e.name: e.sparsity - theirs[e.name] for e in budget.projections}


def mean_sparsity_by(budget: Budget, by: str) -> dict:
    """Parameter-weighted mean sparsity per projection ``type`` or per ``layer``, in the budget's order."""
    if by not in ("type", "layer"):
        raise BudgetError(f"can summarise by type or layer, not {by!r}")
    weighted: dict = {}
    for entry in budget.projections:
        key = getattr(entry, by)
        total, params = weighted.get(key, (0.0, 0))
        weighted[key] = (total + entry.params * entry.sparsity, params + entry.params)
    return {key: total / params for key, (total, params) in weighted.items()}
