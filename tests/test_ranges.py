"""The streaming histogram and the range methods (KL, percentile, MSE, ACIQ), against hand computations."""

import math

import numpy as np
import pytest

from lowbit.calibration.histogram import HistogramObserver
from lowbit.calibration.ranges import (
    RangeSettings,
    abs_histogram,
    aciq,
    aciq_clip,
    kl,
    kl_threshold_bin,
    max_min,
    mse,
    percentile,
    resample,
)
from lowbit.quantizers.qparams import INT8, UINT8, QuantScheme, compute_qparams

SYMMETRIC = QuantScheme(INT8, symmetric=True, narrow_range=True)
ASYMMETRIC = QuantScheme(UINT8, symmetric=False)


def histogram(data, batches=10, **kwargs):
    h = HistogramObserver(values_per_batch=None, **kwargs)
    for chunk in np.array_split(np.asarray(data, dtype=np.float32), batches):
        h.update(chunk)
    return h


# -- the histogram ----------------------------------------------------------------------

def test_histogram_counts_exactly_and_grows_without_restarting():
    h = HistogramObserver(max_bins=8, values_per_batch=None)
    h.update(np.array([0.5, 1.0, 1.5], np.float32))  # span 1 over 4 bins: width 0.25
    assert h.width == 0.25 and h.start == 2
    h.update(np.array([-3.0], np.float32))  # needs bins -12..6: too many, so pairs merge twice (width 1)
    assert h.width == 1.0 and len(h.counts) <= 8
    assert h.total == 4
    edges = h.edges()
    for value in (0.5, 1.0, 1.5, -3.0):  # every value sits in the bin whose edges hold it
        k = int(np.searchsorted(edges, value, side="right")) - 1
        assert h.counts[k] >= 1
    assert (h.min, h.max) == (-3.0, 1.5)


def test_histogram_merge_equals_one_pass():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 5000), rng.normal(3, 10, 5000)
    both = histogram(np.concatenate([a, b]), batches=1)
    left, right = histogram(a, batches=1), histogram(b, batches=1)
    left.merge(right)
    assert left.width == both.width and left.total == both.total == 10000
    np.testing.assert_array_equal(left.counts[left.counts > 0].sum(), 10000)
    # same values, same aligned bins: the merged counts equal the one-pass counts
    lo = min(left.start, both.start)
    pad = lambda h: np.pad(h.counts, (h.start - lo, 0))  # noqa: E731
    x, y = pad(left), pad(both)
    n = max(len(x), len(y))
    np.testing.assert_array_equal(np.pad(x, (0, n - len(x))), np.pad(y, (0, n - len(y))))


def test_all_zero_batches_then_data():
    h = HistogramObserver(values_per_batch=None)
    h.update(np.zeros(10, np.float32))
    h.update(np.array([1.0, -1.0], np.float32))
    assert h.total == 12 and abs_histogram(h)[0][0] == 10


def _numpy_counts(h, values):
    """The histogram numpy computes over the observer's own edges (right edge exclusive, as the observer's)."""
    edges = h.edges()
    index = np.floor(np.asarray(values, np.float64) / h.width).astype(np.int64) - h.start
    assert index.min() >= 0 and index.max() < len(h.counts), "a value fell outside the observer's bins"
    counts = np.bincount(index, minlength=len(h.counts)).astype(np.float64)
    inner = np.histogram(values, bins=edges)[0]  # numpy's last bin is closed: compare all but the top edge
    top = np.isclose(values, edges[-1]).sum()
    np.testing.assert_array_equal(counts[:-1], inner[:-1])
    assert counts[-1] == inner[-1] - top
    return counts


@pytest.mark.parametrize("order", ["zeros first", "zeros last", "interleaved", "one batch"])
def test_zeros_count_at_zero_whatever_the_order(order):
    """1000 zeros and 5000 values in [0.2, 1] (an all-black first frame, a ReLU that is 0 on sample 1)."""
    rng = np.random.default_rng(3)
    zeros, values = np.zeros(1000, np.float32), rng.uniform(0.2, 1.0, 5000).astype(np.float32)
    everything = np.concatenate([zeros, values])
    if order == "zeros first":
        batches = [zeros, values]
    elif order == "zeros last":
        batches = [values, zeros]
    elif order == "interleaved":
        batches = [np.concatenate([z, v]) for z, v in zip(np.array_split(zeros, 5), np.array_split(values, 5))]
    else:
        batches = [everything]
    h = HistogramObserver(values_per_batch=None)
    for batch in batches:
        h.update(batch)
    np.testing.assert_array_equal(h.counts, _numpy_counts(h, everything))
    zero_bin = int(np.searchsorted(h.edges(), 0.0, side="right")) - 1
    assert h.edges()[zero_bin] == 0.0 and h.counts[zero_bin] == 1000
    # the same histogram, hence the same ranges, in every order
    reference = HistogramObserver(values_per_batch=None)
    reference.update(everything)
    assert (h.width, h.start) == (reference.width, reference.start)
    np.testing.assert_array_equal(h.counts, reference.counts)
    for method in (percentile, kl, mse):
        assert method(h, ASYMMETRIC, RangeSettings()) == method(reference, ASYMMETRIC, RangeSettings())
    # 1000 of 6000 values are exactly 0: the 0.1 percentile of the data is 0, not 0.8
    assert percentile(h, ASYMMETRIC, RangeSettings(max_percentile=0.9))[0] == 0.0


def test_zeros_first_with_a_far_range_does_not_index_outside_the_bins():
    """Zeros, then values far from 0 (start beyond the bin count): an IndexError before the fix."""
    h = HistogramObserver(max_bins=256, values_per_batch=None)
    h.update(np.zeros(10, np.float32))
    h.update(np.linspace(1000.0, 1001.0, 50, dtype=np.float32))
    assert h.total == 60 and h.counts[-h.start] == 10 and h.edges()[-h.start] == 0.0
    kl(h, ASYMMETRIC, RangeSettings(num_bin=129))


@pytest.mark.parametrize("seed", range(4))
def test_shards_merged_in_any_order_equal_one_pass(seed):
    rng = np.random.default_rng(seed)
    batches = [rng.normal(rng.uniform(-5, 5), rng.uniform(0.01, 20), rng.integers(1, 400)).astype(np.float32)
               for _ in range(12)]
    batches[rng.integers(12)] = np.zeros(30, np.float32)
    whole = HistogramObserver(max_bins=512, values_per_batch=None)
    for batch in batches:
        whole.update(batch)
    shards = [HistogramObserver(max_bins=512, values_per_batch=None) for _ in range(3)]
    for i, batch in enumerate(batches):
        shards[rng.integers(3)].update(batch)
    order = rng.permutation(3)
    merged = shards[order[0]]
    for i in order[1:]:
        merged.merge(shards[i])
    assert (merged.width, merged.start, merged.min, merged.max) == (whole.width, whole.start, whole.min, whole.max)
    np.testing.assert_array_equal(merged.counts, whole.counts)


def test_sampled_batches_keep_the_total_and_the_extremes():
    x = np.random.default_rng(1).normal(size=100_000).astype(np.float32)
    h = HistogramObserver(values_per_batch=1000)
    h.update(x)
    assert h.total == pytest.approx(x.size) and (h.min, h.max) == (x.min(), x.max())


# -- KL ---------------------------------------------------------------------------------

def reference_kl_bin(hist, levels, stride):
    """tpu-mlir's pseudocode (seed 004), written out with loops, candidates up to len(hist)."""
    best, best_i = math.inf, None
    for i in range(levels, len(hist) + 1, stride):
        p = [float(v) for v in hist[:i]]
        p[i - 1] += float(sum(hist[i:]))
        merged = [0.0] * levels
        nonzero = [0] * levels
        for j in range(i):
            merged[j * levels // i] += float(hist[j])
            nonzero[j * levels // i] += p[j] != 0
        q = [merged[j * levels // i] / nonzero[j * levels // i] if p[j] != 0 else 0.0 for j in range(i)]
        sp, sq = sum(p), sum(q)
        divergence = sum((pj / sp) * math.log((pj / sp) / max(qj / sq, 1e-12)) for pj, qj in zip(p, q) if pj > 0)
        if divergence < best:
            best, best_i = divergence, i
    return best_i


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_matches_the_written_out_reference(seed):
    rng = np.random.default_rng(seed)
    # a hand-made |x| histogram: a decaying bulk and a few far outliers
    hist = np.floor(1000 * np.exp(-np.arange(2048) / (150 + 100 * seed))) + (rng.random(2048) < 0.01)
    assert kl_threshold_bin(hist, 128, 128) == reference_kl_bin(hist, 128, 128)


def test_kl_threshold_formula_and_clipping_of_outliers():
    rng = np.random.default_rng(0)
    data = np.concatenate([rng.laplace(size=200_000), [60.0, -60.0]])  # two far outliers
    h = histogram(data)
    lo, hi = kl(h, SYMMETRIC, RangeSettings(num_bin=2048))
    assert lo == -hi and 3 < hi < 30  # clipped far inside |x|max = 60
    counts, width = abs_histogram(h)
    folded = resample(counts, width, 60.0, 2048)
    folded[0] = 0
    i = kl_threshold_bin(folded, 128, 128)
    assert hi == pytest.approx((i + 0.5) * 60.0 / 2048)


def test_kl_asymmetric_variant_uses_all_levels_for_non_negative_data():
    rng = np.random.default_rng(0)
    h = histogram(np.maximum(rng.normal(size=100_000), 0))
    lo, hi = kl(h, ASYMMETRIC, RangeSettings())
    assert lo == 0.0 and 0 < hi <= h.max


# -- percentile, MSE, ACIQ ------------------------------------------------------------------

def test_percentile_clips_the_requested_fraction():
    rng = np.random.default_rng(0)
    data = rng.normal(size=400_000)
    h = histogram(data)
    lo, hi = percentile(h, SYMMETRIC, RangeSettings(max_percentile=0.99))
    assert np.mean(np.abs(data) > hi) == pytest.approx(0.01, abs=0.0005)
    lo, hi = percentile(h, ASYMMETRIC, RangeSettings(max_percentile=0.99))
    assert np.mean((data < lo) | (data > hi)) == pytest.approx(0.01, abs=0.0005)
    relu = histogram(np.maximum(data, 0))
    lo, hi = percentile(relu, ASYMMETRIC, RangeSettings(max_percentile=0.99))
    assert lo == 0 and np.mean(np.maximum(data, 0) > hi) == pytest.approx(0.01, abs=0.0005)


def quantization_mse(data, lo, hi, scheme):
    q = compute_qparams(lo, hi, scheme)
    return float(np.mean((q.dequantize(q.quantize(data.astype(np.float32))) - data) ** 2))


@pytest.mark.parametrize("scheme", [SYMMETRIC, ASYMMETRIC])
def test_mse_beats_max_min_on_laplace_data(scheme):
    data = np.random.default_rng(0).laplace(size=400_000).astype(np.float32)
    h = histogram(data)
    chosen = mse(h, scheme, RangeSettings())
    assert chosen[1] < h.max
    # theory: rounding noise grows with the range squared; the optimum for b = 1 clips near 9.9, |x|max is ~13
    assert quantization_mse(data, *chosen, scheme) < 0.8 * quantization_mse(data, *max_min(h, scheme, RangeSettings()),
                                                                             scheme)


def test_aciq_closed_form():
    # Banner et al. tabulate the optimal clip for 8 bits: 9.89 b (Laplace), 3.92 sigma (Gaussian); 4 bits: 5.03 b, 2.55 s
    assert aciq_clip(1.0, 8, laplace=True, one_sided=False) == pytest.approx(9.89, abs=0.01)
    assert aciq_clip(1.0, 8, laplace=False, one_sided=False) == pytest.approx(3.92, abs=0.01)
    assert aciq_clip(1.0, 4, laplace=True, one_sided=False) == pytest.approx(5.03, abs=0.01)
    assert aciq_clip(2.0, 4, laplace=False, one_sided=False) == pytest.approx(2 * 2.55, abs=0.02)
    # the root of d/da [2 b^2 exp(-a/b) + a^2 / (3 4^M)] = 0, solved by hand with b = 1, M = 8
    a = aciq_clip(1.0, 8, laplace=True, one_sided=False)
    assert 2 * math.exp(-a) == pytest.approx(2 * a / (3 * 4**8), rel=1e-4)


def test_aciq_fits_the_distribution():
    rng = np.random.default_rng(0)
    laplace = histogram(rng.laplace(scale=2.0, size=400_000))
    assert aciq(laplace, SYMMETRIC, RangeSettings())[1] == pytest.approx(9.89 * 2.0, rel=0.03)
    gauss = histogram(rng.normal(scale=0.5, size=400_000))
    assert aciq(gauss, SYMMETRIC, RangeSettings())[1] == pytest.approx(3.92 * 0.5, rel=0.03)


def test_methods_never_widen_the_seen_range():
    data = np.random.default_rng(3).normal(size=10_000)
    h = histogram(data)
    for method in (max_min, percentile, kl, mse, aciq):
        for scheme in (SYMMETRIC, ASYMMETRIC):
            lo, hi = method(h, scheme, RangeSettings())
            assert h.min - 1e-6 <= lo and hi <= h.max + 1e-6 or scheme.symmetric and -lo == hi <= max(-h.min, h.max)
