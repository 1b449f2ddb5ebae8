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


def test_empty_observer_raises():
    with pytest.raises(ValueError):
        MinMaxObserver().range()

