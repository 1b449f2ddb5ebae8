"""Observers: running min/max per tensor and per channel, merging across workers."""

import numpy as np
import pytest

from lowbit.calibration.observers import MinMaxObserver


def test_minmax_per_tensor_over_batches():
    obs = MinMaxObserver()
    obs.update(np.array([[1.0, -2.0], [3.0, 0.5]]))
    obs.update(np.array([[7.0, -1.0]]))
    lo, hi = obs.range()
    assert (float(lo), float(hi)) == (-2.0, 7.0)
    assert obs.batches == 2


def test_minmax_per_channel():
    obs = MinMaxObserver(axis=1)
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)  # channel c holds 4c..4c+3 and 12+4c..15+4c
    obs.update(x)
    lo, hi = obs.range()
    assert lo.tolist() == [0, 4, 8]
    assert hi.tolist() == [15, 19, 23]


def test_merge_equals_one_observer_over_all_data():
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(4, 5)) for _ in range(6)]
    whole, a, b = MinMaxObserver(), MinMaxObserver(), MinMaxObserver()
    for i, batch in enumerate(batches):
        whole.update(batch)
        (a if i % 2 else b).update(batch)
    a.merge(b)
    assert [float(v) for v in a.range()] == [float(v) for v in whole.range()]
    assert a.batches == whole.batches


@pytest.mark.parametrize("first, second", [((-1000, -900), (900, 1000)), ((0, 10), (10000, 10010)), ((-5, 5), (-3000, 2))])
def test_histograms_whose_ranges_together_need_coarser_bins_merge_exactly(first, second):
    """Each range fits 16 bins at its own width; the two together only at a coarser one, which merge must reach
    for both sides (a worker's shard of small values merged with another's of large ones)."""
    from lowbit.calibration.histogram import HistogramObserver

    rng = np.random.default_rng(3)
    a_values, b_values = (rng.uniform(*bounds, size=64).astype(np.float32) for bounds in (first, second))
    whole, a, b = HistogramObserver(16, None), HistogramObserver(16, None), HistogramObserver(16, None)
    whole.update(a_values)
    whole.update(b_values)
    a.update(a_values)
    b.update(b_values)
    a.merge(b)
    assert (a.exponent, a.start) == (whole.exponent, whole.start)
    assert np.array_equal(a.counts, whole.counts) and a.counts.sum() == 128


def test_empty_observer_raises():
    with pytest.raises(ValueError):
        MinMaxObserver().range()



# -- every statistic merges, and saves as plain arrays -----------------------------------------

def _observers():
    """(factory, batches) per kind of statistic lowbit collects."""
    from lowbit.calibration.histogram import HistogramObserver
    from lowbit.calibration.layer_inputs import ConvGeometry, LayerInputObserver
    from lowbit.calibration.observers import (
        MeanObserver,
        OutputsObserver,
        ValueCountsObserver,
    )

    rng = np.random.default_rng(7)
    images = [rng.normal(size=(1, 4, 6, 6)).astype(np.float32) for _ in range(6)]
    rows = [rng.normal(size=(3, 5)).astype(np.float32) for _ in range(6)]
    return {
        "minmax": (lambda: MinMaxObserver(), images),
        "minmax per channel": (lambda: MinMaxObserver(axis=1), images),
        "mean per channel": (lambda: MeanObserver(axis=1), images),
        "histogram": (lambda: HistogramObserver(max_bins=256, values_per_batch=None),
                      [np.maximum(x, 0) * (i + 1) for i, x in enumerate(images)]),
        "conv input moments": (lambda: LayerInputObserver(ConvGeometry((3, 3), 2, (1, 1), (1, 1, 1, 1))), images),
        "conv input means": (lambda: LayerInputObserver(ConvGeometry((3, 3), 2, (2, 2), (1, 0, 1, 0)), (1,)),
                             images),
        "matrix input moments": (lambda: LayerInputObserver(), rows),
        "outputs": (lambda: OutputsObserver(), rows),
        "value counts": (lambda: ValueCountsObserver(), [np.round(x * 4) / 4 for x in images]),
    }


def _statistic(observer):
    """What each observer hands to the passes."""
    from lowbit.calibration.histogram import HistogramObserver
    from lowbit.calibration.layer_inputs import LayerInputObserver
    from lowbit.calibration.observers import (
        MeanObserver,
        OutputsObserver,
        ValueCountsObserver,
    )

    if isinstance(observer, ValueCountsObserver):
        return [observer.values, observer.counts]
    if isinstance(observer, HistogramObserver):
        return [observer.counts, np.array([observer.start, observer.exponent]), *observer.range()]
    if isinstance(observer, MeanObserver):
        return [observer.mean()]
    if isinstance(observer, LayerInputObserver):
        return [observer.mean()] + ([observer.covariance()] if 2 in observer.orders else [])
    if isinstance(observer, OutputsObserver):
        return [np.sort(np.concatenate([a.ravel() for a in observer.arrays]))]  # merged in any order: a multiset
    return list(observer.range())


@pytest.mark.parametrize("kind", list(_observers()))
@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_shards_merged_in_any_order_equal_one_pass(kind, order, tmp_path):
    make, batches = _observers()[kind]
    whole = make()
    for batch in batches:
        whole.update(batch)
    shards = [make() for _ in range(3)]
    for i, batch in enumerate(batches):
        shards[i % 3].update(batch)
    # each shard goes through a file, as a worker's state would: plain arrays, read back unpickled
    loaded = []
    for i in order:
        np.savez(tmp_path / f"shard{i}.npz", **shards[i].state())
        with np.load(tmp_path / f"shard{i}.npz", allow_pickle=False) as saved:
            loaded.append(type(shards[i]).from_state(dict(saved)))
    merged = loaded[0]
    for other in loaded[1:]:
        merged.merge(other)
    assert merged.batches == whole.batches
    exact = kind.startswith(("minmax", "histogram", "outputs", "value counts"))
    for got, want in zip(_statistic(merged), _statistic(whole)):
        if exact:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_metric_sums_save_and_merge():
    from lowbit.search.metrics import PairStats

    rng = np.random.default_rng(2)
    pairs = [(rng.normal(size=50), rng.normal(size=50)) for _ in range(4)]
    whole, a, b = PairStats(), PairStats(), PairStats()
    for i, (x, y) in enumerate(pairs):
        whole.update(x, y)
        (a if i % 2 else b).update(x, y)
    merged = PairStats.from_state(b.state())
    merged.merge(PairStats.from_state(a.state()))
    for field, value in whole.state().items():
        assert merged.state()[field] == pytest.approx(float(value), rel=1e-12)


def test_an_observer_says_when_it_saw_a_non_finite_value():
    from lowbit.calibration.histogram import HistogramObserver
    from lowbit.calibration.observers import MeanObserver

    for observer in (MinMaxObserver(), HistogramObserver(), MeanObserver()):
        observer.update(np.array([1.0, 2.0], np.float32))
        assert observer.finite()
        observer.update(np.array([1.0, np.inf], np.float32))
        assert not observer.finite()


def test_value_counts_count_each_distinct_value_until_there_are_too_many():
    from lowbit.calibration.observers import ValueCountsObserver

    observer = ValueCountsObserver()
    observer.update(np.array([[0.5, -1.0, 0.5]], np.float32))
    observer.update(np.array([2.0, 0.5], np.float32))
    assert observer.values.tolist() == [-1.0, 0.5, 2.0]
    assert observer.counts.tolist() == [1, 3, 1]
    observer.update(np.arange(ValueCountsObserver.MAX_DISTINCT, dtype=np.float32))  # now more than the limit
    assert observer.overflowed and observer.values is None
    observer.update(np.array([1.0], np.float32))  # stays given up
    other = ValueCountsObserver()
    other.update(np.array([3.0], np.float32))
    other.merge(observer)
    assert other.overflowed and other.values is None and other.batches == 5
