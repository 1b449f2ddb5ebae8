"""Int8 weights that ONNX Runtime's x86 kernels cannot saturate on CPUs without VNNI.

On x86 CPUs with AVX2 (or AVX-512) but without VNNI, ONNX Runtime's int8 matrix kernels
(QLinearConv, QGemm, QLinearMatMul, MatMulInteger: MLAS's u8 x s8 GEMM) multiply with
VPMADDUBSW: the products of two neighbouring elements along the reduction axis are added
into one signed 16-bit lane, which saturates at -32768 and 32767. The activation bytes
are unsigned (uint8, or int8 shifted by 128), so a lane's worst value is
``255 * max(|a|, |b|, |a + b|)``: a pair of weights ``(a, b)`` of the same sign with
``|a + b| > 128`` can overflow (a pair of opposite signs never does), and the layer's
output is silently wrong (EfficientNet-Lite0 at int8: top-1 agreement with float 0.575 on
such a CPU instead of 0.97). CPUs with VNNI and ARM CPUs add in 32 bits and are not
affected; neither are depthwise convolutions (their own kernel) nor int4 / int16 weights.

The pairs are elements ``2j`` and ``2j + 1`` of the reduction axis in the order the
kernel reads it: a Gemm's or MatMul's K; for a Conv (ONNX Runtime runs QLinearConv in
NHWC), each group's ``(kh, kw, c_in)`` (measured on this machine: a pattern of large weights
on neighbours in that order overflows, the same weights one place further do not).
Keeping ``|a + b| <= 128`` (255 x 128 = 32640) makes the model compute exactly on every
CPU, whatever the input. Most channels' largest weight has a neighbour of the same sign that
takes the pair over 128, so those channels get a somewhat coarser grid (:func:`widen_for_pairs`).

``saturation_safe_weights=false`` turns this off for models that run only on VNNI or ARM
CPUs or on TensorRT.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..graph.query import attribute
from ..recovery.layers import as_rows, from_rows
from .qparams import QParams, QuantType

PAIR_BOUND = 128  # |a + b| <= 128: 255 * 128 = 32640 fits a signed 16-bit lane (32767)
WIDENINGS = 9  # scales tried per channel by widen_for_pairs, from the channel's own to one with no pair over
WIDENED_MEMO = 2048  # weights whose widened grid widen_for_pairs remembers
EIGHT_BIT = (ir.DataType.INT8, ir.DataType.UINT8)
_WIDENED: OrderedDict[bytes, QParams] = OrderedDict()


@dataclass(frozen=True)
class KernelPairs:
    """Which weights of a row (one output channel, the reduction axis flattened as ONNX stores it) the kernel
    multiplies as a pair: ``first[j]`` with ``second[j]``."""

    first: np.ndarray
    second: np.ndarray

    def partners(self, width: int) -> np.ndarray:
        """For each position of a row, the position of its pair's other weight when that one comes earlier in
        the row (GPTQ rounds it first), else -1."""
        partner = np.full(width, -1, np.int64)
        early, late = np.minimum(self.first, self.second), np.maximum(self.first, self.second)
        partner[late] = early
        return partner

    def sums(self, q: np.ndarray) -> np.ndarray:
        """Each pair's ``|a + b|`` (..., pairs): what a lane holds, in units of the activation byte, when both
        bytes are 255 (for a pair of opposite signs that is never the worst case, and never over the bound)."""
        return np.abs(q[..., self.first].astype(np.int64) + q[..., self.second])


def kernel_pairs(node: ir.Node, weight_shape: tuple[int, ...]) -> KernelPairs | None:
    """The pairs of a Conv, Gemm or MatMul weight whose kernel can saturate; None for any other node, a
    depthwise convolution, or a weight that is not 2-D (MatMul, Gemm) or 3-D/4-D (Conv)."""
    if node.op_type == "Conv" and len(weight_shape) in (3, 4):
        channels, spatial = weight_shape[1], int(np.prod(weight_shape[2:]))
        if channels == 1 and int(attribute(node, "group", 1)) > 1:
            return None  # depthwise: ONNX Runtime's depthwise kernel accumulates in 32 bits
        # row position c * spatial + s, read in the order s * channels + c
        order = np.arange(channels * spatial).reshape(channels, spatial).T.reshape(-1)
    elif node.op_type in ("Gemm", "MatMul") and len(weight_shape) == 2:
        order = np.arange(weight_shape[1] if node.op_type == "Gemm" and attribute(node, "transB", 0)
                          else weight_shape[0])
    else:
        return None
    paired = len(order) // 2 * 2
    return KernelPairs(order[0:paired:2], order[1:paired:2])


def reads_eight_bit_activation(node: ir.Node) -> bool:
    """Whether the node's data input (input 0) comes from a DequantizeLinear of 8-bit integers."""
    source = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    return (source is not None and source.op_type == "DequantizeLinear"
            and source.inputs[0].dtype in EIGHT_BIT)


def guarded(node: ir.Node, weight_type: QuantType, enabled: bool) -> bool:
    """Whether ``node``'s integer weight is kept from saturating: ``enabled`` (saturation_safe_weights), an int8
    weight, and an 8-bit activation read. uint8 weights (the DSP preset's) run the u8 x u8 kernel, which
    widens to 16 bits before it multiplies; other widths run other kernels, or none."""
    return enabled and weight_type.bits == 8 and weight_type.signed and reads_eight_bit_activation(node)


def fit_pairs(rows: np.ndarray, pairs: KernelPairs) -> tuple[np.ndarray, int]:
    """``rows`` (any leading axes, the row last) with every pair brought to ``|a + b| <= 128``; the number of
    weights changed.

    A pair over the bound (two weights of the same sign) loses the excess split as evenly as
    integers allow, the larger half from the larger weight (the least squared change for a
    given sum), signs kept.
    """
    q = rows.astype(np.int64).copy()
    a, b = q[..., pairs.first], q[..., pairs.second]
    excess = np.abs(a + b) - PAIR_BOUND
    over = excess > 0
    if not over.any():
        return rows, 0
    larger = np.abs(a) >= np.abs(b)
    big_cut, small_cut = (excess + 1) // 2, excess // 2
    cut_a = np.where(over, np.where(larger, big_cut, small_cut), 0)
    cut_b = np.where(over, np.where(larger, small_cut, big_cut), 0)
    q[..., pairs.first] = np.sign(a) * (np.abs(a) - cut_a)
    q[..., pairs.second] = np.sign(b) * (np.abs(b) - cut_b)
    changed = int(np.count_nonzero(cut_a) + np.count_nonzero(cut_b))
    return q.astype(rows.dtype), changed


def fit_weight(node: ir.Node, integers: np.ndarray) -> tuple[np.ndarray, int]:
    """A stored integer weight of ``node`` (ONNX layout) with its pairs fitted (:func:`fit_pairs`); the number
    of weights changed. Unchanged for a node :func:`kernel_pairs` leaves out."""
    pairs = kernel_pairs(node, integers.shape)
    if pairs is None:
        return integers, 0
    fitted, changed = fit_pairs(as_rows(node, integers), pairs)
    if not changed:
        return integers, 0
    return from_rows(node, fitted, integers.shape).astype(integers.dtype), changed


def widen_for_pairs(node: ir.Node, weight: np.ndarray, qparams: QParams) -> QParams:
    """:func:`choose_widened_grid`, remembered by content: the range search and the accuracy search rewrite
    the same weights for every candidate (EfficientNet-Lite0: 1.2 s a rewrite)."""
    key = _content_key(node, weight, qparams)
    if key not in _WIDENED:
        _WIDENED[key] = choose_widened_grid(node, weight, qparams)
        while len(_WIDENED) > WIDENED_MEMO:
            _WIDENED.popitem(last=False)
    return _WIDENED[key]


def _content_key(node: ir.Node, weight: np.ndarray, qparams: QParams) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((node.op_type, attribute(node, "group", 1), attribute(node, "transB", 0), weight.shape,
                        str(weight.dtype), qparams.scheme)).encode())
    for array in (weight, qparams.scale, qparams.zero_point):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.digest()


def choose_widened_grid(node: ir.Node, weight: np.ndarray, qparams: QParams) -> QParams:
    """``qparams`` of a symmetric int8 weight with each channel's scale raised where that costs less squared
    error than cutting its pairs down to the bound (:func:`fit_pairs`); a pure function of its arguments.

    Cutting two of a channel's largest weights that sit side by side costs much (EfficientNet-Lite0
    with cuts only: 1 - cosine 0.24), a coarser grid for that channel little; a pair slightly over
    is cheaper to cut. Tried per channel (one choice for a per-tensor scale): WIDENINGS steps
    from 1 to the factor that brings every pair within the bound. Asymmetric weights keep
    their grid (cut only).
    """
    pairs = kernel_pairs(node, weight.shape)
    if pairs is None or np.any(qparams.zero_point != 0):
        return qparams
    grouped = as_rows(node, weight)  # (groups, outputs per group, D): one row per output channel, in order
    rows = grouped.reshape(-1, grouped.shape[-1]).astype(np.float64)
    scale = np.broadcast_to(qparams.scale.astype(np.float64).reshape(-1, 1), (rows.shape[0], 1))
    q = np.clip(np.rint(rows / scale), qparams.scheme.qmin, qparams.scheme.qmax)
    needed = np.max(pairs.sums(q), axis=-1, initial=0) / PAIR_BOUND
    if qparams.scale.ndim == 0:
        needed = np.full_like(needed, needed.max())
    needed = np.maximum(needed, 1.0)[:, None]
    best_error, best = None, None
    for step in np.linspace(0.0, 1.0, WIDENINGS):
        trial = scale * (1.0 + (needed - 1.0) * step)
        q = fit_pairs(np.clip(np.rint(rows / trial), qparams.scheme.qmin, qparams.scheme.qmax), pairs)[0]
        error = np.sum((q * trial - rows) ** 2, axis=1, keepdims=True)
        if qparams.scale.ndim == 0:
            error = np.full_like(error, error.sum())
        if best is None:
            best_error, best = error, trial
        else:
            better = error < best_error
            best_error, best = np.where(better, error, best_error), np.where(better, trial, best)
    widened = best[:, 0] if qparams.scale.ndim else best[0, 0]
    return QParams(np.asarray(widened, np.float32).reshape(qparams.scale.shape), qparams.zero_point, qparams.scheme)
