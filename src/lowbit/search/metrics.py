"""How far a quantized tensor is from its float reference: the metrics of Horizon's quant_config.

Every metric is computed from a few running sums over (actual, reference) pairs, kept in
:class:`PairStats`. Sums add across batches and workers, so a metric over a whole
calibration set streams, and the same sums can be produced inside an ONNX graph (the
layer-wise search does that) or in numpy (model outputs): one definition for both.

=================  ==========================================  ======================
metric             value                                       better
=================  ==========================================  ======================
cosine-similarity  sum(a b) / sqrt(sum a^2 sum b^2)            higher (1 = same direction)
mse                mean((a - b)^2)                             lower
mae                mean(|a - b|)                               lower
mre                sum|a - b| / sum|b| (relative L1 error)     lower
sqnr               10 log10(sum b^2 / sum (a - b)^2), in dB    higher
chebyshev          max |a - b|                                 lower
=================  ==========================================  ======================

(a: the quantized model's tensor, b: the float model's.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np


@dataclass
class PairStats:
    """Running sums over (actual, reference) element pairs."""

    count: float = 0.0
    sum_sq_diff: float = 0.0
    sum_abs_diff: float = 0.0
    max_abs_diff: float = 0.0
    dot: float = 0.0
    sum_sq_actual: float = 0.0
    sum_sq_reference: float = 0.0
    sum_abs_reference: float = 0.0

    def update(self, actual: np.ndarray, reference: np.ndarray) -> None:
        if actual.shape != reference.shape:
            raise ValueError(f"shapes differ: {actual.shape} and {reference.shape}")
        a = np.asarray(actual, dtype=np.float64).ravel()
        b = np.asarray(reference, dtype=np.float64).ravel()
        diff = a - b
        self.add(PairStats(
            count=a.size,
            sum_sq_diff=float(diff @ diff),
            sum_abs_diff=float(np.abs(diff).sum()),
            max_abs_diff=float(np.abs(diff).max()) if diff.size else 0.0,
            dot=float(a @ b),
            sum_sq_actual=float(a @ a),
            sum_sq_reference=float(b @ b),
            sum_abs_reference=float(np.abs(b).sum()),
        ))

    def add(self, other: PairStats) -> None:
        """Fold in another set of sums (another batch, another worker)."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, max(mine, theirs) if f.name == "max_abs_diff" else mine + theirs)

    merge = add  # the observers' name for it

    def state(self) -> dict[str, np.ndarray]:
        return {f.name: np.asarray(getattr(self, f.name), dtype=np.float64) for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> PairStats:
        return cls(**{f.name: float(state[f.name]) for f in fields(cls)})


def pooled(parts: list[PairStats]) -> PairStats:
    """The sums of several parts (samples, batches, workers) together."""
    total = PairStats()
    for part in parts:
        total.add(part)
    return total


@dataclass(frozen=True)
class Metric:
    name: str
    value: Callable[[PairStats], float]
    higher_is_better: bool
    needs: tuple[str, ...]  # the PairStats fields ``value`` reads

    def better(self, a: float, b: float) -> bool:
        """Whether score ``a`` is strictly better than ``b`` (NaN is never better)."""
        if math.isnan(a):
            return False
        if math.isnan(b):
            return True
        return a > b if self.higher_is_better else a < b

    def best(self, scores: list[float]) -> int:
        """Index of the best score (the first one on ties)."""
        best = 0
        for i, score in enumerate(scores):
            if self.better(score, scores[best]):
                best = i
        return best


def _cosine(s: PairStats) -> float:
    norms = math.sqrt(s.sum_sq_actual * s.sum_sq_reference)
    if norms == 0:
        return 1.0 if s.sum_sq_actual == s.sum_sq_reference else 0.0
    return s.dot / norms


def _sqnr(s: PairStats) -> float:
    if s.sum_sq_diff == 0:
        return math.inf
    if s.sum_sq_reference == 0:
        return -math.inf
    return 10 * math.log10(s.sum_sq_reference / s.sum_sq_diff)


def _mre(s: PairStats) -> float:
    if s.sum_abs_reference == 0:
        return 0.0 if s.sum_abs_diff == 0 else math.inf
    return s.sum_abs_diff / s.sum_abs_reference


METRICS: dict[str, Metric] = {
    "cosine-similarity": Metric("cosine-similarity", _cosine, True, ("dot", "sum_sq_actual", "sum_sq_reference")),
    "mse": Metric("mse", lambda s: s.sum_sq_diff / s.count if s.count else 0.0, False, ("sum_sq_diff", "count")),
    "mae": Metric("mae", lambda s: s.sum_abs_diff / s.count if s.count else 0.0, False, ("sum_abs_diff", "count")),
    "mre": Metric("mre", _mre, False, ("sum_abs_diff", "sum_abs_reference")),
    "sqnr": Metric("sqnr", _sqnr, True, ("sum_sq_diff", "sum_sq_reference")),
    "chebyshev": Metric("chebyshev", lambda s: s.max_abs_diff, False, ("max_abs_diff",)),
}


def compare(actual: np.ndarray, reference: np.ndarray, metric: str = "cosine-similarity") -> float:
    """One metric between two arrays of the same shape."""
    stats = PairStats()
    stats.update(actual, reference)
    return METRICS[metric].value(stats)
