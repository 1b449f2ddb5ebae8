"""Channel orders that keep large int8 weights of the same sign out of one kernel pair (quantizers/pair_order.py)."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import float_input, make_model, save
from onnx import helper, numpy_helper

import lowbit
from lowbit.graph.loading import load_model
from lowbit.graph.passes import prepare
from lowbit.quantizers.pair_order import (
    CHANNEL_ORDER_KEY,
    channels_over,
    choose_order,
    excess_matrix,
    find_chains,
    order_channels,
)


def test_excess_is_counted_once_per_pair_over_128_and_the_order_pairs_large_weights_apart():
    rows = np.array([[100, 50, -100, 10],    # (0, 1): |150| - 128 = 22; 0 with 2 or 3 and 2 with anything: under
                     [0, 0, 100, 100]])      # (2, 3): two large weights, 72, counted once
    excess = excess_matrix(rows)
    expected = np.zeros((4, 4), np.int64)
    expected[0, 1] = expected[1, 0] = 22
    expected[2, 3] = expected[3, 2] = 72
    np.testing.assert_array_equal(excess, expected)
    # 2 and 3 carry the most excess (72 each): 2 goes first, with a free partner adding none (0 and 1 both
    # add 0; 0 has more excess elsewhere, 22 against 1's 22: the first of equals); then 3 with 1
    order = choose_order(excess)
    np.testing.assert_array_equal(order, [2, 0, 3, 1])
    integers = rows.reshape(2, 4, 1, 1)
    assert channels_over(integers) == 2  # (100, 50) in the first row, (100, 100) in the second
    assert channels_over(integers, order) == 0  # pairs (100, -100), (50, 10) and (100, 0), (100, 0)


def block_model(middle=("Clip",), second_reader=False):
    """1x1 expand (8 -> 16) -> Clip(0, 6) -> depthwise 3x3 -> Relu -> 1x1 project (16 -> 8). The project layer
    reads channels 0-7 with positive weights and 8-15 with negative ones, all of about the same size: stored as
    they are, every pair of neighbours has one sign and a sum near 2 x 127."""
    rng = np.random.default_rng(0)
    expand = rng.normal(size=(16, 8, 1, 1)).astype(np.float32) * 0.4
    expand_bias = rng.normal(size=16).astype(np.float32) * 0.1
    depthwise = rng.normal(size=(16, 1, 3, 3)).astype(np.float32) * 0.4
    depthwise_bias = rng.normal(size=16).astype(np.float32) * 0.1
    signs = np.where(np.arange(16) < 8, 1.0, -1.0)
    project = (rng.uniform(0.8, 1.0, size=(8, 16)) * signs).astype(np.float32).reshape(8, 16, 1, 1)
    initializers = [("we", expand), ("be", expand_bias), ("wd", depthwise), ("bd", depthwise_bias),
                    ("wp", project), ("lo", np.array(0.0, np.float32)), ("hi", np.array(6.0, np.float32))]
    if "Mul" in middle:
        initializers.append(("scale", np.linspace(0.5, 1.5, 16, dtype=np.float32).reshape(1, 16, 1, 1)))
    nodes = [helper.make_node("Conv", ["input", "we", "be"], ["e"], name="expand")]
    last = "e"
    for op in middle:
        inputs = {"Clip": [last, "lo", "hi"], "Mul": [last, "scale"], "ScalarMul": ["hi", last]}[op]
        op = "Mul" if op == "ScalarMul" else op
        nodes.append(helper.make_node(op, inputs, [f"{last}_{op}"], name=f"{op.lower()}_after_{last}"))
        last = f"{last}_{op}"
    nodes += [helper.make_node("Conv", [last, "wd", "bd"], ["d"], name="depthwise", group=16, pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["d"], ["r"], name="relu"),
              helper.make_node("Conv", ["r", "wp"], ["output"], name="project")]
    outputs = [float_input("output", [1, 8, 6, 6])]
    if second_reader:
        nodes.append(helper.make_node("ReduceMean", ["r"], ["mean"], name="mean", keepdims=1))
        outputs.append(float_input("mean", [1, 1, 1, 1]))
    return make_model(nodes, [float_input("input", [1, 8, 6, 6])], outputs, initializers)


def run(model, feeds):
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["output"], feed)[0] for feed in feeds])


def feeds(n, seed):
    rng = np.random.default_rng(seed)
    return [{"input": rng.normal(size=(1, 8, 6, 6)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("middle", [("Clip",), ("Clip", "ScalarMul")])
def test_the_reordered_block_computes_the_same_with_no_channel_over(tmp_path, middle):
    src = save(block_model(middle), tmp_path / "m.onnx")
    model = prepare(load_model(src)[0])
    chains = find_chains(model.graph)
    assert [(c.producer.name, [n.name for n in c.per_channel], c.consumer.name) for c in chains] == \
        [("expand", ["depthwise"], "project")]
    report = order_channels(model.graph, per_channel=True)
    assert (report.reordered, report.channels, report.over_before, report.over_after) == (1, 8, 8, 0)
    order = np.asarray(report.orders[0]["order"])
    assert sorted(order) == list(range(16)) and np.all((order[0::2] < 8) != (order[1::2] < 8))  # + with -
    held = feeds(4, 1)
    np.testing.assert_allclose(run(model, held), run(onnx.load(str(src)), held), rtol=1e-5, atol=1e-5)


def test_a_second_reader_or_a_per_channel_constant_ends_the_chain(tmp_path):
    for name, model in (("branch", block_model(second_reader=True)), ("scaled", block_model(middle=("Mul",)))):
        prepared = prepare(load_model(save(model, tmp_path / f"{name}.onnx"))[0])
        assert find_chains(prepared.graph) == [], name


def test_quantize_reorders_and_analyze_compares_with_the_original_float_model(tmp_path):
    src = save(block_model(), tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    result = lowbit.quantize(src, out, data=feeds(32, 0), weight_rounding="NEAREST", progress=False)
    assert "channel order: 1 of 1 layer chains" in result.summary()
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    orders = json.loads({p.key: p.value for p in model.metadata_props}[CHANNEL_ORDER_KEY])
    assert [(o["producer"], o["per_channel"], o["consumer"]) for o in orders] == [("expand", ["depthwise"],
                                                                                    "project")]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    stored = inits["wp_quantized"].reshape(8, 16).astype(np.int64)
    assert np.max(np.abs(stored[:, 0::2] + stored[:, 1::2])) <= 128
    assert np.max(np.abs(stored), axis=1).min() == 127  # no channel needed a wider grid
    held = feeds(8, 1)
    quantized, reference = run(model, held), run(onnx.load(str(src)), held)
    assert np.sum(quantized * reference) / np.linalg.norm(quantized) / np.linalg.norm(reference) > 0.999
    # tensor by tensor against the original float model: the expand and depthwise outputs are compared in the
    # quantized model's channel order (without it their cosines would be those of unrelated channels)
    analysis = lowbit.analyze(src, out, data=held, samples=8)
    cosines = {row.name: row.computed.cosine for row in analysis.tensors if row.producer}
    assert {"e", "d", "output"} <= set(cosines)
    assert min(cosines.values()) > 0.99


def test_analyze_against_another_float_model_is_a_clear_error(tmp_path):
    src = save(block_model(), tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    lowbit.quantize(src, out, data=feeds(16, 0), weight_rounding="NEAREST", progress=False)
    other = block_model()
    next(n for n in other.graph.node if n.name == "depthwise").name = "dw"
    with pytest.raises(lowbit.LowbitError, match="float model has no node depthwise: is it the model that was "
                                                 "quantized"):
        lowbit.analyze(save(other, tmp_path / "other.onnx"), out, data=feeds(4, 1), samples=4)
