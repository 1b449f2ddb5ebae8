"""Weights on a b-bit grid, for any b from 1 to 16: levels, scale, and the integer type that stores them.

Rules (symmetric, per channel along ``axis`` or per tensor when ``axis`` is None):

* b >= 2: the levels are the integers in [-(2^(b-1) - 1), 2^(b-1) - 1] (2^b - 1 levels,
  symmetric so that ``-w`` is representable whenever ``w`` is; 2 bits is ternary);
* b = 1: the levels are {-1, +1} and the scale is mean(|w|), the scale that minimises the
  squared error of ``sign(w) * scale`` (binary weights, XNOR-Net's rule);
* 8 bits and more: the scale is |w|max / qmax (round to nearest, nothing clipped);
* 2 to 7 bits: each channel's scale is the one of ``r * |w|max / qmax`` for ``r`` in
  CLIP_RATIOS that gives the smallest squared error; clipping a few large weights
  buys a finer step for all the others, which matters once levels are few;
* the integers are stored in the narrowest type that holds them: int4 (when the model
  is at opset 21), int8 or int16 (opset 21). Bit widths with no type of their own (5, 6, 7 ...)
  keep their 2^b levels inside the wider type, so the file is that type's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .qparams import INT4, INT8, INT16, QuantType

CLIP_RATIOS = np.linspace(1.0, 0.2, 33)
ROUND_TO_NEAREST_FROM = 8  # from this width on, the scale is |w|max / qmax


def level_bound(bits: int) -> int:
    """The largest integer level of a ``bits``-wide grid (levels are -bound..bound, 0 excluded at 1 bit)."""
    return 1 if bits == 1 else 2 ** (bits - 1) - 1


def storage_type(bits: int, opset21: bool) -> QuantType:
    """The narrowest integer type for the levels of ``bits``; int4 needs opset 21 (as does int16)."""
    if bits <= 4 and opset21:
        return INT4
    return INT8 if bits <= 8 else INT16


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight on its grid: integers, their scale (scalar or one per channel), and the width used."""

    q: np.ndarray  # int8 / int16 values (int4 values are held in int8)
    scale: np.ndarray  # float32, shape () or (channels,)
    axis: int | None
    bits: int

    def dequantize(self) -> np.ndarray:
        scale = self.scale
        if self.axis is not None:
            shape = [1] * self.q.ndim
            shape[self.axis] = -1
            scale = scale.reshape(shape)
        return (self.q.astype(np.float32) * scale).astype(np.float32)


def quantize_weight(weight: np.ndarray, bits: int, axis: int | None) -> QuantizedWeight:
    """Put ``weight`` on the ``bits``-wide symmetric grid (see the module rules)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in [1, 16], got {bits}")
    w = weight.astype(np.float32)
    rows = _rows(w, axis)  # (channels, values per channel)
    bound = level_bound(bits)
    if bits == 1:
        scale = np.abs(rows).mean(axis=1)
        q_rows = np.where(rows >= 0, 1, -1)
    else:
        scale = _scale(rows, bits, bound)
        q_rows = np.clip(np.rint(rows / scale[:, None]), -bound, bound)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    dtype = np.int8 if bits <= 8 else np.int16
    q = _unrows(q_rows.astype(dtype), w.shape, axis)
    return QuantizedWeight(q, scale if axis is not None else scale.reshape(()), axis, bits)


def relative_error(weight: np.ndarray, quantized: QuantizedWeight) -> float:
    """||W_q - W|| / ||W||: the weight error that the mixed-bit budget (init_scale) bounds without data."""
    norm = float(np.linalg.norm(weight.astype(np.float64)))
    if norm == 0:
        return 0.0
    return float(np.linalg.norm(quantized.dequantize().astype(np.float64) - weight)) / norm


def _scale(rows: np.ndarray, bits: int, bound: int) -> np.ndarray:
    absmax = np.abs(rows).max(axis=1).astype(np.float64)
    full = np.where(absmax > 0, absmax / bound, 1.0)
    if bits >= ROUND_TO_NEAREST_FROM:
        return full
    best_scale, best_error = full, np.full(rows.shape[0], np.inf)
    for ratio in CLIP_RATIOS:
        scale = (full * ratio).astype(np.float32)
        error = np.square(np.clip(np.rint(rows / scale[:, None]), -bound, bound) * scale[:, None] - rows).sum(axis=1)
        better = error < best_error
        best_scale = np.where(better, scale, best_scale)
        best_error = np.where(better, error, best_error)
    return best_scale


def _rows(w: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return w.reshape(1, -1)
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def _unrows(rows: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    if axis is None:
        return rows.reshape(shape)
    moved = (shape[axis],) + tuple(d for i, d in enumerate(shape) if i != axis)
    return np.moveaxis(rows.reshape(moved), 0, axis)
