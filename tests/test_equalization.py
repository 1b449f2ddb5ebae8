"""Cross-layer equalization: scales computed by hand, the float model's outputs unchanged, the pairs it
leaves alone, and per-tensor quantization that gains from it (a small graph and EfficientNet-Lite0)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from bench import zoo
from lowbit.recovery.equalization import EQUALIZATION_KEY, equalize, find_pairs


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _model(nodes, initializers, inputs, output, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, [output], [numpy_helper.from_array(a, n) for n, a in initializers])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _equalized(model: onnx.ModelProto):
    ir_model = ir.serde.deserialize_model(model)
    report = equalize(ir_model.graph)
    return ir.serde.serialize_model(ir_model), report


def test_two_matmuls_through_relu_by_hand():
    # first layer: output channels with ranges 4 and 1; second layer: input channels with ranges 1 and 4
    w1 = np.array([[4.0, 1.0], [-2.0, 0.5]], np.float32)  # (inputs, outputs): column j is output channel j
    b1 = np.array([0.4, -0.1], np.float32)
    w2 = np.array([[1.0, -0.5], [4.0, 2.0]], np.float32)  # row i reads channel i
    model = _model([helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                    helper.make_node("MatMul", ["r", "w2"], ["y"])],
                   [("w1", w1), ("b1", b1), ("w2", w2)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2])],
                   helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2]))
    equalized, report = _equalized(model)
    weights = {t.name: numpy_helper.to_array(t) for t in equalized.graph.initializer}
    # s = sqrt(r1 / r2) = sqrt(4 / 1), sqrt(1 / 4) = 2, 0.5: channel 0 of the first layer halves, channel 1 doubles
    np.testing.assert_allclose(weights["w1"], [[2.0, 2.0], [-1.0, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(weights["b1"], [0.2, -0.2], rtol=1e-6)
    np.testing.assert_allclose(weights["w2"], [[2.0, -1.0], [2.0, 1.0]], rtol=1e-6)
    assert report.pairs == 1 and report.channels == 2 and report.rounds == 2  # the second round changes nothing
    x = np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32)
    np.testing.assert_allclose(_session(equalized).run(None, {"x": x})[0], _session(model).run(None, {"x": x})[0],
                               rtol=1e-6, atol=1e-6)


W1 = np.array([[4.0, 1.0], [-2.0, 0.5]], np.float32)  # output channel ranges 4 and 1
W2 = np.array([[1.0, -0.5], [4.0, 2.0]], np.float32)  # input channel ranges 1 and 4


def _matmuls_through_clip(high: float) -> onnx.ModelProto:
    """x @ W1 -> Clip(0, high) -> @ W2, the Clip named "relu6"."""
    return _model([helper.make_node("MatMul", ["x", "w1"], ["h"]),
                   helper.make_node("Clip", ["h", "lo", "hi"], ["r"], name="relu6"),
                   helper.make_node("MatMul", ["r", "w2"], ["y"])],
                  [("w1", W1), ("w2", W2), ("lo", np.array(0.0, np.float32)), ("hi", np.array(high, np.float32))],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2])],
                  helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2]))


def test_behind_a_clip_the_bounds_weigh_on_the_first_side_by_hand():
    # the same ranges as above (r1 = 4, 1; r2 = 1, 4), through Clip(0, 6): the first layer's channel i and its
    # bound 6 / S_i both shrink with the scale S_i, so the first side's range is their geometric mean, each
    # relative to its largest. With S = (a, b), b < a, the settled scales satisfy r2_i S_i = that mean:
    #   channel 0: a   = (4 / a) sqrt(1 * (6 / a) / (6 / b))       -> a^5 = 16 b
    #   channel 1: 4 b = (4 / a) sqrt(((1 / b) / (4 / a)) * 1)     -> a b^3 = 1 / 4
    # so a^16 = 1024: a = 2^0.625, b = a^5 / 16 = 2^-0.875 (weights alone would give 2 and 0.5)
    model = _matmuls_through_clip(6.0)
    equalized, report = _equalized(model)
    weights = {t.name: numpy_helper.to_array(t) for t in equalized.graph.initializer}
    scale = np.array([2 ** 0.625, 2 ** -0.875])
    np.testing.assert_allclose(weights["w1"], W1 / scale, rtol=1e-3)
    np.testing.assert_allclose(weights["w2"], W2 * scale[:, None], rtol=1e-3)
    np.testing.assert_allclose(weights["relu6_bound"], 6.0 / scale, rtol=1e-3)  # Clip -> Relu + Min(6 / S_i)
    assert report.clips_rewritten == 1
    x = np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32) * 4  # some outputs above 6
    np.testing.assert_allclose(_session(equalized).run(None, {"x": x})[0], _session(model).run(None, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


def test_a_clip_to_zero_falls_back_to_the_weights():
    # Clip(0, 0) writes zeros: no bound to weigh (the geometric mean would divide by a zero bound)
    equalized, _ = _equalized(_matmuls_through_clip(0.0))
    weights = {t.name: numpy_helper.to_array(t) for t in equalized.graph.initializer}
    np.testing.assert_allclose(weights["w1"], [[2.0, 2.0], [-1.0, 1.0]], rtol=1e-6)  # s = 2, 0.5 as without a Clip


def _block_model(rng) -> onnx.ModelProto:
    """A MobileNet-like chain with channels of very different ranges: 1x1 conv -> ReLU6 -> depthwise 3x3 ->
    PRelu -> grouped 1x1 (2 groups) -> LeakyRelu -> 1x1 conv -> Clip(0, 4) -> global pool -> Gemm."""
    def conv_weight(out, inp, k):
        w = rng.normal(size=(out, inp, k, k)).astype(np.float32)
        return w * np.exp(rng.uniform(-3, 2, size=(out, 1, 1, 1))).astype(np.float32)

    init = [("w1", conv_weight(8, 3, 1)), ("b1", rng.normal(size=8).astype(np.float32)),
            ("w2", conv_weight(8, 1, 3)), ("b2", rng.normal(size=8).astype(np.float32)),
            ("slope", np.full((8, 1, 1), 0.1, np.float32)),
            ("w3", conv_weight(8, 4, 1)), ("b3", rng.normal(size=8).astype(np.float32)),
            ("w4", conv_weight(6, 8, 1)),
            ("lo", np.array(0.0, np.float32)), ("hi6", np.array(6.0, np.float32)), ("hi4", np.array(4.0, np.float32)),
            ("wf", rng.normal(size=(5, 6)).astype(np.float32)), ("bf", rng.normal(size=5).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="expand"),
             helper.make_node("Clip", ["c1", "lo", "hi6"], ["a1"], name="relu6"),
             helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("PRelu", ["c2", "slope"], ["a2"], name="prelu"),
             helper.make_node("Conv", ["a2", "w3", "b3"], ["c3"], name="grouped", group=2),
             helper.make_node("LeakyRelu", ["c3"], ["a3"], name="leaky", alpha=0.2),
             helper.make_node("Conv", ["a3", "w4"], ["c4"], name="project"),
             helper.make_node("Clip", ["c4", "lo", "hi4"], ["a4"], name="clip4"),
             helper.make_node("GlobalAveragePool", ["a4"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    return _model(nodes, init, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                  helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5]))


def test_a_chain_through_clips_prelu_and_groups_computes_the_same():
    rng = np.random.default_rng(1)
    model = _block_model(rng)
    equalized, report = _equalized(model)
    onnx.checker.check_model(equalized, full_check=True)
    assert report.pairs == 3  # expand-depthwise, depthwise-grouped, grouped-project; Clip(0, 4) ends at a pool
    assert report.clips_rewritten == 1 and report.grid_share_after > report.grid_share_before
    ops = [n.op_type for n in equalized.graph.node]
    assert ops[:3] == ["Conv", "Relu", "Min"] and ops.count("Clip") == 1  # the last Clip had nothing to scale
    x = rng.normal(size=(4, 3, 8, 8)).astype(np.float32) * 3  # large enough that ReLU6 clips
    before, after = _session(model).run(None, {"x": x})[0], _session(equalized).run(None, {"x": x})[0]
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()
    c1 = onnx.shape_inference.infer_shapes(model)
    assert any(v.name == "c1" for v in c1.graph.value_info)
    # the clip really clips on these inputs (otherwise the per-channel bound would go untested)
    probe = onnx.helper.make_tensor_value_info("c1", TensorProto.FLOAT, None)
    model.graph.output.append(probe)
    assert _session(model).run(["c1"], {"x": x})[0].max() > 6


def test_pairs_it_leaves_alone():
    rng = np.random.default_rng(2)
    w = {f"w{i}": rng.normal(size=(4, 4, 1, 1)).astype(np.float32) for i in range(1, 5)}
    init = [*w.items(), ("lo", np.array(-1.0, np.float32)), ("hi", np.array(1.0, np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="a"),
             helper.make_node("Conv", ["c1", "w2"], ["c2"], name="b"),  # c1 read twice: a residual
             helper.make_node("Add", ["c1", "c2"], ["s"]),
             helper.make_node("Conv", ["s", "w3"], ["c3"], name="c"),
             helper.make_node("Clip", ["c3", "lo", "hi"], ["a3"]),  # lower bound -1: not exact per channel
             helper.make_node("Conv", ["a3", "w4"], ["y"], name="d")]
    model = _model(nodes, init, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])],
                   helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2]))
    skipped = {}
    pairs = find_pairs(ir.serde.deserialize_model(model).graph, skipped)
    assert [(p.first.name, p.second.name) for p in pairs] == []
    assert skipped == {"Clip with a lower bound other than 0": 1}
    equalized, report = _equalized(model)
    assert report.pairs == 0
    assert [numpy_helper.to_array(t).tobytes() for t in equalized.graph.initializer] == \
        [numpy_helper.to_array(t).tobytes() for t in model.graph.initializer]


def _per_tensor_error(tmp_path, model, x, equalize_layers):
    src, out = tmp_path / "m.onnx", tmp_path / f"q{equalize_layers}.onnx"
    onnx.save(model, src)
    feeds = [{"x": x[i:i + 1]} for i in range(len(x))]
    result = lowbit.quantize(src, out, data=feeds, progress=False, target_device="DSP",
                             cross_layer_equalization=equalize_layers)
    onnx.checker.check_model(str(out), full_check=True)
    quantized = onnx.load(str(out))
    reference, got = _session(model).run(None, {"x": x})[0], _session(quantized).run(None, {"x": x})[0]
    return float(np.mean((reference - got) ** 2) / np.mean(reference ** 2)), result, quantized


def test_per_tensor_quantization_gains_and_the_clip_fuses(tmp_path):
    rng = np.random.default_rng(3)
    model = _block_model(rng)
    x = rng.normal(size=(64, 3, 8, 8)).astype(np.float32)
    plain, _, _ = _per_tensor_error(tmp_path, model, x, False)
    equalized, result, quantized = _per_tensor_error(tmp_path, model, x, True)
    assert equalized < plain / 3
    assert any("cross-layer equalization: 3 layer pairs" in line for line in result.summary().splitlines())
    # Relu and Min are fused into the Conv before them: one Q/DQ pair after the Min, none between
    producer = {o: n for n in quantized.graph.node for o in n.output}
    minimum = next(n for n in quantized.graph.node if n.op_type == "Min")
    assert producer[minimum.input[0]].op_type == "Relu" and producer[producer[minimum.input[0]].input[0]].op_type \
        == "Conv"
    readers = [n.op_type for n in quantized.graph.node if minimum.output[0] in n.input]
    assert readers == ["QuantizeLinear"]


def test_weight_only_with_equalization_keeps_the_model(tmp_path):
    rng = np.random.default_rng(4)
    model = _block_model(rng)
    src, out = tmp_path / "m.onnx", tmp_path / "w.onnx"
    onnx.save(model, src)
    result = lowbit.quantize(src, out, quant_type="WEIGHT_QUANT", bit_num=8, cross_layer_equalization=True,
                             min_quant_weight_channel=0, progress=False)
    assert len(result.quantized_nodes) == 5
    x = rng.normal(size=(8, 3, 8, 8)).astype(np.float32)
    got = _session(onnx.load(str(out))).run(None, {"x": x})[0]
    want = _session(model).run(None, {"x": x})[0]
    assert zoo.cosine(got, want) > 0.999
    assert any("cross-layer equalization" in line for line in result.summary().splitlines())


def test_analyze_equalizes_the_original_float_model_as_quantize_did(tmp_path):
    rng = np.random.default_rng(6)
    model = _block_model(rng)
    x = rng.normal(size=(16, 3, 8, 8)).astype(np.float32)
    _, _, quantized = _per_tensor_error(tmp_path, model, x, True)
    written = json.loads({p.key: p.value for p in quantized.metadata_props}[EQUALIZATION_KEY])
    assert written["pairs"] == 3 and written["channels"] > 0 and written["clips_rewritten"] == 1
    held = [{"x": x[i:i + 1]} for i in range(8)]
    analysis = lowbit.analyze(tmp_path / "m.onnx", tmp_path / "qTrue.onnx", data=held, samples=8)
    # the switched model mixes the float model's constants with the quantized model's: on the unequalized float
    # model it computed nonsense (1 - cosine 0.8 on EfficientNet-Lite2 where the quantized model's was 0.004)
    assert analysis.simulated_error == pytest.approx(analysis.quantized_error, rel=0.2, abs=1e-4)
    cosines = {row.name: row.computed.cosine for row in analysis.tensors if row.producer}
    assert {"c2", "y"} <= set(cosines) and min(cosines.values()) > 0.99  # rescaled tensors compared as rescaled
    other = onnx.ModelProto()
    other.CopyFrom(model)
    w1 = next(t for t in other.graph.initializer if t.name == "w1")
    w1.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w1)[::-1].copy(), "w1"))  # its channel ranges moved
    onnx.save(other, tmp_path / "other.onnx")
    with pytest.raises(lowbit.LowbitError, match="written with cross-layer equalization"):
        lowbit.analyze(tmp_path / "other.onnx", tmp_path / "qTrue.onnx", data=held, samples=8)
    for edited in ("{not json", "[1, 2]"):
        for entry in quantized.metadata_props:
            if entry.key == EQUALIZATION_KEY:
                entry.value = edited
        onnx.save(quantized, tmp_path / "edited.onnx")
        with pytest.raises(lowbit.LowbitError, match=f"its metadata {EQUALIZATION_KEY} is not the JSON lowbit writes"):
            lowbit.analyze(tmp_path / "m.onnx", tmp_path / "edited.onnx", data=held, samples=8)


@pytest.fixture(scope="module")
def photos():
    images = zoo.skimage_photos()
    calibration = ["astronaut", "coffee", "ihc", "motorcycle_left"]
    calib = [{"input": zoo.efficientnet_input(c)} for n in calibration for c in zoo.crops(images[n], 8, seed=0)]
    held = [zoo.efficientnet_input(c) for n in sorted(set(images) - set(calibration))
            for c in zoo.crops(images[n], 8, seed=1)]
    return calib, np.concatenate(held)


def test_efficientnet_lite0_per_tensor_gains_from_equalization(tmp_path, photos):
    calib, held = photos
    src = zoo.efficientnet_lite0()
    reference = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"input": held})[0]
    errors = {}
    for equalize_layers in (False, True):
        out = tmp_path / f"dsp{equalize_layers}.onnx"
        lowbit.quantize(src, out, data=calib, progress=False, target_device="DSP",
                        cross_layer_equalization=equalize_layers, weight_rounding="NEAREST")
        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": held})[0]
        errors[equalize_layers] = 1 - np.mean([zoo.cosine(a, b) for a, b in zip(reference, got)])
    # measured on these 40 crops (per-tensor weights rounded to nearest, biases corrected): 1 - cosine 0.062
    # without, 0.019 with (without bias correction 0.200 and 0.065; 0.110 with the weights alone equalized)
    assert errors[True] < 0.6 * errors[False]


def test_a_calibration_table_with_equalization_is_explained(tmp_path):
    rng = np.random.default_rng(5)
    model = _block_model(rng)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    feeds = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    with pytest.warns(lowbit.LowbitWarning, match="ranges are those of the equalized model"):
        lowbit.quantize(src, tmp_path / "q.onnx", data=feeds, progress=False, cross_layer_equalization=True,
                        calibration_table_out=str(tmp_path / "t.json"))
    lowbit.quantize(src, tmp_path / "q2.onnx", progress=False, cross_layer_equalization=True,  # says it was made so
                    calibration_table=str(tmp_path / "t.json"), weight_rounding="NEAREST", bias_correction=False)
    assert json.loads((tmp_path / "t.json").read_text())["cross_layer_equalization"] is True
    with pytest.raises(lowbit.LowbitError, match="measured with cross_layer_equalization and this job runs without"):
        lowbit.quantize(src, tmp_path / "q3.onnx", progress=False, calibration_table=str(tmp_path / "t.json"))
    assert not (tmp_path / "q3.onnx").exists()
    lowbit.quantize(src, tmp_path / "t.onnx", data=feeds, progress=False, calibration_table_out=str(tmp_path / "t.txt"),
                    table_format="tpu-mlir")
    with pytest.warns(lowbit.LowbitWarning, match="does not say whether its ranges were measured with it"):
        lowbit.quantize(src, tmp_path / "q4.onnx", progress=False, cross_layer_equalization=True,
                        calibration_table=str(tmp_path / "t.txt"), weight_rounding="NEAREST", bias_correction=False)
    # the table written from the equalized model gives the same ranges when read back with equalization
    first = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    second = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "q2.onnx")).graph.initializer}
    scales = [name for name in first if name.endswith("_scale") and first[name].ndim == 0]
    assert scales and all(np.allclose(first[n], second[n], rtol=1e-6) for n in scales)
