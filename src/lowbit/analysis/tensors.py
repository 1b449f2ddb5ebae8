"""The quantized model's tensors against the float model's, along the graph, sample by sample.

For each float tensor a node computes (matched by name in the two models) it keeps the
running sums that give the cosine (mean over samples) and the SQNR (signal energy over
error energy, over all samples), for the value the quantized model computes and, where
the tensor has a QuantizeLinear/DequantizeLinear pair, for the value its readers see after
rounding: the difference between the two is where error enters, the growth from tensor
to tensor is where it accumulates. For each quantized activation it also keeps the float
values' histogram (:class:`~lowbit.calibration.histogram.HistogramObserver`, exact
merges, bounded size) and how many of them fall outside the range the integers can
represent. Nothing is kept per sample: memory does not grow with the number of samples.

The quantized model is run with its intermediate tensors as extra outputs, so ONNX
Runtime executes it as float operators between Q/DQ pairs rather than fused integer
kernels; the two differ by float rounding in the accumulation only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..calibration.histogram import HistogramObserver
from ..reports.debug import Grid, TracedTensor
from ..search.metrics import METRICS, PairStats

COSINE, SQNR = METRICS["cosine-similarity"], METRICS["sqnr"]

PLOT_BINS = 96  # the histogram as reported: this many bins over the float values and the range


@dataclass
class ErrorSums:
    """Running sums of one compared tensor: the metrics' sums over all samples, and the per-sample cosines."""

    totals: PairStats = field(default_factory=PairStats)
    cosine_sum: float = 0.0
    samples: int = 0

    def add(self, reference: np.ndarray, value: np.ndarray) -> None:
        """One sample's tensor (whatever its shape) and the value compared with it."""
        pair = PairStats()
        pair.update(value.reshape(-1), reference.reshape(-1))
        self.totals.add(pair)
        self.cosine_sum += COSINE.value(pair)
        self.samples += 1

    @property
    def cosine(self) -> float:
        """The mean over samples of each sample's cosine."""
        return self.cosine_sum / self.samples if self.samples else math.nan

    @property
    def sqnr_db(self) -> float:
        """10 log10(signal / error energy) over all samples; infinite when the two agree exactly."""
        return SQNR.value(self.totals)


@dataclass
class ActivationRange:
    """A quantized activation's float values: their histogram and how many the grid clips."""

    grid: Grid
    histogram: HistogramObserver = field(default_factory=HistogramObserver)
    clipped: float = 0.0
    seen: int = 0

    def add(self, values: np.ndarray) -> None:
        self.histogram.update(values)
        self.clipped += self.grid.clip_rate(values) * values.size
        self.seen += values.size

    @property
    def clip_rate(self) -> float:
        return self.clipped / self.seen if self.seen else 0.0

    @property
    def representable(self) -> tuple[float, float]:
        low, high = self.grid.bounds()
        return float(low), float(high)

    def plot_histogram(self) -> tuple[list[float], list[float]]:
        """(edges, counts) in :data:`PLOT_BINS` bins spanning the float values and the representable range."""
        lo, hi = self.representable
        counts, edges = self.histogram.counts, self.histogram.edges()
        if self.histogram.zeros:
            counts, edges = np.array([float(self.histogram.zeros)]), np.array([0.0, 0.0])
        if len(counts):
            lo, hi = min(lo, float(edges[0])), max(hi, float(edges[-1]))
        if hi <= lo:
            hi = lo + 1.0
        target = np.linspace(lo, hi, PLOT_BINS + 1)
        centres = (edges[:-1] + edges[1:]) / 2 if len(counts) else np.zeros(0)
        rebinned, _ = np.histogram(centres, bins=target, weights=counts)
        return target.tolist(), rebinned.tolist()


@dataclass
class TensorRow:
    """One tensor along the graph, as reported."""

    name: str
    producer: str
    op_type: str
    computed: ErrorSums = field(default_factory=ErrorSums)  # the quantized model's value as its producer computes it
    rounded: ErrorSums | None = None  # as its readers see it, after its Q/DQ pair (None: not quantized)
    activation: ActivationRange | None = None


@dataclass(frozen=True)
class WeightRow:
    """A quantized weight: its per-channel float range against the range its integers represent."""

    node: str
    tensor: str
    channel_min: list[float]
    channel_max: list[float]
    range_min: list[float]
    range_max: list[float]
    cosine: float
    sqnr_db: float
    clip_rate: float


def weight_row(traced: TracedTensor) -> WeightRow:
    weight, grid = traced.weight, traced.grid
    axis = grid.axis if grid.axis is not None else 0
    moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis] if weight.ndim else 1, -1)
    scale = np.broadcast_to(grid.scale.reshape(-1).astype(np.float64), (len(moved),))
    zero = np.broadcast_to(grid.zero_point.reshape(-1).astype(np.float64), (len(moved),))
    sums = ErrorSums()
    sums.add(weight, traced.dequantized)
    return WeightRow(traced.node, traced.tensor, moved.min(axis=1).tolist(), moved.max(axis=1).tolist(),
                     ((grid.qmin - zero) * scale).tolist(), ((grid.qmax - zero) * scale).tolist(),
                     sums.cosine, sums.sqnr_db, grid.clip_rate(weight))
