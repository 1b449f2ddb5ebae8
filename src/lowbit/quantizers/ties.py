"""Keeping a graph input off the rounding ties of its grid.

Why: 8-bit pixels normalised as ``(p - 127.5) / 127.5`` (PP-OCR, many TensorFlow and GAN models)
take 256 values spaced 2/255 apart, half a spacing off zero. On the uint8 grid of [-1, 1] (scale
2/255, an integer zero point) every one of them lands exactly halfway between two levels, and
round-half-to-even sends neighbouring pixel values alternately up and down: a dither of half a step
on every pixel, which the first layers amplify. Whether a scale lands on the ties or a hair beside
them depends on the last bit of its float32 value. Measured with only the input quantized (the rest
float) on held-out data: EfficientNet-Lite1 1 - cosine 0.00053 on the ties, 0.00004 with the scale
0.1% wider; PP-OCRv4 rec 0.0013 against 0.00011. A scale a little wider sends every such value the
same way (toward zero), which the network barely notices; nothing is clipped that was not before.

Rule: when at least :data:`TIED_SHARE` of a tensor's calibration values lie within
:data:`TIE_DISTANCE` (in steps) of a tie, the scale is widened by the first factor of
:data:`WIDENINGS` that leaves fewer than that. Only tensors with few distinct values are checked
(:class:`~lowbit.calibration.observers.ValueCountsObserver`): computed activations are continuous and
spread over the ties like any other point.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .qparams import QParams

TIE_DISTANCE = 1e-4  # in steps; float32 division errs by about 1e-5 of a step at 128 steps from zero
TIED_SHARE = 0.01
WIDENINGS = 1.0 + 2.0 ** -np.arange(10.0, 6.0, -1.0)  # about 1.001, 1.002, 1.004, 1.008


def tied_share(qparams: QParams, values: np.ndarray, counts: np.ndarray) -> float:
    """The share of the values (weighted by their counts) that ``qparams`` puts within TIE_DISTANCE of a tie,
    computed as QuantizeLinear computes it: float32 ``x / scale``."""
    steps = np.asarray(values, np.float32) / np.float32(qparams.scale)
    tied = np.abs(steps - np.floor(steps) - np.float32(0.5)) < TIE_DISTANCE
    return float(counts[tied].sum() / counts.sum())


def off_ties(qparams: QParams, values: np.ndarray, counts: np.ndarray) -> QParams:
    """``qparams`` with the scale widened as little as the rule needs (unchanged when the values are off ties)."""
    if qparams.scheme.axis is not None or tied_share(qparams, values, counts) < TIED_SHARE:
        return qparams
    for widening in WIDENINGS:
        wider = _widened(qparams, widening)
        if tied_share(wider, values, counts) < TIED_SHARE:
            return wider
    return qparams


def as_recorded(qparams: QParams, recorded_scale: float) -> QParams:
    """``qparams`` with the scale a calibration table recorded, when that is this scale widened by the rule.

    A table written by lowbit holds each tensor's range and its scale. The range alone gives
    back every scale except one the rule widened, because the rule looked at calibration values
    the table does not hold; the recorded scale brings that widening back, bit for bit. Any
    other recorded scale (a range edited by hand, another scheme) leaves the range's own.
    """
    if qparams.scheme.axis is not None:
        return qparams
    for widening in WIDENINGS:
        wider = _widened(qparams, widening)
        if wider.scale == np.float32(recorded_scale):
            return wider
    return qparams


def _widened(qparams: QParams, widening: float) -> QParams:
    """The scale times ``widening`` in float32: the one computation both the rule and the table's reader make."""
    return replace(qparams, scale=(qparams.scale * widening).astype(np.float32))
