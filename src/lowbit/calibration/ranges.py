"""Range selection: from a tensor's histogram to the real range [lo, hi] that gets quantized.

MAX_MIN keeps every value and spends the integer levels on outliers; the other methods
clip, trading a little clip error on rare values for less rounding error on the common
ones (../shared/seeds/001). Each method is a function of the same statistic (a
:class:`~lowbit.calibration.histogram.HistogramObserver`) and the target's
:class:`~lowbit.quantizers.qparams.QuantScheme`, so one calibration pass serves every
method, and a search compares them without reading the data again.

Symmetric schemes get a threshold T and the range [-T, T]. Asymmetric schemes (uint8
activations on CPU) clip only the sides that have values: a non-negative tensor (after
ReLU) gets [0, T] with all 2^b levels in play, a signed one keeps its own extent on the
short side.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..quantizers.qparams import QuantScheme
from .histogram import HistogramObserver


@dataclass(frozen=True)
class RangeSettings:
    """Parameters of the range methods (``[full_quant_param]`` keys of the same names)."""

    num_bin: int = 1024  # KL: bins of the |x| histogram the divergence is computed on (TensorRT: 2048)
    max_percentile: float = 0.9999  # REMOVAL_OUTLIER: fraction of values kept
    kl_stride: int = 128  # KL: distance between candidate thresholds, in bins (tpu-mlir)


Range = tuple[float, float]
RangeMethod = Callable[[HistogramObserver, QuantScheme, RangeSettings], Range]


def max_min(hist: HistogramObserver, scheme: QuantScheme, settings: RangeSettings) -> Range:
    """Every value seen: MindSpore's MAX_MIN, ONNX Runtime's MinMax."""
    return _seen(hist)


def percentile(hist: HistogramObserver, scheme: QuantScheme, settings: RangeSettings) -> Range:
    """Drop the fraction ``1 - max_percentile`` of the most extreme values (REMOVAL_OUTLIER).

    Symmetric: T is the max_percentile quantile of |x|. Asymmetric: the dropped fraction is
    split between the two tails; a one-signed tensor drops it all from its one tail.
    """
    lo, hi = _seen(hist)
    drop = 1.0 - settings.max_percentile
    if scheme.symmetric:
        counts, width = abs_histogram(hist)
        t = _quantile(counts, np.arange(len(counts) + 1) * width, settings.max_percentile)
        return _clip_to_seen(hist, -t, t)
    edges = hist.edges()
    if lo >= 0:
        return _clip_to_seen(hist, lo, _quantile(hist.counts, edges, 1.0 - drop))
    if hi <= 0:
        return _clip_to_seen(hist, _quantile(hist.counts, edges, drop), hi)
    return _clip_to_seen(hist, _quantile(hist.counts, edges, drop / 2), _quantile(hist.counts, edges, 1.0 - drop / 2))


def kl(hist: HistogramObserver, scheme: QuantScheme, settings: RangeSettings) -> Range:
    """TensorRT's entropy calibration as tpu-mlir describes it (seed 004), on ``num_bin`` bins.

    The |x| histogram is resampled to ``num_bin`` bins over [0, |x|max]; the threshold is
    the candidate that minimises KL(P || Q) (see :func:`kl_threshold_bin`). The first bin,
    which holds the exact zeros, is left out (as ncnn does). Symmetric
    schemes use 2^(b-1) levels. The asymmetric variant: a non-negative tensor is
    thresholded with all 2^b levels over [0, T]; a signed tensor takes the symmetric
    threshold on each side that reaches beyond it.
    """
    lo, hi = _seen(hist)
    absmax = max(-lo, hi)
    if absmax == 0:
        return lo, hi
    one_signed = not scheme.symmetric and (lo >= 0 or hi <= 0)
    levels = 2 ** scheme.qtype.bits if one_signed else 2 ** (scheme.qtype.bits - 1)
    counts, width = abs_histogram(hist)
    resampled = resample(counts, width, absmax, settings.num_bin)
    resampled[0] = 0.0  # zeros are exact on any grid; their spike (after ReLU) would swamp the divergence
    i = kl_threshold_bin(resampled, levels, settings.kl_stride)
    t = min((i + 0.5) * absmax / settings.num_bin, absmax)
    if scheme.symmetric:
        return -t, t
    return max(lo, -t), min(hi, t)


def mse(hist: HistogramObserver, scheme: QuantScheme, settings: RangeSettings) -> Range:
    """The range, among 200 shrinkings of the seen one, with the least expected squared error.

    A value inside the range costs the rounding error of a uniform grid, step^2 / 12; a
    value outside costs its distance to the range's edge, squared. Both are summed over the
    histogram with cumulative sums, so each candidate costs O(1) after one O(bins) pass.
    """
    lo, hi = _seen(hist)
    if lo == hi:
        return lo, hi
    alphas = np.arange(1, 201) / 200.0
    if scheme.symmetric:
        counts, width = abs_histogram(hist)
        centres = (np.arange(len(counts)) + 0.5) * width
        highs, lows = alphas * max(-lo, hi), np.zeros_like(alphas)
        steps = 2 * highs / (scheme.qmax - scheme.qmin)
    else:
        counts, centres = hist.counts, _centres(hist)
        lows, highs = alphas * min(lo, 0.0), alphas * max(hi, 0.0)
        steps = (highs - lows) / (scheme.qmax - scheme.qmin)
    above = _tail_cost(centres, counts, highs, upper=True)
    below = _tail_cost(centres, counts, lows, upper=False) if not scheme.symmetric else 0.0
    inside = counts.sum() - _count_outside(centres, counts, lows, highs, scheme.symmetric)
    cost = above + below + inside * steps**2 / 12
    best = int(np.argmin(cost))
    if scheme.symmetric:
        return -float(highs[best]), float(highs[best])
    return _clip_to_seen(hist, float(lows[best]), float(highs[best]))


def aciq(hist: HistogramObserver, scheme: QuantScheme, settings: RangeSettings) -> Range:
    """Analytical clipping (Banner et al., ACIQ): fit a Laplace or Gaussian, clip where the
    closed-form expected error (clip + rounding) is least.

    Signed tensors: the two-sided fit around the mean, range [mean - a, mean + a].
    One-signed tensors (after ReLU): an exponential or half-normal fit of the nonzero
    side, range [0, a]. Laplace/exponential is chosen over Gaussian/half-normal when the
    data's tails are heavier than the Gaussian's (by the moment ratio that separates them).
    """
    lo, hi = _seen(hist)
    if lo == hi:
        return lo, hi
    bits = scheme.qtype.bits
    centres = _centres(hist)
    weights = hist.counts / hist.counts.sum()
    if lo >= 0 or hi <= 0:
        sign = 1.0 if lo >= 0 else -1.0
        x = np.abs(centres)
        nonzero = weights * (x > hist.width)
        share = nonzero.sum()
        if share == 0:
            return lo, hi
        m1 = float((nonzero * x).sum() / share)
        m2 = float((nonzero * x * x).sum() / share)
        laplace = m2 / (m1 * m1) > (2 + math.pi / 2) / 2  # exponential: 2, half-normal: pi/2
        a = aciq_clip(m1 if laplace else math.sqrt(m2), bits, laplace, one_sided=True)
        t = min(a, max(abs(lo), abs(hi)))
        return (0.0, t) if sign > 0 else (-t, 0.0)
    mean = float((weights * centres).sum())
    dev = centres - mean
    var = float((weights * dev**2).sum())
    kurtosis = float((weights * dev**4).sum()) / (var * var) if var > 0 else 3.0
    laplace = kurtosis > 4.5  # Gaussian: 3, Laplace: 6
    scale = float((weights * np.abs(dev)).sum()) if laplace else math.sqrt(var)
    a = aciq_clip(scale, bits, laplace, one_sided=False)
    return _clip_to_seen(hist, mean - a, mean + a)


def aciq_clip(scale: float, bits: int, laplace: bool, one_sided: bool) -> float:
    """The clip value a minimising ACIQ's expected squared error for ``bits`` bits.

    ``scale`` is the Laplace b (or the Gaussian sigma). Two-sided: range [-a, a], rounding
    error a^2 / (3 * 4^bits), clip error 2 b^2 exp(-a/b) (Laplace) or
    (a^2 + s^2) erfc(a / (s sqrt 2)) - a s sqrt(2/pi) exp(-a^2 / 2s^2) (Gaussian).
    One-sided: range [0, a] over the exponential / half-normal, rounding error
    a^2 / (12 * 4^bits), the same clip error (the one tail holds all the mass).
    """
    if scale <= 0:
        return 0.0
    rounding = 1.0 / ((12.0 if one_sided else 3.0) * 4.0**bits)

    def expected_error(a: float) -> float:
        if laplace:
            clip = 2 * scale * scale * math.exp(-a / scale)
        else:
            clip = ((a * a + scale * scale) * math.erfc(a / (scale * math.sqrt(2)))
                    - a * scale * math.sqrt(2 / math.pi) * math.exp(-a * a / (2 * scale * scale)))
        return a * a * rounding + clip

    return _golden_minimum(expected_error, scale / 100, 40 * scale)


def _golden_minimum(f: Callable[[float], float], lo: float, hi: float, steps: int = 80) -> float:
    """The minimum of a unimodal function on [lo, hi], by golden-section search."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(steps):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (a + b) / 2


RANGE_METHODS: dict[str, RangeMethod] = {
    "MAX_MIN": max_min,
    "REMOVAL_OUTLIER": percentile,
    "KL": kl,
    "MSE": mse,
    "ACIQ": aciq,
}


def kl_threshold_bin(hist: np.ndarray, levels: int = 128, stride: int = 128) -> int:
    """The TensorRT/tpu-mlir KL search on a histogram of |x| over [0, |x|max]; returns the bin count i.

    For each candidate i = levels, levels + stride, ..., len(hist):
    P = hist[:i] with every count beyond bin i added to its last bin, normalised;
    Q = hist[:i] merged into ``levels`` groups (bin j in group j * levels // i), each group's
    total spread evenly over the group's nonzero bins of P, normalised;
    the candidate with the least KL(P || Q) wins. (Where P has mass and Q none, Q gets
    1e-12 of it, so clipping into an empty stretch costs a lot rather than infinity.)
    The threshold is then (i + 0.5) * |x|max / len(hist).
    """
    n = len(hist)
    best_i, best_kl = n, math.inf
    for i in range(min(levels, n), n + 1, stride):
        p = hist[:i].astype(np.float64)
        p[-1] += hist[i:].sum()
        if p.sum() == 0:
            continue
        group = np.arange(i) * levels // i
        group_total = np.bincount(group, weights=hist[:i], minlength=levels)
        group_nonzero = np.bincount(group, weights=(p != 0).astype(np.float64), minlength=levels)
        q = np.where(p != 0, group_total[group] / np.maximum(group_nonzero[group], 1), 0.0)
        p = p / p.sum()
        q = q / q.sum() if q.sum() > 0 else q
        mask = p > 0
        divergence = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if divergence < best_kl:
            best_i, best_kl = i, divergence
    return best_i


def abs_histogram(hist: HistogramObserver) -> tuple[np.ndarray, float]:
    """The histogram of |x|: counts over [0, width), [width, 2 width), ... and the width.

    Bin k < 0 covers [k w, (k+1) w), whose absolute values fall in bin -k-1: exact folding.
    """
    width = hist.width
    index = hist.start + np.arange(len(hist.counts))
    folded = np.where(index < 0, -index - 1, index)
    if len(folded) == 0:
        return np.zeros(1), 1.0
    return np.bincount(folded, weights=hist.counts), width


def resample(counts: np.ndarray, width: float, upper: float, bins: int) -> np.ndarray:
    """Counts of a histogram over [0, len*width) redistributed onto ``bins`` bins over [0, upper].

    Counts move in proportion to overlap (a linear cumulative distribution within each
    source bin); counts beyond ``upper`` go to the last bin.
    """
    edges = np.arange(len(counts) + 1) * width
    cumulative = np.concatenate(([0.0], np.cumsum(counts)))
    target = np.interp(np.linspace(0.0, upper, bins + 1), edges, cumulative)
    out = np.diff(target)
    out[-1] += cumulative[-1] - target[-1]
    return out


def _quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    cumulative = np.concatenate(([0.0], np.cumsum(counts)))
    total = cumulative[-1]
    if total == 0:
        return 0.0
    return float(np.interp(q * total, cumulative, edges))


def _tail_cost(centres: np.ndarray, counts: np.ndarray, bounds: np.ndarray, upper: bool) -> np.ndarray:
    """Sum over values beyond each bound of count * (value - bound)^2, for every bound at once."""
    order = centres if upper else -centres
    bounds = bounds if upper else -bounds
    if not upper:
        order, counts = order[::-1], counts[::-1]
    # suffix sums of n, n c, n c^2 over ascending ``order``
    s0 = np.concatenate((np.cumsum(counts[::-1])[::-1], [0.0]))
    s1 = np.concatenate((np.cumsum((counts * order)[::-1])[::-1], [0.0]))
    s2 = np.concatenate((np.cumsum((counts * order**2)[::-1])[::-1], [0.0]))
    first = np.searchsorted(order, bounds, side="right")
    return s2[first] - 2 * bounds * s1[first] + bounds**2 * s0[first]


def _count_outside(centres, counts, lows, highs, symmetric: bool) -> np.ndarray:
    cumulative = np.concatenate(([0.0], np.cumsum(counts)))
    above = cumulative[-1] - cumulative[np.searchsorted(centres, highs, side="right")]
    if symmetric:
        return above
    below = cumulative[np.searchsorted(centres, lows, side="left")]
    return above + below


def _centres(hist: HistogramObserver) -> np.ndarray:
    return hist.edges()[:-1] + hist.width / 2


def _seen(hist: HistogramObserver) -> Range:
    lo, hi = hist.range()
    return float(lo), float(hi)


def _clip_to_seen(hist: HistogramObserver, lo: float, hi: float) -> Range:
    """A chosen range never reaches beyond the values seen: wider only wastes levels."""
    seen_lo, seen_hi = _seen(hist)
    return max(lo, seen_lo), min(hi, seen_hi)
