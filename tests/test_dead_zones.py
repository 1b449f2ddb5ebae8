"""Activation ranges end where the readers stop telling values apart (HardSwish below -3, HardSigmoid, Relu, Clip,
SiLU below -10)."""

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import float_input, initializers, make_model, random_feeds, run, save
from onnx import helper

import lowbit
import lowbit.search.modelwise as modelwise
from bench.zoo import cosine
from lowbit.calibration.dead_zones import (
    SILU_LIVE_FROM,
    UNBOUNDED,
    clamped,
    live_interval,
    live_intervals,
    read_as_silu,
    restrict,
)
from lowbit.calibration.histogram import HistogramObserver
from lowbit.graph.loading import load_model


def _reader_graph(tmp_path, readers):
    """input -> Identity (t) -> each reader's op on t -> one output each; returns the loaded graph."""
    nodes = [helper.make_node("Identity", ["input"], ["t"], name="source")]
    inits, outputs = [], []
    for i, (op, attributes, extra) in enumerate(readers):
        inputs = ["t"]
        for j, value in enumerate(extra):
            name = f"c{i}_{j}"
            inits.append((name, np.asarray(value, np.float32)))
            inputs.append(name)
        nodes.append(helper.make_node(op, inputs, [f"y{i}"], name=f"reader{i}", **attributes))
        outputs.append(float_input(f"y{i}", [1, 4]))
    model = make_model(nodes, [float_input("input", [1, 4])], outputs, inits)
    return load_model(save(model, tmp_path / "readers.onnx"))[0].graph


@pytest.mark.parametrize("op, attributes, extra, expected", [
    ("HardSwish", {}, [], (-3.0, math.inf)),  # x * relu6(x + 3) / 6 is 0 for every x <= -3
    ("Relu", {}, [], (0.0, math.inf)),
    ("HardSigmoid", {}, [], (-2.5, 2.5)),  # alpha 0.2, beta 0.5: 0 below -0.5 / 0.2, 1 above 0.5 / 0.2
    ("HardSigmoid", {"alpha": 1 / 6}, [], (-3.0, 3.0)),  # PP-LCNet's and MobileNetV3's
    ("Clip", {}, [-1.0, 2.0], (-1.0, 2.0)),
    ("Clip", {}, [0.5], (0.5, math.inf)),  # no max
    ("Sigmoid", {}, [], UNBOUNDED),  # saturates, never constant
    ("Add", {}, [1.0], UNBOUNDED),
])
def test_each_reader_s_live_interval(tmp_path, op, attributes, extra, expected):
    graph = _reader_graph(tmp_path, [(op, attributes, extra)])
    reader = next(node for node in graph if node.name == "reader0")
    assert live_interval(reader, reader.inputs[0]) == pytest.approx(expected)


def test_a_tensor_is_bounded_only_when_every_reader_is(tmp_path):
    both = _reader_graph(tmp_path, [("HardSwish", {}, []), ("Clip", {}, [-5.0, 1.0])])
    assert live_intervals(both, ["t"]) == {"t": (-5.0, math.inf)}  # the union: Clip sees down to -5
    with_add = _reader_graph(tmp_path, [("HardSwish", {}, []), ("Add", {}, [1.0])])
    assert live_intervals(with_add, ["t"]) == {}
    # t read by Clip as its bound, not its input: the Clip's dead zone says nothing about t
    nodes = [helper.make_node("Identity", ["input"], ["t"], name="source"),
             helper.make_node("Clip", ["x", "t"], ["y"], name="clip")]
    model = make_model(nodes, [float_input("input", []), float_input("x", [4])], [float_input("y", [4])])
    graph = load_model(save(model, tmp_path / "bound.onnx"))[0].graph
    assert live_intervals(graph, ["t"]) == {}


def _silu_graph(tmp_path, mul_inputs=("t", "s"), extra_reader=False):
    """input -> Identity (t) -> Sigmoid (s) and Mul(*mul_inputs) -> output (and an Add reading t)."""
    nodes = [helper.make_node("Identity", ["input"], ["t"], name="source"),
             helper.make_node("Sigmoid", ["t"], ["s"], name="sigmoid"),
             helper.make_node("Mul", list(mul_inputs), ["y"], name="mul")]
    outputs = [float_input("y", [1, 4])]
    if extra_reader:
        nodes.append(helper.make_node("Add", ["t", "t"], ["z"], name="add"))
        outputs.append(float_input("z", [1, 4]))
    model = make_model(nodes, [float_input("input", [1, 4]), float_input("other", [1, 4])], outputs)
    return load_model(save(model, tmp_path / "silu.onnx"))[0].graph


def test_a_silu_input_is_live_from_minus_10(tmp_path):
    for order in (("t", "s"), ("s", "t")):
        graph = _silu_graph(tmp_path, order)
        assert read_as_silu(graph.node("source").outputs[0])
        assert live_intervals(graph, ["t"]) == {"t": (-10.0, math.inf)}
    # by hand: below -10, x * sigmoid(x) is nearer 0 than half a step of any uint8 grid holding SiLU's minimum
    x = np.linspace(-60.0, -SILU_LIVE_FROM, 1000)
    silu = x / (1 + np.exp(-x))
    minimum = -0.2785  # SiLU's least value, at x = -1.278
    assert np.abs(silu).max() < -minimum / 255 / 2
    assert live_intervals(_silu_graph(tmp_path, extra_reader=True), ["t"]) == {}  # a third reader sees all of t
    assert live_intervals(_silu_graph(tmp_path, ("t", "other")), ["t"]) == {}  # a Mul by something else


def test_restrict_clips_to_the_interval_and_keeps_a_range_that_would_vanish():
    ranges = {"a": (-150.0, 104.0), "b": (-9.0, -4.0), "c": (-1.0, 2.0), "free": (-7.0, 7.0)}
    intervals = {"a": (-3.0, math.inf), "b": (-3.0, math.inf), "c": (-3.0, 3.0)}
    assert restrict(ranges, intervals) == {"a": (-3.0, 104.0), "b": (-9.0, -4.0), "c": (-1.0, 2.0),
                                           "free": (-7.0, 7.0)}


def test_a_clamped_histogram_drops_the_counts_beyond_the_bounds():
    observer = HistogramObserver(max_bins=64)
    observer.update(np.array([-8.0, -5.0, -3.5, -1.0, 0.5, 2.0, 7.0], np.float32))
    width = observer.width
    view = clamped(observer, (-3.0, math.inf))
    assert (view.min, view.max) == (-3.0, 7.0)
    # -8, -5 and -3.5 lie in bins wholly below the bin of -3 (width 0.25 here): dropped; the others stay
    assert width == 0.25 and view.total == 4
    assert observer.total == 7 and observer.min == -8.0  # the observer itself is left as it was
    assert clamped(observer, (10.0, math.inf)) is observer  # nothing inside: as it is


def _conv_activation_model(activation: str = "HardSwish"):
    """input -> Conv (4 -> 8, 1x1) -> HardSwish or SiLU -> Conv (8 -> 4) -> output; channel 0 of the first conv
    reaches far below -3 (a tail the activation zeroes), as in PP-OCRv4 det's PP-LCNet blocks and YOLO's SiLUs."""
    rng = np.random.default_rng(7)
    w1 = rng.normal(size=(8, 4, 1, 1)).astype(np.float32)
    w1[0] *= 40.0
    b1 = np.zeros(8, np.float32)
    b1[0] = -60.0
    w2 = rng.normal(size=(4, 8, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1")]
    if activation == "HardSwish":
        nodes.append(helper.make_node("HardSwish", ["c1"], ["h"], name="hswish"))
    else:
        nodes += [helper.make_node("Sigmoid", ["c1"], ["s"], name="sigmoid"),
                  helper.make_node("Mul", ["c1", "s"], ["h"], name="silu")]
    nodes.append(helper.make_node("Conv", ["h", "w2"], ["output"], name="conv2"))
    return make_model(nodes, [float_input("input", [1, 4, 6, 6])], [float_input("output", [1, 4, 6, 6])],
                      [("w1", w1), ("b1", b1), ("w2", w2)])


def _quantize(tmp_path, name, feeds, activation="HardSwish"):
    src = save(_conv_activation_model(activation), tmp_path / "float.onnx")
    out = tmp_path / f"{name}.onnx"
    result = lowbit.quantize(src, out, data=feeds, progress=False, activation_quant_method="MAX_MIN",
                             weight_rounding="NEAREST", bias_correction=False)
    return src, out, result


@pytest.mark.parametrize("activation, live_from", [("HardSwish", -3.0), ("SiLU", -SILU_LIVE_FROM)])
def test_an_activation_input_is_quantized_from_its_live_bound(tmp_path, monkeypatch, activation, live_from):
    feeds = random_feeds(8, shape=(1, 4, 6, 6), seed=3)
    src, out, result = _quantize(tmp_path, "clipped", feeds, activation)
    assert "1 ranges clipped where their readers stop telling values apart" in result.summary()
    model = onnx.load(str(out))
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "c1")
    scale, zero_point = (float(initializers(out)[name]) for name in q.input[1:3])
    # by hand: the float conv output's maximum over the calibration samples, and the live bound below
    probe = _conv_activation_model(activation)
    probe.graph.output.append(float_input("c1", None))
    probe = save(probe, tmp_path / "probe.onnx")
    conv_outputs = [run(probe, feed)[1] for feed in feeds]
    top = max(float(c.max()) for c in conv_outputs)
    assert min(float(c.min()) for c in conv_outputs) < -20  # the tail the activation zeroes is there
    assert scale == pytest.approx((top - live_from) / 255, rel=1e-5)
    assert zero_point == round(-live_from / scale)
    held_out = random_feeds(8, shape=(1, 4, 6, 6), seed=4)
    clipped_error = np.mean([1 - cosine(run(src, f)[0], run(out, f)[0]) for f in held_out])

    monkeypatch.setattr(modelwise, "live_intervals", lambda graph, names: {})  # the tail in the grid again
    _, full, _ = _quantize(tmp_path, "full", feeds, activation)
    full_error = np.mean([1 - cosine(run(src, f)[0], run(full, f)[0]) for f in held_out])
    assert clipped_error < 0.5 * full_error


def test_an_affine_written_scale_first_is_folded_into_the_conv(tmp_path):
    """paddle2onnx writes PP-LCNet's learnable affine block as Mul(scale, conv) + offset: folded like conv * s + o."""
    from lowbit.graph.passes import prepare

    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv"),
             helper.make_node("Mul", ["scale", "c"], ["m"], name="affine_scale"),
             helper.make_node("Add", ["m", "offset"], ["a"], name="affine_offset"),
             helper.make_node("HardSwish", ["a"], ["output"], name="hswish")]
    model = make_model(nodes, [float_input("input", [1, 3, 5, 5])], [float_input("output", [1, 6, 5, 5])],
                       [("w", rng.normal(size=(6, 3, 1, 1)).astype(np.float32)),
                        ("b", rng.normal(size=6).astype(np.float32)),
                        ("scale", np.array([1.9], np.float32)), ("offset", np.array([0.8], np.float32))])
    src = save(model, tmp_path / "float.onnx")
    prepared = prepare(load_model(src)[0])
    assert [n.op_type for n in prepared.graph] == ["Conv", "HardSwish"]
    folded = tmp_path / "folded.onnx"
    ir.save(prepared, folded)
    feed = random_feeds(1, shape=(1, 3, 5, 5), seed=9)[0]
    np.testing.assert_allclose(run(folded, feed)[0], run(src, feed)[0], atol=1e-5)
