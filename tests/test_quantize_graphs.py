"""Quantizing small hand-built graphs: placement of Q/DQ, integer weights and biases, targets, options."""

import warnings

import numpy as np
import onnx
import pytest
from conftest import (
    conv_relu_pool_model, float_input, initializers, make_model, producers, random_feeds, run, save,
)
from onnx import helper, numpy_helper

import lowbit
from bench.zoo import cosine


def quantize(tmp_path, model, feeds=None, **settings):
    """Quantize with MAX_MIN and round-to-nearest weights unless told otherwise: these tests check
    exact ranges, integers and placement (tests/test_gptq.py checks GPTQ's rounding)."""
    settings.setdefault("activation_quant_method", "MAX_MIN")
    settings.setdefault("weight_rounding", "NEAREST")
    path = save(model, tmp_path / "float.onnx")
    out = tmp_path / "int8.onnx"
    result = lowbit.quantize(path, out, data=feeds or random_feeds(8), progress=False, **settings)
    onnx.checker.check_model(str(out), full_check=True)
    return path, out, result


def dq_source(model, value_name):
    """(integer initializer, scale, zero point or None, axis) behind a DequantizeLinear output."""
    node = producers(model)[value_name]
    assert node.op_type == "DequantizeLinear"
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    axis = next((a.i for a in node.attribute if a.name == "axis"), None)
    zp = inits.get(node.input[2]) if len(node.input) > 2 else None
    return inits.get(node.input[0]), inits[node.input[1]], zp, axis


def test_cpu_placement_weights_and_bias(tmp_path):
    # each weight within half a step of its float value: without the pairs' bound (test_saturation.py)
    src, out, result = quantize(tmp_path, conv_relu_pool_model(), saturation_safe_weights=False)
    model = onnx.load(str(out))
    nodes = {n.name: n for n in model.graph.node}
    prod = producers(model)
    assert {d.domain for d in model.opset_import} <= {"", "ai.onnx"}
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    # graph input and output stay float; the output is computed by the last Conv, not dequantized
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert prod["output"].op_type == "Conv"
    # Conv -> Relu fused: the Conv output carries no Q/DQ, the Relu output does
    conv1 = nodes["conv1"]
    assert nodes["relu1"].input[0] == conv1.output[0] == "c1"
    assert prod[nodes["pool1"].input[0]].op_type == "DequantizeLinear"
    # weights: int8 per output channel; bias: int32 with scale = input scale x weight scale
    w, w_scale, w_zp, w_axis = dq_source(model, conv1.input[1])
    assert w.dtype == np.int8 and w_scale.shape == (8,) and w_axis == 0 and not w_zp.any()
    assert np.abs(w).max() == 127
    b, b_scale, _, _ = dq_source(model, conv1.input[2])
    x_q, x_scale, x_zp, _ = dq_source(model, conv1.input[0])
    assert x_zp.dtype == np.uint8
    assert b.dtype == np.int32
    np.testing.assert_allclose(b_scale, x_scale * w_scale, rtol=1e-6)
    float_w = initializers(src)["w1"]
    np.testing.assert_allclose(w * w_scale[:, None, None, None], float_w, atol=w_scale.max() / 2 + 1e-7)
    # MaxPool moves values only: its output shares the scale and zero point of its input
    _, pool_in_scale, pool_in_zp, _ = dq_source(model, nodes["pool1"].input[0])
    _, pool_out_scale, pool_out_zp, _ = dq_source(model, nodes["conv2"].input[0])
    assert pool_in_scale == pool_out_scale and pool_in_zp == pool_out_zp
    # the result reports it all
    assert {n.name for n in result.quantized_nodes} == {"conv1", "relu1", "pool1", "conv2"}
    assert next(n for n in result.quantized_nodes if n.name == "relu1").reason == "fused into conv1"
    assert result.float_nodes == []
    assert result.calibration_samples == 8
    feed = random_feeds(1, seed=99)[0]
    assert cosine(run(src, feed)[0], run(out, feed)[0]) > 0.99


def test_ranges_come_from_calibration(tmp_path):
    feeds = random_feeds(5)
    _, _, result = quantize(tmp_path, conv_relu_pool_model(), feeds)
    lo = min(float(f["input"].min()) for f in feeds)
    hi = max(float(f["input"].max()) for f in feeds)
    report = result.tensors["input"]
    assert (report.min, report.max) == pytest.approx((lo, hi))
    assert report.scale == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert report.dtype == "uint8"


def test_per_tensor_weights(tmp_path):
    _, out, _ = quantize(tmp_path, conv_relu_pool_model(), per_channel=False)
    model = onnx.load(str(out))
    conv1 = next(n for n in model.graph.node if n.name == "conv1")
    _, scale, _, axis = dq_source(model, conv1.input[1])
    assert scale.shape == () and axis is None


def test_nvgpu_symmetric_int8_inputs_only(tmp_path):
    _, out, _ = quantize(tmp_path, conv_relu_pool_model(), target_device="NVGPU")
    model = onnx.load(str(out))
    quantized = [n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert sorted(quantized) == ["input", "p1", "r1"]  # inputs of conv1, pool1, conv2
    for t in model.graph.initializer:
        if t.name.endswith("_zero_point"):
            zp = numpy_helper.to_array(t)
            assert zp.dtype == np.int8 and not zp.any()


def test_dsp_uint8_per_tensor_weights(tmp_path):
    _, out, _ = quantize(tmp_path, conv_relu_pool_model(), target_device="DSP")
    model = onnx.load(str(out))
    conv1 = next(n for n in model.graph.node if n.name == "conv1")
    w, scale, zp, axis = dq_source(model, conv1.input[1])
    assert w.dtype == np.uint8 and scale.shape == () and axis is None and zp is not None


def test_skip_quant_node_and_unknown_name_warning(tmp_path):
    with pytest.warns(lowbit.LowbitWarning, match="'conv3'.*closest node names: conv2, conv1"):
        _, out, result = quantize(tmp_path, conv_relu_pool_model(), skip_quant_node="conv2,conv3")
    model = onnx.load(str(out))
    conv2 = next(n for n in model.graph.node if n.name == "conv2")
    assert conv2.input[1] == "w2"  # the float weight, read directly
    reasons = {n.name: n.reason for n in result.float_nodes}
    assert reasons["conv2"] == "listed in skip_quant_node"
    # the MaxPool now feeds only a float op: int8 would round for nothing, so it stays float too
    assert reasons["pool1"].startswith("only float ops read its output")
    assert len(reasons) == 2


def test_min_quant_weight_thresholds(tmp_path):
    # conv2's weight has 32 elements and 4 channels, conv1's 216 and 8
    _, _, result = quantize(tmp_path, conv_relu_pool_model(), min_quant_weight_size=100)
    reasons = {n.name: n.reason for n in result.float_nodes}
    assert set(reasons) == {"conv2", "pool1"} and "min_quant_weight_size" in reasons["conv2"]
    _, _, result = quantize(tmp_path, conv_relu_pool_model(), min_quant_weight_channel=4)
    reasons = {n.name: n.reason for n in result.float_nodes}
    assert set(reasons) == {"conv2", "pool1"} and "min_quant_weight_channel" in reasons["conv2"]


def test_batchnorm_is_folded_before_quantization(tmp_path):
    rng = np.random.default_rng(3)
    c = 6
    inits = [("w", rng.normal(size=(c, 3, 3, 3)).astype(np.float32)),
             ("gamma", rng.uniform(0.5, 2, c).astype(np.float32)), ("beta", rng.normal(size=c).astype(np.float32)),
             ("mean", rng.normal(size=c).astype(np.float32)), ("var", rng.uniform(0.5, 2, c).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["output"], name="relu")]
    model = make_model(nodes, [float_input("input", [1, 3, 8, 8])], [float_input("output", [1, c, 8, 8])], inits)
    src, out, result = quantize(tmp_path, model)
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 1
    feed = random_feeds(1, seed=5)[0]
    assert cosine(run(src, feed)[0], run(out, feed)[0]) > 0.99
    # the folded Conv keeps the user's name, in the report and in the written graph
    assert {n.name for n in result.quantized_nodes} == {"conv", "relu"}
    assert "conv" in [n.name for n in onnx.load(str(out)).graph.node if n.op_type == "Conv"]

    # and skip_quant_node finds it (no "not a node of the model" warning), and it stays float
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, out, result = quantize(tmp_path, model, skip_quant_node="conv")
    assert not [w for w in caught if "not a node" in str(w.message)]
    assert {n.name: n.reason for n in result.float_nodes}["conv"] == "listed in skip_quant_node"
    conv = next(n for n in onnx.load(str(out)).graph.node if n.op_type == "Conv")
    assert producers(onnx.load(str(out))).get(conv.input[1]) is None  # a float weight, read directly


def _bias_add_model(op_type, added, bias=None):
    """op_type (ConvTranspose 4 -> 6 channels, or Conv 3 -> 6) then Add of ``added`` then BatchNormalization."""
    rng = np.random.default_rng(11)
    c = 6
    shape = (4, c, 2, 2) if op_type == "ConvTranspose" else (c, 4, 3, 3)
    attrs = {"strides": [2, 2]} if op_type == "ConvTranspose" else {"pads": [1, 1, 1, 1]}
    inits = [("w", rng.normal(size=shape).astype(np.float32)), ("added", added),
             ("gamma", rng.uniform(0.5, 2, c).astype(np.float32)), ("beta", rng.normal(size=c).astype(np.float32)),
             ("mean", rng.normal(size=c).astype(np.float32)), ("var", rng.uniform(0.5, 2, c).astype(np.float32))]
    inputs = ["input", "w"]
    if bias is not None:
        inits.append(("b", bias))
        inputs.append("b")
    side = 16 if op_type == "ConvTranspose" else 8
    nodes = [helper.make_node(op_type, inputs, ["c"], name="up", **attrs),
             helper.make_node("Add", ["c", "added"], ["a"], name="bias"),
             helper.make_node("BatchNormalization", ["a", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["output"], name="relu")]
    return make_model(nodes, [float_input("input", [1, 4, 8, 8])], [float_input("output", [1, c, side, side])], inits)


@pytest.mark.parametrize("op_type, added, bias", [
    ("ConvTranspose", np.arange(6, dtype=np.float32).reshape(1, 6, 1, 1) - 2.5, None),  # paddle2onnx's form
    ("ConvTranspose", np.array([0.75], np.float32), None),  # one number
    ("Conv", np.arange(6, dtype=np.float32).reshape(6, 1, 1) / 4, np.full(6, -0.5, np.float32)),  # with a bias
])
def test_a_bias_added_apart_is_folded_and_the_batchnorm_after_it(tmp_path, op_type, added, bias):
    """Conv / ConvTranspose then Add of one value per output channel (or one number) then BatchNormalization:
    one op with a bias, the same outputs (paddle2onnx writes PP-OCR's ConvTranspose biases this way)."""
    import onnx_ir as ir

    from lowbit.graph.loading import load_model
    from lowbit.graph.passes import prepare
    from lowbit.graph.query import constant_array

    model = _bias_add_model(op_type, added, bias)
    src = save(model, tmp_path / "float.onnx")
    prepared = prepare(load_model(src)[0])
    nodes = list(prepared.graph)
    assert [n.op_type for n in nodes] == [op_type, "Relu"] and nodes[0].name == "up"
    # the bias before the BatchNormalization: the old bias plus the added values, by hand
    gamma, beta, mean, var = (numpy_helper.to_array(t) for t in model.graph.initializer[2:6])
    pre_bn = (0 if bias is None else bias) + np.broadcast_to(added.reshape(-1), (6,))
    expected_bias = (pre_bn - mean) * gamma / np.sqrt(var + 1e-5) + beta
    np.testing.assert_allclose(constant_array(nodes[0].inputs[2]), expected_bias, rtol=1e-5, atol=1e-5)
    folded = tmp_path / "folded.onnx"
    ir.save(prepared, folded)
    feed = random_feeds(1, seed=6, shape=(1, 4, 8, 8))[0]
    np.testing.assert_allclose(run(folded, feed)[0], run(src, feed)[0], atol=1e-5)


@pytest.mark.parametrize("added", [
    np.ones((1, 6, 16, 16), np.float32),  # one value per position: not a bias
    np.ones((2, 6, 1, 1), np.float32),  # a batch of 2: the Add broadcasts the output
])
def test_an_add_that_is_not_a_bias_stays(tmp_path, added):
    from lowbit.graph.loading import load_model
    from lowbit.graph.passes import prepare

    prepared = prepare(load_model(save(_bias_add_model("ConvTranspose", added), tmp_path / "float.onnx"))[0])
    assert [n.op_type for n in prepared.graph] == ["ConvTranspose", "Add", "BatchNormalization", "Relu"]


def test_weights_in_constant_nodes_are_quantized(tmp_path):
    rng = np.random.default_rng(4)
    w = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
             helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["output"], name="relu")]
    model = make_model(nodes, [float_input("input", [1, 3, 8, 8])], [float_input("output", [1, 4, 8, 8])])
    _, out, _ = quantize(tmp_path, model)
    int8 = [list(t.dims) for t in onnx.load(str(out)).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert sorted(int8) == [[4], [4, 3, 1, 1]]  # the weight and its per-channel zero points


def test_gemm_matmul_add_concat(tmp_path):
    rng = np.random.default_rng(6)
    inits = [("wg", rng.normal(size=(5, 4)).astype(np.float32)),  # Gemm transB=1: [N, K]
             ("bg", rng.normal(size=5).astype(np.float32)),
             ("wm", rng.normal(size=(5, 3)).astype(np.float32)),  # MatMul [K, N]
             ("half", np.array(0.5, np.float32))]
    nodes = [helper.make_node("Gemm", ["input", "wg", "bg"], ["g"], name="gemm", transB=1),
             helper.make_node("MatMul", ["g", "wm"], ["m"], name="matmul"),
             helper.make_node("Mul", ["m", "half"], ["h"], name="mul"),
             helper.make_node("Transpose", ["h"], ["h_t"], name="transpose"),
             helper.make_node("MatMul", ["h", "h_t"], ["mm"], name="act_matmul"),
             helper.make_node("Concat", ["mm", "mm"], ["output"], name="concat", axis=1)]
    model = make_model(nodes, [float_input("input", [2, 4])], [float_input("output", [2, 4])], inits)
    feeds = [{"input": rng.normal(size=(2, 4)).astype(np.float32)} for _ in range(8)]
    src, out, result = quantize(tmp_path, model, feeds)
    q = onnx.load(str(out))
    nodes_by_name = {n.name: n for n in q.graph.node}
    _, _, _, axis = dq_source(q, nodes_by_name["gemm"].input[1])
    assert axis == 0
    w, scale, _, axis = dq_source(q, nodes_by_name["matmul"].input[1])
    assert w.dtype == np.int8 and axis == 1 and scale.shape == (3,)
    act = nodes_by_name["act_matmul"]
    assert all(producers(q)[i].op_type == "DequantizeLinear" for i in act.input)
    # the Concat produces the graph output, which stays float: int8 there would only round
    assert [(n.name, n.reason.split(",")[0]) for n in result.float_nodes] == [("concat", "only float ops read its output")]
    feed = {"input": rng.normal(size=(2, 4)).astype(np.float32)}
    assert cosine(run(src, feed)[0], run(out, feed)[0]) > 0.98


def test_in_memory_feeds_and_calibrate_size(tmp_path):
    path = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    consumed = []

    def stream():
        for i, feed in enumerate(random_feeds(50)):
            consumed.append(i)
            yield feed

    with pytest.warns(lowbit.LowbitWarning, match="bias_correction was skipped"):
        result = lowbit.quantize(path, tmp_path / "q.onnx", data=stream(), calibrate_size=7, progress=False)
    assert result.calibration_samples == 7 and len(consumed) == 7


def test_external_data_model(tmp_path):
    model = conv_relu_pool_model()
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save(model, str(folder / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    out = tmp_path / "q.onnx"
    result = lowbit.quantize(folder / "m.onnx", out, data=random_feeds(4), progress=False)
    assert result.float_bytes == (folder / "m.onnx").stat().st_size + (folder / "m.data").stat().st_size
    feed = random_feeds(1, seed=8)[0]
    assert cosine(run(folder / "m.onnx", feed)[0], run(out, feed)[0]) > 0.99


def test_external_data_escaping_the_folder_is_refused(tmp_path):
    model = conv_relu_pool_model()
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save(model, str(folder / "m.onnx"), save_as_external_data=True, location="w.data", size_threshold=0)
    proto = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../w.data"
    (folder / "w.data").rename(tmp_path / "w.data")
    onnx.save(proto, str(folder / "m.onnx"))
    with pytest.raises(lowbit.LowbitError, match="outside the model's folder"):
        lowbit.quantize(folder / "m.onnx", tmp_path / "q.onnx", data=random_feeds(2), progress=False)
    assert not (tmp_path / "q.onnx").exists()


def test_old_opset_is_upgraded(tmp_path):
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["input", "w"], ["output"], name="conv")]
    model = make_model(nodes, [float_input("input", [1, 3, 8, 8])], [float_input("output", [1, 4, 8, 8])],
                       [("w", rng.normal(size=(4, 3, 1, 1)).astype(np.float32))], opset=11)
    _, out, _ = quantize(tmp_path, model)
    assert onnx.load(str(out)).opset_import[0].version >= 14


def test_a_skipped_conv_stays_float_in_onnx_runtime(tmp_path):
    """A float Conv must not read a DequantizeLinear: ONNX Runtime would quantize its weight per tensor itself."""
    from onnx import helper

    from conftest import float_input, make_model

    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(8, 3, 3, 3)).astype(np.float32) * 0.3
    # depthwise weights whose channels differ by 1000x: per-tensor int8 rounding zeroes the small ones
    w2 = (rng.normal(size=(8, 1, 3, 3)) * np.logspace(-3, 0, 8)[:, None, None, None]).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c1", "w2"], ["output"], name="depthwise", group=8, pads=[1, 1, 1, 1])]
    model = make_model(nodes, [float_input("input", ["N", 3, 8, 8])], [float_input("output", ["N", 8, 8, 8])],
                       [("w1", w1), ("w2", w2)])
    src, out, result = quantize(tmp_path, model, skip_quant_node="depthwise", bias_correction=False)
    assert [n.name for n in result.float_nodes] == ["depthwise"]
    graph = onnx.load(str(out)).graph
    producer = {o: n for n in graph.node for o in n.output}
    depthwise = next(n for n in graph.node if n.name == "depthwise")
    assert depthwise.input[0] not in producer or producer[depthwise.input[0]].op_type != "DequantizeLinear"
    feed = random_feeds(1, seed=5)[0]
    reference, got = run(src, feed)[0], run(out, feed)[0]
    for channel in range(8):  # every channel survives, the smallest included
        assert cosine(reference[:, channel], got[:, channel]) > 0.99
