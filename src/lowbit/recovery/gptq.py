"""Error-compensating weight rounding (GPTQ: Frantar et al., 2022), measured on calibration data.

Rounding to nearest picks each weight's integer alone. Its errors add up in the layer
output, and in depthwise and stem convolutions, whose few weights per channel all see
strongly correlated inputs, they add up to most of an int8 model's error. GPTQ rounds
the weights of an output channel one input at a time and, after each, moves the weights
not yet rounded so that the channel's output on the calibration data stays as close as
it can to the float weight's: the change that minimises ``e^T H e``, where ``H`` is the
second moment of the layer's input.

Rule, for each 2-D Conv, Gemm and MatMul whose weight is stored as integers through a
DequantizeLinear over a constant:

    H = mean(p p^T) over the rows p the layer reads, on the *quantized* model's input
        (:class:`~lowbit.calibration.layer_inputs.LayerInputObserver`: every sample,
        a fixed subset of each sample's patches)
    q = GPTQ(W_float, H + 1% mean(diag H) I) on the layer's own grid

The grid (scale, zero point, integer range) stays the same, so the file size, the
integer kernels and the int32 biases do not change; only which integer each weight
gets does. Bias correction, when on, runs afterwards and removes the mean shift left.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..graph.query import constant_array
from ..quantizers.levels import PACKED_TAG, nearest_level, optimal_levels, packed_bytes
from ..quantizers.saturation import PAIR_BOUND, KernelPairs, fit_pairs
from ..quantizers.weight_only import WeightOnlyPlan
from .adaround import adaround
from .layers import (
    InputKey,
    LayerJob,
    as_rows,
    from_rows,
    integer_weight,
    per_row,
    plan_layer_inputs,
    reads_rows,
)
from .paired import JOINED

DAMPING = 0.01  # of the mean diagonal of H: keeps H invertible where inputs are constant or collinear
BLOCK = 128  # columns rounded between two updates of the columns after them


@dataclass(frozen=True)
class RoundingLayer:
    """A layer to re-round: its float weight before quantization and its grid's integer range."""

    node: ir.Node
    float_weight: np.ndarray
    qmin: int
    qmax: int
    pairs: KernelPairs | None = None  # saturation_safe_weights: pairs kept within |a + b| <= 128


@dataclass
class RoundingReport:
    layers: int
    samples: int
    seconds: float
    # mean over layers of e^T H e / w^T H w: the layer output error relative to the output
    error_nearest: float
    error_compensated: float
    fallbacks: list[str] = field(default_factory=list)  # layers GPTQ could not round as usual, and what it did
    method: str = "GPTQ"  # or "GPTQ + AdaRound": AdaRound refining GPTQ's choices
    levels: list[LevelsRow] = field(default_factory=list)  # weight_levels: each layer's levels and errors
    toward_float: set[str] = field(default_factory=set)  # layers rounded toward the float model's output


@dataclass(frozen=True)
class LevelOption:
    """A layer's integers on ``count`` levels, what weight_levels=AUTO chooses from."""

    count: int
    integers: np.ndarray  # the stored tensor's shape and type
    output_error: float  # e^T H e / w^T H w
    bytes_packed: int


@dataclass(frozen=True)
class LevelsRow:
    """One layer of non-uniform weights: its K levels, errors (relative) and bytes."""

    node: str  # the layer's node; for a lookup table (weight-only Gather), the table's tensor name
    count: int
    levels: list[int]
    weight_error: float  # sum (w - w_q)^2 / sum w^2
    output_error: float  # e^T H e / w^T H w, as the rounding report
    uniform_output_error: float  # the same with every integer of the grid (the uniform weight before)
    bytes_uniform: int
    bytes_packed: int


def gptq_round(weights: np.ndarray, covariance: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
               qmin: int, qmax: int, damping: float = DAMPING, levels: np.ndarray | None = None,
               pairs: KernelPairs | None = None) -> np.ndarray:
    """Integers for ``weights`` (groups, outputs, D) on the grid ``scale``/``zero_point`` (groups, outputs), or
    (groups, outputs, D) where the grid changes along the inputs (a scale per block of input channels).

    ``covariance`` (groups, D, D) is the input second moment of each group. Returns int64
    integers of the weights' shape. ``levels``: the only integers allowed (non-uniform
    weights, :mod:`lowbit.quantizers.levels`), each weight going to the nearest of them.
    ``pairs`` (:mod:`~lowbit.quantizers.saturation`): the second weight of each pair is
    clipped to keep ``|first + second| <= 128``, and the error that costs moves onto the weights after it,
    as any rounding error does.
    """
    w = weights.astype(np.float64).copy()
    h = damped(covariance, damping)
    # upper Cholesky factor of H^-1: row i holds how rounding input i moves the inputs after it
    upper = np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1)
    if not np.all(np.isfinite(upper)):
        raise np.linalg.LinAlgError("the inverse second moment is not finite")
    scale, zero_point = (np.broadcast_to(np.asarray(v, np.float64)[..., np.newaxis] if np.ndim(v) == 2 else v, w.shape)
                         for v in (scale, zero_point))
    q = np.empty(w.shape, dtype=np.int64)
    width = w.shape[-1]
    partners = pairs.partners(width) if pairs is not None else np.full(width, -1)
    for begin in range(0, width, BLOCK):  # GPTQ's lazy updates: the columns after a block move once per block
        end = min(begin + BLOCK, width)
        errors = np.empty(w.shape[:2] + (end - begin,))
        for i in range(begin, end):
            column = w[:, :, i]
            q[:, :, i] = _on_grid(column / scale[:, :, i] + zero_point[:, :, i], qmin, qmax, levels)
            if partners[i] >= 0:  # what the pair's first weight leaves of the bound
                first = q[:, :, partners[i]]
                q[:, :, i] = np.clip(q[:, :, i], -PAIR_BOUND - first, PAIR_BOUND - first)
            error = (column - (q[:, :, i] - zero_point[:, :, i]) * scale[:, :, i]) / upper[:, i, i][:, None]
            w[:, :, i + 1:end] -= error[:, :, None] * upper[:, None, i, i + 1:end]
            errors[:, :, i - begin] = error
        w[:, :, end:] -= np.matmul(errors, upper[:, begin:end, end:])
    return q


def damped(covariance: np.ndarray, damping: float) -> np.ndarray:
    """``H + damping * mean(diag H) I`` per group (float64, a copy), with 1 on the diagonal of an input that is
    always zero: its weights do not matter, and GPTQ rounds them alone."""
    h = covariance.astype(np.float64).copy()
    diagonal = np.arange(h.shape[-1])
    h_diag = h[:, diagonal, diagonal]
    h[:, diagonal, diagonal] += damping * np.maximum(h_diag.mean(axis=1, keepdims=True), 1e-12) + (h_diag <= 0)
    return h


def toward_float_output(rows: np.ndarray, moments: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """From a joined observer's second moment (groups, 2D, 2D; :mod:`~lowbit.recovery.paired`): the quantized
    input's ``H`` and the weight rows to round toward, ``W + W (C - H) (H + damping)^-1`` with ``C = mean(p_f p~^T)``.

    ``E||W p_f - Q p~||^2 = ||Q - W'||^2_H + const`` for that ``W'``, so GPTQ on ``W'`` against
    ``H`` minimises the error to the float model's output. Written as a correction of ``W``, the
    damping pulls toward the float weight (where ``p~ = p_f``, ``W' = W``), not toward zero.
    """
    d = rows.shape[-1]
    h, cross = moments[:, :d, :d], moments[:, d:, :d]
    drift = np.matmul(rows, cross - h)  # (groups, outputs, D)
    correction = np.linalg.solve(damped(h, damping), drift.transpose(0, 2, 1)).transpose(0, 2, 1)
    return h, rows + correction


def _on_grid(values: np.ndarray, qmin: int, qmax: int, levels: np.ndarray | None) -> np.ndarray:
    if levels is None:
        return np.clip(np.rint(values), qmin, qmax)
    return nearest_level(np.clip(values, qmin, qmax), levels)


def relative_squared_error(approximation: np.ndarray, reference: np.ndarray) -> float:
    """``sum (a - r)^2 / sum r^2``: a weight's error relative to the weight (LevelsRow.weight_error)."""
    return float(np.sum((approximation - reference) ** 2) / max(float(np.sum(reference ** 2)), 1e-30))


def output_error(weights: np.ndarray, rounded: np.ndarray, covariance: np.ndarray) -> float:
    """``sum e^T H e / sum w^T H w``: the layer's output error energy relative to its output's."""
    def energy(x: np.ndarray) -> float:
        return float(np.sum(np.matmul(x, covariance) * x))

    den = energy(weights)
    return energy(rounded - weights) / den if den > 0 else 0.0


def compensable(node: ir.Node) -> bool:
    """A 1-D/2-D Conv with explicit pads, a Gemm without transA, or a MatMul, reading a 2-D/3-D/4-D weight."""
    return node.op_type in ("Conv", "Gemm", "MatMul") and reads_rows(node)


def weight_only_layers(plan: WeightOnlyPlan) -> dict[str, ir.Node]:
    """The weights GPTQ re-rounds in weight-only quantization, with their layer: read by one compensable
    layer, as its input 1 (a weight shared by several layers keeps round to nearest: one rounding cannot
    suit every reader's inputs)."""
    found = {}
    for name, tensor in plan.tensors.items():
        if len(tensor.readers) == 1 and tensor.readers[0][1] == 1 and compensable(tensor.readers[0][0]):
            found[name] = tensor.readers[0][0]
    return found


def plan_rounding(layers: list[RoundingLayer], joined: dict[str, str] | None = None) -> LayerJob:
    """The layers whose weight is stored as integers, with an input second-moment observer each (of the joined
    tensor ``joined`` names for a layer rounded toward the float model's output)."""
    return plan_layer_inputs(layers, order=2, tensors=joined)


def compensate_rounding(stages: list[LayerJob], samples: int, start: float, refine: bool = False,
                        levels: dict[str, int] | None = None, compensate: bool = True,
                        measure: Callable[[int, LayerJob], None] | None = None) -> RoundingReport:
    """Re-round each layer's integer weight in place, from the second moments the stages' observers hold.

    The first stage's observers are filled; ``measure(index, stage)`` fills each later stage's, on
    the model as the stages before it left it (:func:`~lowbit.recovery.layers.in_stages`).

    A second moment that GPTQ cannot invert (a singular or ill-conditioned one, from huge
    or degenerate activations) gets more damping, then round to nearest for that layer;
    the report lists each such layer. A layer whose observer reads a joined tensor
    (:mod:`~lowbit.recovery.paired`) is rounded toward the float model's output instead of
    its own float weight; the report names each. ``levels``: per node
    name, how many of its integers the layer's weights may take, chosen for the least output
    error (:func:`choose_layer_levels`), the integer tensor then tagged for packing;
    ``compensate=False`` rounds to the nearest level without GPTQ (``weight_rounding=NEAREST``).
    """
    report = RoundingReport(0, samples, 0.0, 0.0, 0.0, method="nearest level" if not compensate else
                            "GPTQ + AdaRound" if refine and not levels else "GPTQ")
    before, after = [], []
    for index, stage in enumerate(stages):
        if index and measure is not None:
            measure(index, stage)
        for layer, key in stage.layers:
            errors = _round_layer(layer, stage.observers[key].covariance(), (levels or {}).get(layer.node.name),
                                  refine, compensate, report, toward_float=joined(key))
            if errors is not None:
                before.append(errors[0])
                after.append(errors[1])
    report.seconds = time.perf_counter() - start
    report.error_nearest = float(np.mean(before)) if before else 0.0
    report.error_compensated = float(np.mean(after)) if after else 0.0
    return report


def joined(key: InputKey) -> bool:
    """Whether the observer of ``key`` reads a layer's input in both models (its second moment is joined)."""
    return key[0].startswith(JOINED)


def _round_layer(layer: RoundingLayer, covariance: np.ndarray, count: int | None, refine: bool, compensate: bool,
                 report: RoundingReport, toward_float: bool = False) -> tuple[float, float] | None:
    """Re-round one layer in place (on ``count`` levels when given); its output error (nearest, chosen),
    None when GPTQ could not round it. Adds to ``report``'s layers, fallbacks and levels.

    ``toward_float``: ``covariance`` is a joined second moment, and the rows rounded (and
    the errors measured) are the float-output target of :func:`toward_float_output`."""
    dq = integer_weight(layer.node)
    rows = as_rows(layer.node, layer.float_weight)
    if toward_float:
        covariance, rows = _float_target(layer, rows, covariance, report)
    scale, zero_point = _grid(dq, rows.shape[:2])
    stored = constant_array(dq.inputs[0])
    nearest = as_rows(layer.node, stored.astype(np.int64))
    chosen = None
    if count is not None and count < layer.qmax - layer.qmin + 1 and np.all(np.isfinite(covariance)):
        chosen = choose_layer_levels(rows, covariance, scale, zero_point, layer, count)
        uniform_error = _layer_error(rows, nearest, scale, zero_point, covariance)
        nearest = nearest_level(np.clip(rows / scale[..., None] + zero_point[..., None], layer.qmin,
                                        layer.qmax), chosen).astype(np.int64)
    q, damping = (nearest, DAMPING) if not compensate else \
        _round_with_fallback(rows, covariance, scale, zero_point, layer, chosen)
    if damping != DAMPING:
        report.fallbacks.append(f"{layer.node.name}: " + (f"damping raised to {damping:g}" if q is not None
                                                          else "second moments not invertible, kept round to nearest"))
    q = nearest if q is None and chosen is not None else q
    if q is None:
        return None
    error_nearest = _layer_error(rows, nearest, scale, zero_point, covariance)
    error = _layer_error(rows, q, scale, zero_point, covariance)
    if refine and chosen is None:  # AdaRound from GPTQ's choices; kept where it lowers the layer's output error
        refined = adaround(rows, covariance, scale, zero_point, layer.qmin, layer.qmax, start=q)
        refined_error = _layer_error(rows, refined, scale, zero_point, covariance)
        if refined_error < error:
            q, error = refined, refined_error
    if error >= error_nearest:  # GPTQ's greedy order can lose on a tiny layer: keep the better
        error, q = error_nearest, nearest
        report.toward_float.discard(layer.node.name)  # its own weight's integers, as bias correction expects
        if chosen is None:
            return error_nearest, error
    if layer.pairs is not None and chosen is None:  # AdaRound's choices know nothing of the pairs
        q = fit_pairs(q, layer.pairs)[0]
    new = from_rows(layer.node, q, stored.shape).astype(stored.dtype)
    dq.inputs[0].const_value = ir.tensor(new, name=dq.inputs[0].name)
    if chosen is not None:
        dq.metadata_props[PACKED_TAG] = str(count)
        dequantized = (q - zero_point[..., None]) * scale[..., None]
        report.levels.append(LevelsRow(layer.node.name, count, [int(v) for v in chosen],
                                       relative_squared_error(dequantized, rows), error, uniform_error,
                                       stored.size * stored.itemsize, packed_bytes(stored.size, count)))
    report.layers += 1
    return error_nearest, error


def _float_target(layer: RoundingLayer, rows: np.ndarray, moments: np.ndarray,
                  report: RoundingReport) -> tuple[np.ndarray, np.ndarray]:
    """The quantized input's second moment and the rows to round toward; the layer's own rows (and a fallback
    line) where the joined moments are not finite or not invertible."""
    d = rows.shape[-1]
    try:
        with np.errstate(all="ignore"):
            covariance, target = toward_float_output(rows.astype(np.float64), moments, DAMPING)
    except np.linalg.LinAlgError:
        target = None
    if target is None or not np.all(np.isfinite(target)):
        report.fallbacks.append(f"{layer.node.name}: its inputs' joint moments are not invertible; rounded toward "
                                "its own float weight")
        return moments[:, :d, :d], rows
    report.toward_float.add(layer.node.name)
    return covariance, target


def compensated_rows(layer: RoundingLayer, covariance: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The layer's integers as rows on a symmetric grid of ``scale`` (groups, outputs), without touching the
    model: GPTQ's, or round to nearest where GPTQ fails or leaves the larger output error (as a written
    layer keeps). What the mixed-bit search measures a width with when the model will be rounded by GPTQ."""
    rows = as_rows(layer.node, layer.float_weight).astype(np.float64)
    zero_point = np.zeros_like(scale)
    nearest = np.clip(np.rint(rows / scale[..., None]), layer.qmin, layer.qmax)
    return _gptq_or_nearest(layer, rows, covariance, scale, zero_point, nearest)


def _gptq_or_nearest(layer: RoundingLayer, rows, covariance, scale, zero_point, nearest: np.ndarray,
                     levels: np.ndarray | None = None) -> np.ndarray:
    """GPTQ's integers (onto ``levels`` when given), or ``nearest`` where GPTQ fails or leaves no less error."""
    q = _round_with_fallback(rows, covariance, scale, zero_point, layer, levels)[0]
    if q is None or _layer_error(rows, q, scale, zero_point, covariance) >= \
            _layer_error(rows, nearest, scale, zero_point, covariance):
        return nearest
    return q


def level_options(job: LayerJob, counts: tuple[int, ...], compensate: bool,
                  skip: set[str] = frozenset()) -> dict[str, list[LevelOption]]:
    """For each layer of ``job`` (its weight as stored now) but those named in ``skip``, its integers on each of
    ``counts`` levels, for weight_levels=AUTO to choose from; the model is not changed."""
    options = {}
    for layer, key in job.layers:
        if layer.node.name in skip:
            continue
        dq = integer_weight(layer.node)
        covariance = job.observers[key].covariance()
        if dq is None or not np.all(np.isfinite(covariance)):
            continue
        rows = as_rows(layer.node, layer.float_weight)
        scale, zero_point = _grid(dq, rows.shape[:2])
        stored = constant_array(dq.inputs[0])
        options[layer.node.name] = [_level_option(layer, rows, covariance, scale, zero_point, count, compensate,
                                                  stored) for count in counts if count < layer.qmax - layer.qmin + 1]
    return {name: choices for name, choices in options.items() if choices}


def _level_option(layer: RoundingLayer, rows, covariance, scale, zero_point, count: int, compensate: bool,
                  stored: np.ndarray) -> LevelOption:
    chosen = choose_layer_levels(rows, covariance, scale, zero_point, layer, count)
    nearest = nearest_level(np.clip(rows / scale[..., None] + zero_point[..., None], layer.qmin, layer.qmax),
                            chosen).astype(np.int64)
    q = _gptq_or_nearest(layer, rows, covariance, scale, zero_point, nearest, chosen) if compensate else nearest
    return LevelOption(count, from_rows(layer.node, q, stored.shape).astype(stored.dtype),
                       _layer_error(rows, q, scale, zero_point, covariance), packed_bytes(stored.size, count))


def choose_layer_levels(rows: np.ndarray, covariance: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                        layer: RoundingLayer, count: int) -> np.ndarray:
    """The ``count`` integers of the layer's grid with the least output error when each weight takes the
    nearest: each weight's squared error counts with its channel's scale squared times the second moment
    of the input it multiplies (the diagonal of ``H``)."""
    diagonal = np.arange(covariance.shape[-1])
    importance = scale[..., None] ** 2 * np.maximum(covariance[:, diagonal, diagonal], 0)[:, None, :]
    if not np.any(importance > 0):
        importance = np.ones_like(rows)
    return optimal_levels(rows / scale[..., None] + zero_point[..., None], importance, count, layer.qmin,
                          layer.qmax)


def _layer_error(rows, q, scale, zero_point, covariance) -> float:
    return output_error(rows, (q - zero_point[..., None]) * scale[..., None], covariance)


def _round_with_fallback(rows, covariance, scale, zero_point, layer: RoundingLayer, levels=None):
    """(integers, damping used), trying ten and a hundred times the damping; (None, damping) when all fail."""
    if not np.all(np.isfinite(covariance)):
        return None, math.inf
    for damping in (DAMPING, 10 * DAMPING, 100 * DAMPING):
        try:
            with np.errstate(all="ignore"):
                q = gptq_round(rows, covariance, scale, zero_point, layer.qmin, layer.qmax, damping, levels,
                               None if levels is not None else layer.pairs)
        except np.linalg.LinAlgError:
            continue
        return q, damping
    return None, math.inf


def _grid(dq: ir.Node, rows_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per output channel, shaped (groups, outputs per group)."""
    zero = constant_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    return per_row(constant_array(dq.inputs[1]), rows_shape), per_row(0.0 if zero is None else zero, rows_shape)
