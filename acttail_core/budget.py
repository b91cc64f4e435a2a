"""The budget JSON: a versioned, validated record of per-projection sparsity.

Schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "model_name": "default",            "model_fingerprint": "ed60cef1939e2ebe",
      "method": "acttail",                 # uniform | acttail | linear | greedy
      "target_sparsity": 0.7,
      "temperature": 1.0, "eps": null,     # the knob of the method used (null when unused)
      "direction": "keep-light",           # keep-heavy | keep-light | null
      "group": "projection",               # projection | type | layer | null
      "xmin_rule": "ks",                   # ks | peak | mid | null
      "weighting": "params",
      "effective_sparsity": 0.7,           # sum(params * sparsity) / sum(params)
      "tool_version": "0.1.0", "created_at": "2026-11-29T14:00:00+00:00",
      "projections": [
        {"name": "model.layers.0.self_attn.q_proj", "layer": 0, "type": "q",
         "in_features": 576, "out_features": 576, "params": 331776,
         "alpha": 3.1, "sparsity": 0.62, "keep": 219}, ...
      ]
    }

``keep`` is the number of input entries kept per token: ``round((1 - sparsity) * in_features)``
(halves rounded up).
"""
from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import __version__
from .errors import BudgetError
from .projections import Projection
from .safe_io import write_text

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
METHODS = ("uniform", "acttail", "linear", "greedy")


def keep_count(sparsity: float, in_features: int) -> int:
    """Entries kept per token for a sparsity: round half up, as documented in the schema."""
    return int(math.floor((1.0 - sparsity) * in_features + 0.5))


class BudgetEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    name: str = Field(min_length=1)
    layer: int = Field(ge=0)
    type: str = Field(min_length=1)
    in_features: int = Field(gt=0)
    out_features: int = Field(gt=0)
    params: int = Field(gt=0)
    alpha: Optional[float] = None
    sparsity: float = Field(ge=0.0, lt=1.0)
    keep: int = Field(ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> "BudgetEntry":
        if self.params != self.in_features * self.out_features:
            raise ValueError(f"params must equal in_features * out_features ({self.in_features * self.out_features})")
        expected = keep_count(self.sparsity, self.in_features)
        if self.keep != expected:
            raise ValueError(f"keep must be round((1 - sparsity) * in_features) = {expected}, got {self.keep}")
        return self


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, protected_namespaces=())

    schema_version: int
    model_name: str
    model_fingerprint: str
    method: str
    target_sparsity: float = Field(ge=0.0, lt=1.0)
    temperature: Optional[float] = None
    eps: Optional[float] = None
    direction: Optional[Literal["keep-heavy", "keep-light"]] = None
    group: Optional[Literal["projection", "type", "layer"]] = None
    xmin_rule: Optional[Literal["ks", "peak", "mid"]] = None
    weighting: Literal["params"] = "params"
    effective_sparsity: float = Field(ge=0.0, lt=1.0)
    tool_version: str
    created_at: str
    projections: list[BudgetEntry] = Field(min_length=1)

    @field_validator("schema_version")
    @classmethod
    def _version(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema_version {value}; this tool reads version {SCHEMA_VERSION}")
        return value

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; expected one of {', '.join(METHODS)}")
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
                f"effective_sparsity {self.effective_sparsity} does not match the projections' weighted mean {measured:.6f}"
            )
        return self

    # ---------------------------------------------------------------- helpers
    def sparsity_by_name(self) -> dict[str, float]:
        return {e.name: e.sparsity for e in self.projections}

    def keep_by_name(self) -> dict[str, int]:
        return {e.name: e.keep for e in self.projections}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([e.model_dump() for e in self.projections])

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)


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
    temperature: Optional[float] = None,
    eps: Optional[float] = None,
    direction: Optional[str] = None,
    group: Optional[str] = None,
    xmin_rule: Optional[str] = None,
) -> Budget:
    """Build (and validate) a budget from per-projection sparsities."""
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
        temperature=temperature,
        eps=eps,
        direction=direction,
        group=group,
        xmin_rule=xmin_rule,
        weighting="params",
        effective_sparsity=effective,
        tool_version=__version__,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
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


def parse_budget(data: Any, source: str = "budget") -> Budget:
    if not isinstance(data, dict):
        raise BudgetError(f"{source}: expected a JSON object at the top level")
    try:
        return Budget.model_validate(data)
    except ValidationError as exc:
        raise BudgetError(_describe(exc, source)) from None


def load_budget(
    source: str | Path | bytes | dict,
    projections: Optional[Sequence[Projection]] = None,
    fingerprint: Optional[str] = None,
) -> Budget:
    """Read and validate a budget from a path, raw JSON bytes/str, or a dict.

    Given the model's ``projections`` (and optionally its ``fingerprint``), also
    checks that the budget was made for that model.
    """
    label = "budget"
    if isinstance(source, dict):
        data = source
    else:
        if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith("{")):
            path = Path(source)
            label = str(path)
            if not path.is_file():
                raise BudgetError(f"budget file not found: {path}")
            raw = path.read_bytes()
        else:
            raw = source.encode() if isinstance(source, str) else source
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BudgetError(f"{label}: not valid JSON ({exc})") from None
    budget = parse_budget(data, label)
    if projections is not None:
        check_budget_matches(budget, projections, fingerprint)
    return budget


def check_budget_matches(budget: Budget, projections: Sequence[Projection], fingerprint: Optional[str] = None) -> None:
    """Raise ``BudgetError`` if the budget's projections are not exactly the model's."""
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
    if fingerprint is not None and budget.model_fingerprint != fingerprint:
        # Same architecture, other weights (e.g. a fine-tune): usable, but the alphas were not measured on it.
        log.warning(
            "budget was made for weights %s, the loaded model is %s", budget.model_fingerprint, fingerprint
        )


def save_budget(budget: Budget, path: str | Path) -> Path:
    """Write atomically through the one output writer (``safe_io``)."""
    return write_text(path, budget.to_json())
