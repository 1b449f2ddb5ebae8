"""Integer types, quantization schemes and the one place where scales and zero points are computed.

Linear quantization maps a real range [rmin, rmax] onto the integers [qmin, qmax]:
``q = clip(round(x / scale) + zero_point, qmin, qmax)`` and ``x' = (q - zero_point) * scale``.
Whatever the observer (max/min, histogram, search), the range ends here, so the rules
below hold for every method:

* 0.0 is always exactly representable (the range is widened to include it), because
  zero padding, ReLU outputs and sparse weights must survive quantization unchanged;
* symmetric schemes put the zero point at the centre (0 for signed types) and use
  ``scale = absmax / (qmax - zero_point)``; signed symmetric weights use the narrow
  range [-127, 127] so that ``-x`` is representable whenever ``x`` is (TensorRT's rule);
* asymmetric schemes spread the range over all 2^b levels;
* an all-zero range gets scale 1 (any scale represents it exactly).

Rounding is round-half-to-even, as ONNX QuantizeLinear specifies, so the values that
lowbit computes offline agree with those a runtime computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir


@dataclass(frozen=True)
class QuantType:
    """An integer storage type: its width, signedness and ONNX / numpy types."""

    name: str
    bits: int
    signed: bool
    onnx_type: ir.DataType
    numpy_dtype: type

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1


INT4 = QuantType("int4", 4, True, ir.DataType.INT4, np.int8)  # held in int8, packed two per byte on disk
UINT8 = QuantType("uint8", 8, False, ir.DataType.UINT8, np.uint8)
INT8 = QuantType("int8", 8, True, ir.DataType.INT8, np.int8)
UINT16 = QuantType("uint16", 16, False, ir.DataType.UINT16, np.uint16)
INT16 = QuantType("int16", 16, True, ir.DataType.INT16, np.int16)
INT32 = QuantType("int32", 32, True, ir.DataType.INT32, np.int32)


@dataclass(frozen=True)
class QuantScheme:
    """How one tensor is quantized: type, symmetry, granularity.

    ``axis`` is the per-channel axis, None for one scale for the whole tensor.
    """

    qtype: QuantType
    symmetric: bool
    axis: int | None = None
    narrow_range: bool = False

    @property
    def qmin(self) -> int:
        return self.qtype.qmin + 1 if (self.narrow_range and self.qtype.signed) else self.qtype.qmin

    @property
    def qmax(self) -> int:
        return self.qtype.qmax

    def per_tensor(self) -> QuantScheme:
        return QuantScheme(self.qtype, self.symmetric, None, self.narrow_range)


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of a tensor (scalars, or 1-D along ``scheme.axis``)."""

    scale: np.ndarray
    zero_point: np.ndarray
    scheme: QuantScheme

    def _broadcast(self, arr: np.ndarray, rank: int) -> np.ndarray:
        if self.scheme.axis is None or arr.ndim == 0:
            return arr
        shape = [1] * rank
        shape[self.scheme.axis] = -1
        return arr.reshape(shape)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Real values to integers of the scheme's type (round half to even, then clip)."""
        scale = self._broadcast(self.scale.astype(np.float32), x.ndim)
        zero_point = self._broadcast(self.zero_point.astype(np.int64), x.ndim)
        q = np.rint(x.astype(np.float32) / scale).astype(np.int64) + zero_point
        return np.clip(q, self.scheme.qmin, self.scheme.qmax).astype(self.scheme.qtype.numpy_dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        scale = self._broadcast(self.scale.astype(np.float32), q.ndim)
        zero_point = self._broadcast(self.zero_point.astype(np.int64), q.ndim)
        return ((q.astype(np.int64) - zero_point) * scale).astype(np.float32)


def compute_qparams(rmin: np.ndarray | float, rmax: np.ndarray | float, scheme: QuantScheme) -> QParams:
    """Scale and zero point that map [rmin, rmax] (scalars or per channel) onto the scheme's integers."""
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    qmin, qmax = scheme.qmin, scheme.qmax
    if scheme.symmetric:
        zero_point = np.full(rmin.shape, 0 if scheme.qtype.signed else (qmax + 1) // 2, dtype=np.int64)
        absmax = np.maximum(-rmin, rmax)
        scale = absmax / (qmax - zero_point)
    else:
        scale = (rmax - rmin) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero_point = np.clip(np.rint(qmin - rmin / safe), qmin, qmax).astype(np.int64)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return QParams(scale, zero_point.astype(scheme.qtype.numpy_dtype), scheme)
