"""The spectra data model: one projection's empirical spectral density and its power-law fit.

Kept apart from ``spectra`` (which computes them) and ``spectra_io`` (which stores them) so that
both can depend on it without depending on each other.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from .projections import Projection

XMIN_RULES = ("ks", "peak", "mid")
# The rule the allocation study chose (bench/results/study/report.md); `ks` stays the weightwatcher-comparable fit.
DEFAULT_RULE = "mid"
BACKENDS = ("acttail", "weightwatcher")


@dataclass
class PowerLawFit:
    alpha: float
    xmin: float
    tail_size: int
    ks_distance: float


@dataclass
class ProjectionSpectrum:
    """ESD summary of one projection; ``eigenvalues`` ascending, float32, for plots."""

    name: str
    layer: int
    type: str
    in_features: int
    out_features: int
    alpha: float
    xmin: float
    tail_size: int
    ks_distance: float
    lambda_max: float
    num_eigs: int
    eigenvalues: np.ndarray = field(repr=False)

    @property
    def params(self) -> int:
        return self.in_features * self.out_features

    def projection(self) -> Projection:
        return Projection(self.name, self.layer, self.type, self.in_features, self.out_features)


@dataclass
class Spectra:
    """Per-projection spectra of one model under one xmin rule."""

    model_name: str
    fingerprint: str
    rule: str
    backend: str
    entries: list[ProjectionSpectrum]

    def projections(self) -> list[Projection]:
        return [e.projection() for e in self.entries]

    def alphas(self) -> np.ndarray:
        return np.array([e.alpha for e in self.entries], dtype=np.float64)

    def by_name(self) -> dict[str, ProjectionSpectrum]:
        return {e.name: e for e in self.entries}

    def to_frame(self):
        """A pandas DataFrame, one row per projection (no eigenvalues)."""
        rows = []
        for e in self.entries:
            row = {k: v for k, v in asdict(e).items() if k != "eigenvalues"}
            row["params"] = e.params
            rows.append(row)
        return pd.DataFrame(rows)

    def type_summary(self):
        """count / mean / min / max alpha per projection type, in canonical type order."""
        frame = self.to_frame()
        summary = frame.groupby("type", sort=False)["alpha"].agg(["count", "mean", "min", "max"])
        return summary
