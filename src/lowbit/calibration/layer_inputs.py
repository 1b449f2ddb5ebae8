"""What a layer multiplies its weight with, summed over the data: GPTQ's and bias correction's statistic.

A Conv output channel computes ``w . p`` for every patch ``p`` of its input (the
``group``'s channels times the kernel window); a Gemm/MatMul output column computes
``w . x`` for every row ``x``. A weight error ``e`` therefore shifts the output's mean
by ``e . mean(p)`` (what bias correction takes out) and adds ``e^T H e`` to its squared
error, with ``H = mean(p p^T)`` (what GPTQ rounds against).

This observer accumulates both, per group, batch by batch, in float64: its memory is
``groups x D x D`` whatever the number of samples, and two observers of the same layer
merge by adding.

* The first moment reads every patch: per kernel offset, the sum of a shifted window of
  the input, summed over rows once per kernel row.
* The second moment reads ``D`` patches of each sample (at least 32, at most
  :data:`ROWS_PER_SAMPLE`). A 3x3 depthwise layer at 112x112 has 12544 patches of 9
  values per sample: neighbours are nearly the same patch, and a few dozen spread over
  the image estimate ``H`` as well as all of them (measured on EfficientNet-Lite0 and
  PP-OCRv4 rec: GPTQ's error against ``H`` of every patch was 1.55e-5 against 1.54e-5,
  where rounding to nearest gives 6.2e-5 and 8.5e-5), for a fraction of the copies and
  products. The patches kept are a fixed random subset of the output positions, the
  same for every sample, so the result does not depend on how the samples are batched
  or split between processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .observers import Observer

ROWS_PER_SAMPLE = 256  # patches of a sample the second moment reads: at most this many, and D (at least 32)


@dataclass(frozen=True)
class ConvGeometry:
    """What a 2-D Conv reads per output: ``group`` groups of ``channels / group`` input channels."""

    kernel: tuple[int, int]
    group: int = 1
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right (ONNX order)
    dilations: tuple[int, int] = (1, 1)


class LayerInputObserver(Observer):
    """Per group, the moments of the patches ``p`` a layer reads that ``orders`` names: 1, the
    sum of ``p`` over every patch (bias correction); 2, the sum of ``p p^T`` over a fixed
    subset of them (GPTQ).

    ``geometry`` None: a Gemm/MatMul input, whose last axis is the reduced one; its
    samples are the leading axis when the input has three or more axes.
    """

    STATE = (*Observer.STATE, "total", "rows", "first", "first_rows", "geometry", "orders", "rows_per_sample")

    def __init__(self, geometry: ConvGeometry | None = None, orders: tuple[int, ...] = (1, 2),
                 rows_per_sample: int = 0):
        super().__init__()
        self.geometry = geometry
        self.orders = tuple(orders)
        self.rows_per_sample = rows_per_sample
        self.total: np.ndarray | None = None  # (groups, D, D): float64 sum of p p^T over the kept patches
        self.rows = 0
        self.first: np.ndarray | None = None  # (groups, D): sum of p over every patch
        self.first_rows = 0
        self.seen_finite = True

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        samples = x if (self.geometry is not None or x.ndim >= 3) else [x]  # one sample's patches at a time
        for sample in samples:
            if self.geometry is None:
                rows = sample.reshape(-1, sample.shape[-1])
                if 1 in self.orders:
                    self._add_first(rows.sum(axis=0, dtype=np.float64)[np.newaxis], rows.shape[0])
                if 2 in self.orders:
                    self._add_second(self._keep(rows, axis=0).T[np.newaxis])
            else:
                sample = sample if sample.ndim == 3 else sample[:, np.newaxis]  # 1-D: height 1
                if 1 in self.orders:
                    out_h, out_w = self._positions(sample.shape[1:])
                    self._add_first(self._patch_sum(sample), out_h * out_w)
                if 2 in self.orders:
                    self._add_second(self._kept_columns(self._padded(sample)))
        self.batches += 1

    def finite(self) -> bool:
        return self.seen_finite and (self.first is None or bool(np.all(np.isfinite(self.first))))

    def state(self) -> dict[str, np.ndarray]:
        state = super().state()
        state["geometry"] = np.array([] if self.geometry is None else
                                     [*self.geometry.kernel, self.geometry.group, *self.geometry.strides,
                                      *self.geometry.pads, *self.geometry.dilations], dtype=np.int64)
        return state

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> Observer:
        observer = super().from_state(state)
        g = [int(v) for v in np.asarray(state["geometry"])]
        observer.geometry = ConvGeometry(tuple(g[0:2]), g[2], tuple(g[3:5]), tuple(g[5:9]), tuple(g[9:11])) if g \
            else None
        observer.orders = tuple(int(v) for v in np.atleast_1d(observer.orders))
        observer.seen_finite = True
        return observer

    def merge(self, other: Observer) -> None:
        if (not isinstance(other, LayerInputObserver) or other.geometry != self.geometry
                or (other.orders, other.rows_per_sample) != (self.orders, self.rows_per_sample)):
            raise TypeError("can only merge the input statistics of the same layer geometry")
        if other.first is not None:
            self._add_first(other.first, other.first_rows)
        if other.total is not None:
            self.total = other.total.copy() if self.total is None else self.total + other.total
            self.rows += other.rows
        self.batches += other.batches

    def mean(self) -> np.ndarray:
        """The mean patch per group: (groups, D)."""
        if self.first is None:
            raise ValueError("observer saw no data" if 1 in self.orders else "observer keeps no first moments")
        return self.first / self.first_rows

    def covariance(self) -> np.ndarray:
        """The mean of ``p p^T`` per group: (groups, D, D)."""
        if self.total is None:
            raise ValueError("observer saw no data" if 2 in self.orders else "observer keeps no second moments")
        return self.total / self.rows

    # -- accumulation

    def _add_first(self, first: np.ndarray, rows: int) -> None:
        self.first = first.astype(np.float64) if self.first is None else self.first + first
        self.first_rows += rows

    def _add_second(self, columns: np.ndarray) -> None:
        """Add ``sum p p^T`` of the patches ``columns`` (groups, D, n): products in float32 (in
        float64 where float32 could overflow), summed in float64 sample by sample, so that the
        total does not depend on how the samples were split between observers."""
        largest = float(np.max(np.abs(columns))) if columns.size else 0.0
        if largest < np.sqrt(np.finfo(np.float32).max / max(1, columns.shape[2])):
            moments = np.matmul(columns, columns.transpose(0, 2, 1)).astype(np.float64)
        else:  # huge (or not finite) inputs
            self.seen_finite = self.seen_finite and bool(np.isfinite(largest))
            wide = columns.astype(np.float64)
            moments = np.matmul(wide, wide.transpose(0, 2, 1))
        self.total = moments if self.total is None else np.add(self.total, moments, out=self.total)
        self.rows += columns.shape[2]

    def _keep(self, rows: np.ndarray, axis: int) -> np.ndarray:
        """The kept entries along ``axis``: a fixed random subset, in order (all of them when few)."""
        kept = self._kept(rows.shape[axis], rows.shape[1 - axis])
        return rows if kept is None else np.take(rows, kept, axis=axis)

    def _kept(self, count: int, dimension: int) -> np.ndarray | None:
        """Which of a sample's ``count`` patches of ``dimension`` values the second moment reads (None: all).

        ``D`` patches (at least 32, at most :data:`ROWS_PER_SAMPLE`; ``rows_per_sample`` when
        set): a 9-value depthwise patch
        needs far fewer than a 1152-value pointwise one. With 64 samples, GPTQ rounded to the
        same error (measured against ``H`` from every patch) as with all patches, on
        EfficientNet-Lite0 and PP-OCRv4 rec. Seeded by the count alone: the same positions
        for every sample of a layer, in any process.
        """
        keep = self.rows_per_sample or min(ROWS_PER_SAMPLE, max(dimension, 32))
        if count <= keep:
            return None
        return np.sort(np.random.default_rng(count).choice(count, keep, replace=False))

    # -- convolution patches

    def _padded(self, sample: np.ndarray) -> np.ndarray:
        top, left, bottom, right = self.geometry.pads
        return np.pad(sample, ((0, 0), (top, bottom), (left, right))) if any(self.geometry.pads) else sample

    def _positions(self, size: tuple[int, int]) -> tuple[int, int]:
        """Output rows and columns for an input of ``size`` (height, width) before padding."""
        g = self.geometry
        padded = (size[0] + g.pads[0] + g.pads[2], size[1] + g.pads[1] + g.pads[3])
        spans = [(k - 1) * d + 1 for k, d in zip(g.kernel, g.dilations)]
        return tuple((extent - span) // stride + 1 for extent, span, stride in zip(padded, spans, g.strides))

    def _offsets(self) -> list[tuple[int, int]]:
        (kh, kw), (dh, dw) = self.geometry.kernel, self.geometry.dilations
        return [(i * dh, j * dw) for i in range(kh) for j in range(kw)]

    def _patch_sum(self, sample: np.ndarray) -> np.ndarray:
        """Sum of every patch, (groups, D), read from the unpadded ``sample`` (padding adds zeros):
        per kernel offset, the sum of the strided window it reads, summed over rows once per
        kernel row (once in all for stride 1: the sum of every row, less the few outside)."""
        g = self.geometry
        out_h, out_w = self._positions(sample.shape[1:])
        (kh, kw), (dh, dw), (sh, sw) = g.kernel, g.dilations, g.strides
        top, left = g.pads[0], g.pads[1]
        rows = [_window(i * dh - top, sh, out_h, sample.shape[1]) for i in range(kh)]
        if sh == 1:
            all_rows = sample.sum(axis=1, dtype=np.float64)
            row_sums = [all_rows - sample[:, :r.start].sum(axis=1, dtype=np.float64)
                        - sample[:, r.stop:].sum(axis=1, dtype=np.float64) for r in rows]
        else:
            row_sums = [sample[:, r].sum(axis=1, dtype=np.float64) for r in rows]
        columns = [_window(j * dw - left, sw, out_w, sample.shape[2]) for j in range(kw)]
        sums = np.stack([row_sums[i][:, c].sum(axis=1) for i in range(kh) for c in columns], axis=1)
        return sums.reshape(g.group, -1)  # (C, kh*kw) -> (groups, channels per group * kh*kw)

    def _kept_columns(self, padded: np.ndarray) -> np.ndarray:
        """(groups, D, kept positions): the patches at the kept output positions, one per column."""
        g = self.geometry
        out_h, out_w = self._positions(tuple(n - p - q for n, p, q in zip(padded.shape[1:], g.pads[:2], g.pads[2:])))
        per_group = padded.shape[0] // g.group
        kept = self._kept(out_h * out_w, per_group * g.kernel[0] * g.kernel[1])
        positions = np.arange(out_h * out_w) if kept is None else kept
        rows_at, cols_at = (positions // out_w) * g.strides[0], (positions % out_w) * g.strides[1]
        offsets = np.array(self._offsets())
        # (C, kh*kw, kept): channel c's value at each kernel offset and kept position
        patches = padded[:, offsets[:, 0, None] + rows_at[None, :], offsets[:, 1, None] + cols_at[None, :]]
        return patches.reshape(g.group, -1, positions.size)


def _window(start: int, step: int, count: int, size: int) -> slice:
    """The indices ``start + step * t`` (t < count) that fall inside ``[0, size)``, as a slice."""
    first = max(0, -(-(-start) // step)) if start < 0 else 0  # the first t with start + step * t >= 0
    last = min(count - 1, (size - 1 - start) // step)  # the last t with start + step * t < size
    if last < first:
        return slice(0, 0)
    return slice(start + step * first, start + step * last + 1, step)
