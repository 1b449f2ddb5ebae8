"""A streaming histogram whose range can grow without restarting or losing counts.

Bins have a width that is a power of two and edges at integer multiples of it, so:

* when a later batch goes beyond the bins so far, bins are added at the same width;
* when that would exceed ``max_bins``, neighbouring bins are merged in pairs (the width
  doubles) until the range fits. Merging pairs of aligned bins is exact: no count moves
  to a wrong bin, unlike the re-binning by linear interpolation that other tools do;
* two histograms of the same tensor (from two workers, two runs) merge exactly too: the
  finer one is merged down to the coarser width, then the counts add.

Binning is one multiply by the (exact, power-of-two) reciprocal width, a truncation and a
``bincount``, all vectorised; the histogram itself is at most ``max_bins`` floats, so memory
does not grow with the number of samples. A large tensor contributes an evenly strided
sample of at most ``values_per_batch`` values per batch (32768 by default: over a few
hundred samples that is tens of millions of values per tensor, far more than the
histogram resolves), which keeps a histogram pass close to a min/max pass in time. The
exact minimum and maximum are kept beside the counts: the range-selection methods in
:mod:`lowbit.calibration.ranges` start from them.
"""

from __future__ import annotations

import math

import numpy as np

from .observers import Observer, RangeObserver


class HistogramObserver(RangeObserver):
    """Histogram of a whole tensor (per-tensor only) with at most ``max_bins`` bins.

    The width is always the smallest power of two with which every value seen so far
    (zeros included) fits in ``max_bins`` aligned bins: the first batch sets it, and a
    later batch that reaches further merges pairs until the range fits again. So the
    histogram depends only on the values seen, not on their order or on how they were
    split between batches or merged observers (without sampling: see ``values_per_batch``).
    ``range()`` is the exact (min, max): the clipping methods read :attr:`counts`.
    """

    STATE = (*Observer.STATE, "max_bins", "values_per_batch", "counts", "start", "exponent", "zeros", "min", "max")

    def __init__(self, max_bins: int = 16384, values_per_batch: int | None = 1 << 15):
        super().__init__(axis=None)
        if max_bins < 2:
            raise ValueError("a histogram needs at least 2 bins")
        self.max_bins = max_bins
        self.values_per_batch = values_per_batch
        self.counts = np.zeros(0, dtype=np.float64)
        self.start = 0  # index of the first bin: it covers [start * width, (start + 1) * width)
        self.exponent: int | None = None  # width = 2 ** exponent; None until a nonzero value is seen
        self.zeros = 0  # values seen while every value so far was 0 (the width is still unknown)
        self.min: float | None = None
        self.max: float | None = None

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.exponent) if self.exponent is not None else 0.0

    @property
    def total(self) -> float:
        return float(self.counts.sum()) + self.zeros

    def edges(self) -> np.ndarray:
        """The bin edges, ``len(counts) + 1`` values."""
        return (self.start + np.arange(len(self.counts) + 1)) * self.width

    def update(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        lo, hi = float(np.min(x)), float(np.max(x))
        self.batches += 1
        if not (math.isfinite(lo) and math.isfinite(hi)) or self.min is not None and math.isnan(self.min):
            self.min = self.max = math.nan  # finite() reports it to the data engine: nothing to bin
            return
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)
        if lo == hi == 0.0 and self.exponent is None:
            self.zeros += x.size
            return
        if self.exponent is None:
            if self.zeros:  # zeros seen before any other value belong to the range too
                lo, hi = min(lo, 0.0), max(hi, 0.0)
            self.exponent = _finest_exponent(lo, hi, self.max_bins)
            self.start = math.floor(lo / self.width)
        self._cover(lo, hi)
        sample = self._sample(x)
        # x / width is exact (a power of two), so is its floor, so is the integer subtraction:
        # every value lands in the bin whose edges hold it, at any width.
        scaled = np.multiply(sample, np.float32(1.0 / self.width), dtype=np.float32)
        np.floor(scaled, out=scaled)
        scaled -= np.float32(self.start)
        counts = np.bincount(scaled.astype(np.int32), minlength=len(self.counts))
        self.counts += counts if sample.size == x.size else counts * (x.size / sample.size)
        zeros, self.zeros = self.zeros, 0
        self._add_zeros(zeros)

    def _sample(self, x: np.ndarray) -> np.ndarray:
        """At most ``values_per_batch`` values, evenly strided; the start rotates from batch to batch.

        The stride is odd, so it does not keep hitting the same columns of an image-shaped
        tensor. Counts are weighted back by the stride (see update), so histograms of
        sampled and unsampled batches add up consistently.
        """
        flat = x.reshape(-1)
        if self.values_per_batch is None or flat.size <= self.values_per_batch:
            return flat
        stride = -(-flat.size // self.values_per_batch) | 1
        return flat[self.batches % stride::stride]

    def merge(self, other: Observer) -> None:
        if not isinstance(other, HistogramObserver):
            raise TypeError(f"cannot merge {type(other).__name__} into HistogramObserver")
        self.batches += other.batches
        if other.min is None:
            return
        self.min = other.min if self.min is None else min(self.min, other.min)
        self.max = other.max if self.max is None else max(self.max, other.max)
        if other.exponent is None:
            self._add_zeros(other.zeros)
            return
        if self.exponent is None:
            zeros = self.zeros
            self.counts, self.start, self.exponent, self.zeros = other.counts.copy(), other.start, other.exponent, 0
            self._add_zeros(zeros)
            return
        counts, start, exponent = other.counts, other.start, other.exponent
        if exponent < self.exponent:
            counts, start = _merge_pairs(counts, start, self.exponent - exponent)
            exponent = self.exponent
        elif exponent > self.exponent:
            self.counts, self.start = _merge_pairs(self.counts, self.start, exponent - self.exponent)
            self.exponent = exponent
        self._cover(start * self.width, (start + len(counts)) * self.width - self.width / 2)
        if self.exponent > exponent:  # the two ranges together needed coarser bins: merge the other's too
            counts, start = _merge_pairs(counts, start, self.exponent - exponent)
        offset = start - self.start
        self.counts[offset:offset + len(counts)] += counts

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        if self.min is None:
            raise ValueError("observer saw no data")
        return np.asarray(self.min), np.asarray(self.max)

    def finite(self) -> bool:
        return self.min is None or (math.isfinite(self.min) and math.isfinite(self.max))

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> Observer:
        observer = super().from_state(state)
        observer.counts = np.asarray(observer.counts, dtype=np.float64).reshape(-1)
        return observer

    def _add_zeros(self, zeros: int) -> None:
        if self.exponent is None:
            self.zeros += zeros
        elif zeros:
            self._cover(0.0, 0.0)
            self.counts[-self.start] += zeros

    def _cover(self, lo: float, hi: float) -> None:
        """Grow (and if needed coarsen) the bins so that [lo, hi] falls inside them."""
        first = min(self.start, math.floor(lo / self.width))
        last = max(self.start + len(self.counts) - 1, math.floor(hi / self.width))
        factor = 0
        while (last >> factor) - (first >> factor) + 1 > self.max_bins:
            factor += 1
        if factor:
            self.counts, self.start = _merge_pairs(self.counts, self.start, factor)
            self.exponent += factor
            first, last = first >> factor, last >> factor
        if first < self.start or last >= self.start + len(self.counts):
            grown = np.zeros(last - first + 1, dtype=np.float64)
            offset = self.start - first
            grown[offset:offset + len(self.counts)] = self.counts
            self.counts, self.start = grown, first


def _finest_exponent(lo: float, hi: float, max_bins: int) -> int:
    """The smallest ``e`` with which [lo, hi] spans at most ``max_bins`` bins of width ``2 ** e``."""
    span = hi - lo if hi > lo else max(abs(lo), abs(hi))
    exponent = math.ceil(math.log2(span / max_bins)) - 1 if span > 0 else 0
    while math.floor(hi / 2.0 ** exponent) - math.floor(lo / 2.0 ** exponent) + 1 > max_bins:
        exponent += 1
    return exponent


def _merge_pairs(counts: np.ndarray, start: int, factor: int) -> tuple[np.ndarray, int]:
    """Merge groups of ``2 ** factor`` aligned bins: bin k goes to bin ``k >> factor``."""
    if len(counts) == 0:
        return counts, start >> factor
    index = (start + np.arange(len(counts))) >> factor
    new_start = int(index[0])
    return np.bincount(index - new_start, weights=counts), new_start
