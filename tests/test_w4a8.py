"""4-bit weights in full quantization (W4A8): int4 weights behind DequantizeLinear, 8-bit activations."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import float_input, initializers, make_model, producers, random_feeds, run, save
from onnx import helper

import lowbit
from bench import zoo


def depthwise_model(seed: int = 0) -> onnx.ModelProto:
    """input -> Conv(3->8) -> Relu -> depthwise Conv(8, group 8) -> Conv(8->4) -> output."""
    rng = np.random.default_rng(seed)
    weights = [("w1", rng.normal(size=(8, 3, 3, 3)) * 0.3), ("w2", rng.normal(size=(8, 1, 3, 3)) * 0.3),
               ("w3", rng.normal(size=(4, 8, 1, 1)) * 0.3)]
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="depthwise", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Conv", ["c2", "w3"], ["output"], name="conv3"),
    ]
    return make_model(nodes, [float_input("input", ["N", 3, 8, 8])], [float_input("output", ["N", 4, 8, 8])],
                      [(name, w.astype(np.float32)) for name, w in weights])


def weight_of(path, node_name: str) -> onnx.TensorProto:
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.name == node_name)
    dq = producers(model)[node.input[1]]
    return next(t for t in model.graph.initializer if t.name == dq.input[0])


def test_int4_weights_with_8_bit_activations(tmp_path):
    src = save(depthwise_model(), tmp_path / "m.onnx")
    calib, held_out = random_feeds(32, seed=1), random_feeds(8, seed=2)
    w8, w4 = tmp_path / "w8.onnx", tmp_path / "w4.onnx"
    lowbit.quantize(src, w8, data=calib, progress=False)
    lowbit.quantize(src, w4, data=calib, weight_bit_num=4, progress=False)
    onnx.checker.check_model(str(w4), full_check=True)
    model = onnx.load(str(w4))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    for name in ("conv1", "conv3"):
        tensor = weight_of(w4, name)
        assert tensor.data_type == onnx.TensorProto.INT4
        values = onnx.numpy_helper.to_array(tensor).astype(np.int64)
        assert values.min() >= -7 and values.max() <= 7  # the narrow symmetric range
    assert weight_of(w4, "depthwise").data_type == onnx.TensorProto.INT8  # 9 weights a channel keep 8 bits
    assert w4.stat().st_size < w8.stat().st_size

    def error(path):
        return np.mean([np.mean((run(path, f)[0] - run(src, f)[0]) ** 2) for f in held_out])

    assert error(w8) < error(w4) < 0.05 * np.mean([np.mean(run(src, f)[0] ** 2) for f in held_out])


def test_the_int4_scale_clips_a_lone_large_weight(tmp_path):
    """One output channel of 26 weights at 0.1 and one at 1.0: |w|max / 7 would put every small weight at
    level 1 (0.143, an error of 0.043 each); a clipped scale serves the 26 and clips the one."""
    weight = np.full((1, 3, 3, 3), 0.1, dtype=np.float32)
    weight[0, 0, 0, 0] = 1.0
    node = helper.make_node("Conv", ["input", "w"], ["output"], name="conv", pads=[1, 1, 1, 1])
    src = save(make_model([node], [float_input("input", ["N", 3, 8, 8])], [float_input("output", ["N", 1, 8, 8])],
                          [("w", weight)]), tmp_path / "m.onnx")
    out = tmp_path / "w4.onnx"
    lowbit.quantize(src, out, data=random_feeds(16, seed=1), weight_bit_num=4, weight_rounding="NEAREST",
                    bias_correction=False, progress=False)
    scale = float(next(v for k, v in initializers(out).items() if k.startswith("w_scale")).reshape(-1)[0])
    assert scale < 1.0 / 7
    levels = onnx.numpy_helper.to_array(weight_of(out, "conv")).astype(np.int64).ravel()
    unclipped_error = 1.0 / 7 - 0.1  # 0.1 at level 1 of the |w|max / 7 grid
    assert np.max(np.abs(levels[1:] * scale - 0.1)) < unclipped_error


def test_the_digit_cnn_keeps_its_accuracy_at_w4a8(tmp_path):
    """Measured on 1000 held-out digits: float 0.974, W8A8 0.976, W4A8 0.977 (agreement 0.995); file 0.52x."""
    cells, labels = zoo.opencv_digits()
    order = np.random.default_rng(0).permutation(len(cells))
    calib = [{"input": zoo.digit_input(cells[i])} for i in order[:64]]
    x = np.concatenate([zoo.digit_input(cells[i]) for i in order[1000:2000]])
    src = zoo.digit_cnn("torchscript")
    out = tmp_path / "w4.onnx"
    lowbit.quantize(src, out, data=calib, weight_bit_num=4, progress=False)
    float_pred, w4_pred = run(src, {"input": x})[0].argmax(1), run(out, {"input": x})[0].argmax(1)
    accuracy = np.mean(w4_pred == labels[order[1000:2000]])
    assert accuracy >= np.mean(float_pred == labels[order[1000:2000]]) - 0.005
    assert np.mean(w4_pred == float_pred) >= 0.99


@pytest.mark.parametrize("settings, error", [
    ({"weight_bit_num": 6}, "8 or 4"),
    ({"weight_bit_num": 4, "quant_type": "WEIGHT_QUANT"}, "takes its weights' width from bit_num"),
    ({"weight_bit_num": 4, "target_device": "DSP"}, "DSP takes 8-bit weights"),
])
def test_weight_bit_num_errors(settings, error):
    with pytest.raises(lowbit.LowbitError, match=error):
        lowbit.load_config(None, settings)


# -- int4 per node: node_config / op_config, and int8 kept under weight_bit_num=4 ----------------------------


def weight_types(path) -> dict[str, int]:
    return {name: weight_of(path, name).data_type for name in ("conv1", "depthwise", "conv3")}


INT4, INT8 = onnx.TensorProto.INT4, onnx.TensorProto.INT8


@pytest.mark.parametrize("settings, expected", [
    ({"node_config": {"conv3": "int4"}}, {"conv1": INT8, "depthwise": INT8, "conv3": INT4}),
    ({"node_config": "depthwise[1]:int4"}, {"conv1": INT8, "depthwise": INT4, "conv3": INT8}),  # INI form
    ({"op_config": {"Conv": "int4"}}, {"conv1": INT4, "depthwise": INT4, "conv3": INT4}),  # named: depthwise too
    ({"weight_bit_num": 4, "node_config": {"conv1": "int8"}}, {"conv1": INT8, "depthwise": INT8, "conv3": INT4}),
    ({"weight_bit_num": 4, "node_config": {"conv3": {"input0": "int16"}}},  # input 0 named, the weight not
     {"conv1": INT4, "depthwise": INT8, "conv3": INT4}),
])
def test_int4_weights_per_node(tmp_path, settings, expected):
    src = save(depthwise_model(), tmp_path / "m.onnx")
    calib, held_out = random_feeds(32, seed=1), random_feeds(8, seed=2)
    out = tmp_path / "q.onnx"
    lowbit.quantize(src, out, data=calib, progress=False, **settings)
    onnx.checker.check_model(str(out), full_check=True)
    assert weight_types(out) == expected
    for name, data_type in expected.items():
        values = onnx.numpy_helper.to_array(weight_of(out, name)).astype(np.int64)
        assert np.abs(values).max() <= (7 if data_type == INT4 else 127)
    # the float model's outputs, to within what the int4 layers cost (8-bit everywhere: 0.3% of the energy here)
    error = np.mean([np.mean((run(out, f)[0] - run(src, f)[0]) ** 2) for f in held_out])
    assert error < 0.05 * np.mean([np.mean(run(src, f)[0] ** 2) for f in held_out])


def test_one_int4_layer_costs_less_than_all_of_them(tmp_path):
    src = save(depthwise_model(), tmp_path / "m.onnx")
    calib, held_out = random_feeds(32, seed=1), random_feeds(8, seed=2)
    errors = {}
    for label, settings in {"w8": {}, "one": {"node_config": {"conv3": "int4"}}, "all": {"op_config": {"Conv": "int4"}}
                            }.items():
        out = tmp_path / f"{label}.onnx"
        lowbit.quantize(src, out, data=calib, progress=False, weight_rounding="NEAREST", **settings)
        errors[label] = np.mean([np.mean((run(out, f)[0] - run(src, f)[0]) ** 2) for f in held_out])
    assert errors["w8"] < errors["one"] < errors["all"]


@pytest.mark.parametrize("settings, error", [
    ({"node_config": {"relu1": "int4"}}, "int4 applies to the constant weight of a Conv.*'relu1' is a Relu"),
    ({"node_config": {"conv1": {"input0": "int4"}}}, r"int4 applies to the weight \(input1\)"),
    ({"op_config": {"Relu": "int4"}}, "not to Relu"),
    ({"node_config": {"conv1": "int4"}, "target_device": "NVGPU"}, "NVGPU takes 8-bit weights"),
    ({"node_config": {"conv1": {"qtype": "int4", "weight_levels": 16}}}, "int4 and weight_levels"),
    ({"node_config": {"conv1": {"qtype": "int4", "input0": "float16"}}}, "cannot be mixed"),
])
def test_int4_per_node_errors(tmp_path, settings, error):
    src = save(depthwise_model(), tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    with pytest.raises(lowbit.LowbitError, match=error):
        lowbit.quantize(src, out, data=random_feeds(8, seed=1), progress=False, **settings)
    assert not out.exists()


@pytest.mark.parametrize("settings, error", [
    ({"weight_bit_num": 4, "precision_ladder": "int8,float32"}, "starts at int4"),
    ({"precision_ladder": "int4,int8,float32"}, "starts at int8"),
])
def test_the_ladder_starts_where_the_plan_puts_the_weights(settings, error):
    with pytest.raises(lowbit.LowbitError, match=error):
        lowbit.load_config(None, {"accuracy_target": "cosine>=0.9", **settings})
