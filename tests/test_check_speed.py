"""speed_check: the saved model timed beside the float model, and a warning when int8 is no faster."""

from __future__ import annotations

import re
import warnings

import pytest
from conftest import conv_relu_pool_model, random_feeds, save

import lowbit
from lowbit.accuracy import latency
from lowbit.passes import check_speed


def _quantize(tmp_path, **settings):
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = lowbit.quantize(src, tmp_path / "q.onnx", data=random_feeds(8), progress=False, **settings)
    speed = [str(w.message) for w in caught if "no faster than the float model" in str(w.message)]
    return result.summary(), speed


@pytest.mark.real_latency
def test_the_summary_times_both_models_on_this_cpu(tmp_path, monkeypatch):
    timed = []

    def spy(float_path, quantized_path, feed, **kwargs):
        timed.append((float_path.name, quantized_path.name, {k: v.shape for k, v in feed.items()}, kwargs))
        return latency.latencies(float_path, quantized_path, feed, **kwargs)

    monkeypatch.setattr(check_speed, "latencies", spy)
    summary, _ = _quantize(tmp_path)
    assert timed == [("m.onnx", "q.onnx", {"input": (1, 3, 8, 8)}, {"budget_seconds": check_speed.BUDGET_SECONDS})]
    line = next(line for line in summary.splitlines() if "latency, ONNX Runtime CPU, one sample" in line)
    float_ms, quantized_ms = map(float, re.search(r"float ([0-9.]+) ms, quantized ([0-9.]+) ms", line).groups())
    assert 0 < float_ms < 1000 and 0 < quantized_ms < 1000
    assert re.search(r"\(\d+\.\d\dx float's speed\)$", line)


@pytest.mark.parametrize("measured, warned", [((1.0, 1.5), True), ((1.0, 1.0), True), ((1.5, 1.0), False)])
def test_a_quantized_model_no_faster_than_float_is_warned(tmp_path, monkeypatch, measured, warned):
    monkeypatch.setattr(check_speed, "latencies", lambda *args, **kwargs: measured)
    summary, speed = _quantize(tmp_path)
    assert bool(speed) == warned
    if warned:
        assert f"{measured[1]:.3g} ms against {measured[0]:.3g} ms" in speed[0] and "speed_check=false" in speed[0]
    assert f"float {measured[0]:.3g} ms, quantized {measured[1]:.3g} ms ({measured[0] / measured[1]:.2f}x" in summary


@pytest.mark.parametrize("settings", [{"speed_check": False}, {"target_device": "DSP"}, {"target_device": "NVGPU"}])
def test_no_timing_when_turned_off_or_for_another_target(tmp_path, monkeypatch, settings):
    def fail(*args, **kwargs):
        raise AssertionError("timed")

    monkeypatch.setattr(check_speed, "latencies", fail)
    summary, speed = _quantize(tmp_path, **settings)
    assert "latency" not in summary and not speed


def test_the_budget_cuts_the_runs_but_keeps_one_block_of_each(tmp_path, monkeypatch):
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    calls = []

    class Session:
        def __init__(self, *args, **kwargs):
            pass

        def run(self, *args):
            calls.append(1)

    monkeypatch.setattr(latency.ort, "InferenceSession", Session)
    latency.latencies(src, src, random_feeds(1)[0], runs=20, budget_seconds=0.0)
    assert len(calls) == 2 * (1 + latency.BLOCK)  # each model: one run not counted, then one block of timed runs


def test_a_timing_that_fails_is_a_warning_and_the_model_stays_written(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no such provider\ndetails")

    monkeypatch.setattr(check_speed, "latencies", broken)
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    expected = r"could not be timed side by side \(RuntimeError: no such provider\)$"
    with pytest.warns(lowbit.LowbitWarning, match=expected):
        result = lowbit.quantize(src, tmp_path / "q.onnx", data=random_feeds(8), progress=False)
    assert (tmp_path / "q.onnx").exists() and "latency" not in result.summary()


def test_the_precision_search_times_its_kept_model_once(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("timed twice")

    monkeypatch.setattr(check_speed, "latencies", fail)
    monkeypatch.setattr("lowbit.passes.search_precisions.latencies", lambda *args, **kwargs: (1.0, 1.5))
    summary, _ = _quantize(tmp_path, accuracy_target="cosine>=0.5")
    assert "kept the planned model" in summary and summary.count("latency, ONNX Runtime CPU") == 1
    # nothing was moved to float: int8 itself is what is no faster here, not the goal
    assert "int8 itself is no faster than float on this CPU" in summary
