"""Second moments of what a layer multiplies its weight with: the statistic GPTQ rounds against.

A Conv output channel computes ``w . p`` for every patch ``p`` of its input (the
``group``'s channels times the kernel window); a Gemm/MatMul output column computes
``w . x`` for every row ``x``. How much a weight error ``e`` changes the output, summed
over the data, is ``e^T H e`` with ``H = sum p p^T``. This observer accumulates ``H``
per group, in float64, batch by batch: its memory is ``groups x D x D`` whatever the
number of samples, and two observers of the same layer merge by adding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .observers import Observer


@dataclass(frozen=True)
class ConvGeometry:
    """What a 2-D Conv reads per output: ``group`` groups of ``channels / group`` input channels."""

    kernel: tuple[int, int]
    group: int = 1
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right (ONNX order)
    dilations: tuple[int, int] = (1, 1)


class InputCovarianceObserver(Observer):
    """``H = sum p p^T`` over the rows ``p`` a layer multiplies its weight with, per group.

    ``geometry`` None: a Gemm/MatMul input, whose last axis is the reduced one.
    """

    STATE = (*Observer.STATE, "total", "rows", "geometry")

    def __init__(self, geometry: ConvGeometry | None = None):
        super().__init__()
        self.geometry = geometry
        self.total: np.ndarray | None = None  # (groups, D, D)
        self.rows = 0
        self.seen_finite = True

    def update(self, x: np.ndarray) -> None:
        # one sample at a time bounds the patch copy to one sample's patches
        for sample in (x if self.geometry is not None else [x]):
            rows = self._rows(np.asarray(sample, dtype=np.float32))
            with np.errstate(over="ignore", invalid="ignore"):  # checked on the next line
                moments = np.matmul(rows.transpose(0, 2, 1), rows)
            if not np.all(np.isfinite(moments)):  # float32 products overflow on huge (finite) inputs
                self.seen_finite = self.seen_finite and bool(np.all(np.isfinite(rows)))
                moments = np.matmul(rows.transpose(0, 2, 1).astype(np.float64), rows.astype(np.float64))
            self._fold(moments.astype(np.float64), rows.shape[1])
        self.batches += 1

    def finite(self) -> bool:
        return self.seen_finite

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
        observer.seen_finite = True
        return observer

    def merge(self, other: Observer) -> None:
        if not isinstance(other, InputCovarianceObserver) or other.geometry != self.geometry:
            raise TypeError("can only merge the input covariance of the same layer geometry")
        if other.total is not None:
            self._fold(other.total, other.rows)
        self.batches += other.batches

    def covariance(self) -> np.ndarray:
        """The mean of ``p p^T`` per group: (groups, D, D)."""
        if self.total is None:
            raise ValueError("observer saw no data")
        return self.total / self.rows

    def _fold(self, total: np.ndarray, rows: int) -> None:
        self.total = total if self.total is None else self.total + total
        self.rows += rows

    def _rows(self, x: np.ndarray) -> np.ndarray:
        """(groups, rows, D): the vectors each output channel's weights are multiplied with."""
        if self.geometry is None:
            return x.reshape(1, -1, x.shape[-1])
        g = self.geometry
        channels = x.shape[0]
        per_group = channels // g.group
        kh, kw = g.kernel
        if g.kernel == (1, 1) and g.strides == (1, 1) and not any(g.pads):
            columns = x.reshape(g.group, per_group, -1)
            return columns.transpose(0, 2, 1)
        top, left, bottom, right = g.pads
        padded = np.pad(x, ((0, 0), (top, bottom), (left, right)))
        span = ((kh - 1) * g.dilations[0] + 1, (kw - 1) * g.dilations[1] + 1)
        windows = sliding_window_view(padded, span, axis=(1, 2))
        windows = windows[:, ::g.strides[0], ::g.strides[1], ::g.dilations[0], ::g.dilations[1]]  # C Ho Wo kh kw
        out_h, out_w = windows.shape[1:3]
        windows = windows.reshape(g.group, per_group, out_h, out_w, kh, kw).transpose(0, 2, 3, 1, 4, 5)
        return windows.reshape(g.group, out_h * out_w, per_group * kh * kw)
