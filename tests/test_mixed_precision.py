"""Mixed precision: int8 / int16 / float16 / float32 per model, op type, node and input; error compensation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import float_input, make_model, random_feeds, run, save, write_npy_folder
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError

INT8, UINT8, INT16, UINT16, INT32 = TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, \
    TensorProto.INT32


def mixed_model(bias: float = 0.1, seed: int = 0) -> onnx.ModelProto:
    """x -> conv_a (3->8) -> relu_a -> conv_b (8->8) -> add (+ relu_a) -> conv_c -> norm (LayerNormalization) -> y."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu_a"),
        helper.make_node("Conv", ["r", "wb", "bb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["b", "r"], ["s"], name="add"),
        helper.make_node("Conv", ["s", "wc"], ["c"], name="conv_c", pads=[1, 1, 1, 1]),
        helper.make_node("LayerNormalization", ["c", "gamma", "beta"], ["y"], name="norm", axis=-1),
    ]
    inits = [("wa", rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)),
             ("ba", np.full(8, bias, np.float32)),
             ("wb", rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32)),
             ("bb", np.full(8, bias, np.float32)),
             ("wc", rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32)),
             ("gamma", np.ones(8, np.float32)), ("beta", np.zeros(8, np.float32))]
    return make_model(nodes, [float_input("x", [1, 3, 8, 8])], [float_input("y", [1, 8, 8, 8])], inits)


@pytest.fixture
def model_path(tmp_path):
    return save(mixed_model(), tmp_path / "mixed.onnx")


@pytest.fixture
def calib(tmp_path):
    return write_npy_folder(tmp_path / "calib", random_feeds(24, name="x"), name="x")


def quantize(model_path, tmp_path, calib, **settings):
    out = tmp_path / f"q{len(list(tmp_path.glob('q*.onnx')))}.onnx"
    result = lowbit.quantize(model_path, out, data=calib, progress=False, **settings)
    onnx.checker.check_model(str(out), full_check=True)
    return out, result


def precisions(result) -> dict[str, str]:
    return {n.name: n.precision for n in result.quantized_nodes + result.float_nodes}


def input_types(path, node_name: str) -> dict[int, int]:
    """The integer type each input of a node is read at (through its DequantizeLinear), by input index."""
    model = onnx.load(str(path))
    made_by = {out: node for node in model.graph.node for out in node.output}
    inits = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    types = {}
    for index, name in enumerate(node.input):
        dq = made_by.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        source = dq.input[0]
        types[index] = inits[source].data_type if source in inits else inits[made_by[source].input[2]].data_type
    return types


def output_error(path, model_path, feeds) -> float:
    errors = []
    for feed in feeds:
        want, got = run(model_path, feed)[0].ravel(), run(path, feed)[0].ravel()
        errors.append(1 - want @ got / np.linalg.norm(want) / np.linalg.norm(got))
    return float(np.mean(errors))


# -- which precision each node gets ---------------------------------------------------


@pytest.mark.parametrize("settings, expected", [
    ({}, {"conv_a": "int8", "conv_b": "int8", "add": "int8"}),
    ({"all_node_type": "int16"}, {"conv_a": "int16", "conv_b": "int16", "add": "int16"}),
    # op_config over all_node_type
    ({"all_node_type": "int16", "op_config": {"Conv": "int8"}}, {"conv_a": "int8", "conv_b": "int8", "add": "int16"}),
    # node_config over op_config
    ({"all_node_type": "int16", "op_config": {"Conv": "int8"}, "node_config": {"conv_b": "int16"}},
     {"conv_a": "int8", "conv_b": "int16", "add": "int16"}),
    ({"node_config": {"conv_b": "float32"}}, {"conv_a": "int8", "conv_b": "float32", "add": "int8"}),
])
def test_priority_node_over_op_over_model(model_path, tmp_path, calib, settings, expected):
    _, result = quantize(model_path, tmp_path, calib, **settings)
    got = precisions(result)
    assert {name: got[name] for name in expected} == expected


def test_input_keys_win_over_qtype(model_path, tmp_path, calib):
    out, result = quantize(model_path, tmp_path, calib, node_config={"conv_b": {"qtype": "int16", "input1": "int8"}})
    assert input_types(out, "conv_b") == {0: INT16, 1: INT8, 2: INT32}
    assert precisions(result)["conv_b"] == "int16"


def test_int16_spreads_to_the_producer_and_other_readers(model_path, tmp_path, calib):
    """One Q/DQ pair per tensor: conv_b's input r is int16, so add reads r in int16 too, and conv_b's output b
    (its readers take int16 from an int16 node); add's own output s, and conv_a's input, stay int8."""
    out, _ = quantize(model_path, tmp_path, calib, node_config={"conv_b": "int16"})
    assert input_types(out, "conv_b")[0] == INT16
    assert input_types(out, "add") == {0: INT16, 1: INT16}
    assert input_types(out, "conv_c") == {0: UINT8, 1: INT8, 2: INT32}  # bias correction adds a bias
    assert input_types(out, "conv_a") == {0: UINT8, 1: INT8, 2: INT32}
    assert onnx.load(str(out)).opset_import[0].version >= 21


def test_int16_everywhere_is_far_closer_to_float(model_path, tmp_path, calib):
    feeds = random_feeds(8, name="x", seed=5)
    int8, _ = quantize(model_path, tmp_path, calib)
    int16, result = quantize(model_path, tmp_path, calib, all_node_type="int16")
    assert all(t.dtype == "int16" for t in result.tensors.values())
    assert output_error(int16, model_path, feeds) < output_error(int8, model_path, feeds) / 100


def test_int16_bias_gets_a_scale_that_fits_int32(tmp_path, calib):
    """At int16 x int16 scales a bias of 50 needs more than 2^31 steps. The bias is stored int32 with a wider
    scale; left float, ONNX Runtime would quantize it itself with the product scale and saturate it."""
    path = save(mixed_model(bias=50.0), tmp_path / "big_bias.onnx")
    out, _ = quantize(path, tmp_path, calib, all_node_type="int16")
    model = onnx.load(str(out))
    made_by = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.name == "conv_a")
    bias_dq = made_by[conv.input[2]]
    q, scale = inits[bias_dq.input[0]], inits[bias_dq.input[1]]
    assert q.dtype == np.int32 and np.abs(q).max() < 2**31 - 1
    np.testing.assert_allclose(q * scale, 50.0, rtol=1e-6)
    assert output_error(out, path, random_feeds(4, name="x", seed=5)) < 1e-3  # saturated: about 1


def test_dsp_takes_16_bit_activations_with_8_bit_weights(model_path, tmp_path, calib):
    out, _ = quantize(model_path, tmp_path, calib, target_device="DSP", all_node_type="int16")
    assert input_types(out, "conv_b") == {0: UINT16, 1: UINT8, 2: INT32}


def test_nvgpu_turns_int16_into_float16(model_path, tmp_path, calib):
    out, result = quantize(model_path, tmp_path, calib, target_device="NVGPU", node_config={"conv_b": "int16"})
    assert precisions(result)["conv_b"] == "float16"
    assert "int16 as float16 on this target" in {n.name: n.reason for n in result.float_nodes}["conv_b"]


def test_model_output_type_quantizes_the_outputs_under_their_names(model_path, tmp_path, calib):
    for qtype, onnx_type in (("int8", UINT8), ("int16", INT16)):
        out, _ = quantize(model_path, tmp_path, calib, model_output_type=qtype)
        model = onnx.load(str(out))
        assert [o.name for o in model.graph.output] == ["y"]
        made_by = {o: n for n in model.graph.node for o in n.output}
        dq = made_by["y"]
        assert dq.op_type == "DequantizeLinear"
        zero_point = next(t for t in model.graph.initializer if t.name == dq.input[2])
        assert zero_point.data_type == onnx_type


def test_asymmetric_false_gives_symmetric_int8_activations(model_path, tmp_path, calib):
    out, _ = quantize(model_path, tmp_path, calib, asymmetric=False)
    assert input_types(out, "conv_b")[0] == INT8
    model = onnx.load(str(out))
    zero_points = [numpy_helper.to_array(t) for t in model.graph.initializer
                   if t.name.endswith("_zero_point") and t.data_type == INT8 and not t.dims]
    assert zero_points and not any(zero_points)


# -- float16 ----------------------------------------------------------------------------


def test_float16_node_computes_in_float16(model_path, tmp_path, calib):
    """LayerNormalization has a float16 kernel in ONNX Runtime's CPU provider: the written node reads and writes
    float16, and ONNX Runtime's optimized graph runs it so (no Cast to float32 inserted before it)."""
    out, result = quantize(model_path, tmp_path, calib, op_config={"LayerNormalization": "float16"})
    assert precisions(result)["norm"] == "float16"
    model = onnx.load(str(out))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    norm = next(n for n in model.graph.node if n.name == "norm")
    assert [types.get(name) for name in norm.input[1:]] == [TensorProto.FLOAT16] * 2
    made_by = {o: n for n in model.graph.node for o in n.output}
    cast_in = made_by[norm.input[0]]
    assert cast_in.op_type == "Cast" and cast_in.attribute[0].i == TensorProto.FLOAT16
    assert types["y"] == TensorProto.FLOAT  # a Cast gives the reader float32 back

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath)
    made_by = {o: n for n in optimized.graph.node for o in n.output}
    norm = next(n for n in optimized.graph.node if n.op_type == "LayerNormalization")
    feeding = made_by[norm.input[0]]
    assert not (feeding.op_type == "Cast" and feeding.attribute[0].i == TensorProto.FLOAT)
    assert output_error(out, model_path, random_feeds(4, name="x", seed=5)) < 1e-3


def test_float16_without_a_cpu_kernel_falls_back_to_float32(model_path, tmp_path, calib):
    with pytest.warns(lowbit.LowbitWarning, match="no float16 kernel .*for Conv"):
        out, result = quantize(model_path, tmp_path, calib, node_config={"conv_b": "float16"})
    assert precisions(result)["conv_b"] == "float32"
    assert input_types(out, "conv_b") == {}  # reads the float tensor, before any rounding


def test_nvgpu_runs_float16_everywhere_with_float16_weights(model_path, tmp_path, calib):
    out, result = quantize(model_path, tmp_path, calib, target_device="NVGPU", node_config={"conv_b": "float16"})
    model = onnx.load(str(out))
    conv = next(n for n in model.graph.node if n.name == "conv_b")
    weights = {t.name: t.data_type for t in model.graph.initializer}
    assert weights[conv.input[1]] == TensorProto.FLOAT16 and weights[conv.input[2]] == TensorProto.FLOAT16
    assert output_error(out, model_path, random_feeds(4, name="x", seed=5)) < 1e-2


# -- error compensation -----------------------------------------------------------------


def test_ec_on_a_conv_weight_adds_the_int8_residual(model_path, tmp_path, calib):
    """W ~ w8 + r8: r8 is the residual W - w8 quantized per channel with its own scale, so what is left is at
    most half of its step, max|W - w8| / 127 / 2, a 254th of int8's error bound."""
    settings = {"weight_rounding": "NEAREST", "bias_correction": False, "saturation_safe_weights": False}
    out, _ = quantize(model_path, tmp_path, calib, node_config={"conv_a": {"input1": "ec"}}, **settings)
    model = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    made_by = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name.startswith("conv_a")]
    assert len(convs) == 2 and convs[0].input[0] == convs[1].input[0]
    assert len(convs[1].input) == 2  # the bias is added once

    def dequantized(name):
        dq = made_by[name]
        q, scale, zero = (inits[i] for i in dq.input)
        return (q.astype(np.float64) - zero.reshape(-1, 1, 1, 1)) * scale.reshape(-1, 1, 1, 1)

    w = numpy_helper.to_array(mixed_model().graph.initializer[0]).astype(np.float64)
    w8, r8 = dequantized(convs[0].input[1]), dequantized(convs[1].input[1])
    absmax = np.abs(w).reshape(8, -1).max(axis=1).reshape(-1, 1, 1, 1)
    residual_max = np.abs(w - w8).reshape(8, -1).max(axis=1).reshape(-1, 1, 1, 1)
    assert np.all(np.abs(w - w8) <= absmax / 127 / 2 + 1e-7)
    assert np.all(np.abs(w - w8 - r8) <= residual_max / 127 / 2 + 1e-7)
    add = next(n for n in model.graph.node if n.op_type == "Add" and set(n.input) == {convs[0].output[0],
                                                                                       convs[1].output[0]})
    assert add is not None
    plain, _ = quantize(model_path, tmp_path, calib, **settings)
    feeds = random_feeds(8, name="x", seed=5)
    assert output_error(out, model_path, feeds) < output_error(plain, model_path, feeds)


def matmul_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    return make_model(nodes, [float_input("x", [1, 4, 16])], [float_input("y", [1, 4, 8])],
                      [("w", rng.normal(0, 0.3, (16, 8)).astype(np.float32))])


def test_ec_on_an_activation_quantizes_the_residual_over_half_a_step(tmp_path):
    path = save(matmul_model(), tmp_path / "mm.onnx")
    calib = write_npy_folder(tmp_path / "c", random_feeds(16, shape=(1, 4, 16), name="x"), name="x")
    out, _ = quantize(path, tmp_path, calib, node_config={"mm": {"input0": "ec"}}, bias_correction=False,
                      weight_rounding="NEAREST")
    model = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    sub = next(n for n in model.graph.node if n.op_type == "Sub")
    made_by = {o: n for n in model.graph.node for o in n.output}
    x_scale = float(inits[made_by[sub.input[1]].input[1]])
    residual_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == sub.output[0])
    # CPU: asymmetric uint8 over [-step/2, step/2]: scale = step / 255, zero point round(127.5) = 128
    assert float(inits[residual_q.input[1]]) == pytest.approx(x_scale / 255, rel=1e-6)
    assert int(inits[residual_q.input[2]]) == 128
    plain, _ = quantize(path, tmp_path, calib, bias_correction=False, weight_rounding="NEAREST",
                        node_config={"mm": {"input1": "int16"}})  # the weight as precise in both
    both, _ = quantize(path, tmp_path, calib, bias_correction=False, weight_rounding="NEAREST",
                       node_config={"mm": {"input0": "ec", "input1": "int16"}})
    feeds = random_feeds(8, shape=(1, 4, 16), name="x", seed=5)
    assert output_error(both, path, feeds) < output_error(plain, path, feeds) / 10


# -- the keys that steer calibration and bias correction ------------------------------------


def test_bias_correction_samples_and_metric(model_path, tmp_path):
    calib = write_npy_folder(tmp_path / "c", random_feeds(40, name="x"), name="x")
    _, result = quantize(model_path, tmp_path, calib, bias_correction_samples=5)
    assert result.bias_correction.samples == 5
    _, result = quantize(model_path, tmp_path, calib, bias_correction_metric="mse")
    line = next(line for line in result.summary().splitlines() if "held-back samples:" in line)
    assert line.strip().startswith("mse on 5 held-back samples")
    assert result.bias_correction_kept == ("kept" in line)


def test_bias_correction_metric_restores_biases_it_finds_worse(model_path, tmp_path, monkeypatch):
    """A metric that prefers the uncorrected model: the written biases are those of bias_correction=false."""
    from lowbit.passes import correct_biases

    calib = write_npy_folder(tmp_path / "c", random_feeds(40, name="x"), name="x")
    scores = iter([1.0, 0.0])  # uncorrected, corrected (higher is better for cosine)
    monkeypatch.setattr(correct_biases.CorrectBiases, "_score", staticmethod(lambda state, metric: next(scores)))
    restored, result = quantize(model_path, tmp_path, calib, bias_correction_metric="cosine-similarity")
    assert result.bias_correction_kept is False
    uncorrected, _ = quantize(model_path, tmp_path, calib, bias_correction=False)
    a, b = onnx.load(str(restored)), onnx.load(str(uncorrected))
    biases = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer if "bias" in t.name}
    assert biases and all(np.array_equal(v, numpy_helper.to_array(t)) for t in b.graph.initializer
                          for name, v in biases.items() if t.name == name)


def test_layerwise_metric_scores_the_layerwise_search(model_path, tmp_path, calib, monkeypatch):
    from lowbit.search import modelwise

    seen = []
    original = modelwise.score_candidates

    def spy(model, plan, per_tensor, collect, metric):
        seen.append(metric)
        return original(model, plan, per_tensor, collect, metric)

    monkeypatch.setattr(modelwise, "score_candidates", spy)
    quantize(model_path, tmp_path, calib, layerwise_search=True, layerwise_metric="sqnr",
             activation_quant_method="MAX_MIN,KL")
    assert seen == ["sqnr"]


# -- the same settings from Horizon's JSON, the INI and the CLI ------------------------------


def test_horizon_json_sets_the_precisions(model_path, tmp_path, calib):
    config = tmp_path / "quant_config.json"
    config.write_text(json.dumps({
        "model_config": {"all_node_type": "int16", "activation": {"calibration_type": "max"}},
        "op_config": {"Add": {"qtype": "int8"}},
        "node_config": {"conv_b": {"input1": "int8"}, "norm": {"qtype": "float16"}},
    }))
    out = tmp_path / "q.onnx"
    result = lowbit.quantize(model_path, out, config=config, data=calib, progress=False)
    got = precisions(result)
    assert (got["conv_a"], got["add"], got["norm"]) == ("int16", "int8", "float16")
    assert input_types(out, "conv_b") == {0: INT16, 1: INT8, 2: INT32}
    assert result.search is None or result.search.chosen == "MAX_MIN"
    assert main(["quantize", str(model_path), "-o", str(tmp_path / "cli.onnx"), "--config", str(config),
                 "--data", str(calib), "-q"]) == 0


def test_ini_writes_the_same_settings(model_path, tmp_path, calib):
    ini = tmp_path / "q.cfg"
    ini.write_text("[common_quant_param]\nall_node_type = int16\nop_config = Conv:int8\n"
                   "node_config = conv_b:int16, conv_b[1]:int8, conv_a[1]:ec\n")
    out = tmp_path / "q.onnx"
    result = lowbit.quantize(model_path, out, config=ini, data=calib, progress=False)
    got = precisions(result)
    assert (got["conv_a"], got["conv_b"], got["add"]) == ("ec", "int16", "int16")
    assert input_types(out, "conv_b") == {0: INT16, 1: INT8, 2: INT32}


@pytest.mark.parametrize("node_config, message", [
    ({"conv_d": "int16"}, "node_config.conv_d: no node named 'conv_d' in the model .*did you mean 'conv_c'"),
    ({"add": {"input0": "ec"}}, "node_config.add.input0: ec applies to Conv/ConvTranspose input1, .*'add' is a Add"),
    ({"conv_a": {"qtype": "float16", "input1": "int8"}}, "float16 applies to the whole node"),
])
def test_bad_node_config_is_one_line_naming_the_entry(model_path, tmp_path, calib, node_config, message):
    with pytest.raises(LowbitError, match=message):
        lowbit.quantize(model_path, tmp_path / "q.onnx", data=calib, progress=False, node_config=node_config)
    assert not (tmp_path / "q.onnx").exists()


def test_bad_settings_from_json_name_the_json_path(model_path, tmp_path, calib, capsys):
    config = tmp_path / "quant_config.json"
    config.write_text(json.dumps({"op_config": {"Convv": {"qtype": "int16"}}}))
    code = main(["quantize", str(model_path), "-o", str(tmp_path / "q.onnx"), "--config", str(config),
                 "--data", str(calib)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "quant_config.json: op_config.Convv: no Convv node in the model (did you mean 'Conv'" in err[0]
    with pytest.raises(LowbitError, match="asymmetric=true: TensorRT"):
        lowbit.quantize(model_path, tmp_path / "q.onnx", data=calib, target_device="NVGPU", asymmetric=True)
    with pytest.raises(LowbitError, match="all_node_type applies to quant_type=FULL_QUANT only"):
        lowbit.quantize(model_path, tmp_path / "q.onnx", quant_type="WEIGHT_QUANT", all_node_type="int16")


# -- a real model ---------------------------------------------------------------------------


def test_efficientnet_all_int16_has_a_tenth_of_the_int8_error(tmp_path):
    from bench import zoo

    photos = zoo.skimage_photos()
    calibration = ["astronaut", "coffee", "ihc", "motorcycle_left"]
    calib = [{"input": zoo.efficientnet_input(c)} for n in calibration for c in zoo.crops(photos[n], 8, seed=0)]
    held_out = [{"input": zoo.efficientnet_input(c)} for n in sorted(set(photos) - set(calibration))
                for c in zoo.crops(photos[n], 4, seed=1)]
    src = zoo.efficientnet_lite0()
    int8, int16 = tmp_path / "int8.onnx", tmp_path / "int16.onnx"
    lowbit.quantize(src, int8, data=calib, progress=False)
    lowbit.quantize(src, int16, data=calib, progress=False, all_node_type="int16")
    onnx.checker.check_model(str(int16))
    errors = {path.name: output_error(path, src, held_out) for path in (int8, int16)}
    # measured: int8 0.0042, int16 5.4e-8 on these crops
    assert errors["int16.onnx"] <= errors["int8.onnx"] / 10


def test_the_analysis_suggestion_is_a_quant_config_lowbit_reads(tmp_path):
    """lowbit analyze's node_config snippet, saved as a JSON file, gives those nodes those precisions."""
    example = Path(__file__).resolve().parent.parent / "examples" / "digits"
    model, calib = example / "digit_cnn.onnx", example / "calib"
    lowbit.quantize(model, tmp_path / "int8.onnx", data=calib, progress=False)
    suggestion = lowbit.analyze(model, tmp_path / "int8.onnx", data=calib, samples=16).suggestion
    assert suggestion.nodes
    config = tmp_path / "quant_config.json"
    config.write_text(json.dumps(suggestion.node_config))
    result = lowbit.quantize(model, tmp_path / "mixed.onnx", config=config, data=calib, progress=False)
    got = precisions(result)
    assert {name: got[name] for name in suggestion.nodes} == {
        name: entry["qtype"] for name, entry in suggestion.node_config["node_config"].items()}


def test_per_channel_and_asymmetric_lists_are_search_candidates(model_path, tmp_path, calib, monkeypatch):
    """Horizon's lists: every method per channel and per tensor, asymmetric and symmetric; the written model
    is quantized as the winner says. The scores are replaced so that the last candidate wins."""
    from lowbit.search import modelwise
    from lowbit.search.modelwise import SearchRow

    original = modelwise._score_models

    def last_wins(*args):
        rows = original(*args)
        return [SearchRow(row.label, float(i), row.seconds) for i, row in enumerate(rows)]

    monkeypatch.setattr(modelwise, "_score_models", last_wins)
    out, result = quantize(model_path, tmp_path, calib, activation_quant_method="MAX_MIN,MSE",
                           per_channel=[True, False], asymmetric=[True, False])
    labels = [row.label for row in result.search.rows]
    assert labels[0] == "MAX_MIN (per channel, asymmetric)" and len(labels) == 8
    assert result.search.chosen == "MSE (per tensor, symmetric)"
    model = onnx.load(str(out))
    made_by = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.name == "conv_b")
    assert inits[made_by[conv.input[1]].input[1]].ndim == 0  # one weight scale: per tensor
    assert input_types(out, "conv_b")[0] == INT8  # symmetric activations: int8, zero point 0
    assert not inits[made_by[conv.input[0]].input[2]].any()


def _initializers(path) -> dict[str, bytes]:
    return {t.name: t.SerializeToString() for t in onnx.load(str(path)).graph.initializer}


BASE = {"model_config": {"activation": {"calibration_type": "max"}}}


def _with(section: str, **values) -> dict:
    config = json.loads(json.dumps(BASE))
    target = config["model_config"]
    for key in section.split(".") if section else ():
        target = target.setdefault(key, {})
    target.update(values)
    return config


@pytest.mark.parametrize("config, check", [
    (_with("", all_node_type="int16"), lambda r, changed: {t.dtype for t in r.tensors.values()} == {"int16"}),
    (_with("", all_node_type="float16"), lambda r, changed: precisions(r)["norm"] == "float16"),
    (_with("", model_output_type="int16"), lambda r, changed: r.tensors["y"].dtype == "int16"),
    (_with("activation", calibration_type="kl"), lambda r, changed: r.search.chosen.startswith("KL")),  # ranges: KL's
    (_with("activation", calibration_type="kl", num_bin=2048), lambda r, changed: changed),  # against kl's 1024
    (_with("activation", calibration_type="kl", num_bin=2048, max_num_bin=2048), lambda r, changed: changed),
    (_with("activation", max_percentile=0.99), lambda r, changed: changed),
    (_with("activation", per_channel=False), lambda r, changed: changed),
    (_with("activation", asymmetric=False), lambda r, changed: {t.dtype for t in r.tensors.values()} == {"int8"}),
    (_with("weight.bias_correction", num_sample=1), lambda r, changed: r.bias_correction.samples == 1 and changed),
    ({"model_config": {"activation": {"calibration_type": ["max", "kl"]},
                       "weight": {"bias_correction": {"metric": "mse"}}}},
     lambda r, changed: "mse on" in r.summary()),  # the held-back samples come with the search
    ({"model_config": {"activation": {"calibration_type": ["max", "kl"]}, "modelwise_search": {"metric": "sqnr"}}},
     lambda r, changed: r.search.metric == "sqnr"),
    ({"model_config": {"activation": {"calibration_type": ["max", "kl"]}, "layerwise_search": {"metric": "mse"}}},
     lambda r, changed: "layerwise" in [row.label for row in r.search.rows]),
    (BASE | {"op_config": {"Conv": {"qtype": "int16"}}}, lambda r, changed: precisions(r)["conv_c"] == "int16"),
    (BASE | {"node_config": {"conv_c": {"qtype": "float32"}}}, lambda r, changed: precisions(r)["conv_c"] == "float32"),
])
def test_each_horizon_key_changes_the_output(model_path, tmp_path, calib, config, check):
    """Each key of Horizon's template, added to a plain max calibration, changes the written model as documented.

    num_bin is compared with kl at num_bin 1024; max_num_bin with kl at num_bin 2048 (max_num_bin 16384)."""
    base_json, json_path = tmp_path / "base.json", tmp_path / "quant_config.json"
    activation = config["model_config"].get("activation", {})
    base_config = BASE
    if "max_num_bin" in activation:
        base_config = _with("activation", calibration_type="kl", num_bin=2048)
    elif "num_bin" in activation:
        base_config = _with("activation", calibration_type="kl")
    base_json.write_text(json.dumps(base_config))
    json_path.write_text(json.dumps(config))
    base = lowbit.quantize(model_path, tmp_path / "base.onnx", config=base_json, data=calib, progress=False)
    result = lowbit.quantize(model_path, tmp_path / "q.onnx", config=json_path, data=calib, progress=False)
    onnx.checker.check_model(str(tmp_path / "q.onnx"))
    changed = _initializers(tmp_path / "q.onnx") != _initializers(tmp_path / "base.onnx")
    assert base.search is None or base.search.chosen in ("MAX_MIN", "KL num_bin=1024", "KL num_bin=2048")
    assert check(result, changed)


def test_ec_on_conv_transpose_and_resize_runs_and_gridsample_says_it_stays_float(tmp_path):
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["a"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["a", "wt", "bt"], ["t"], name="up", strides=[2, 2]),
        helper.make_node("Resize", ["t", "", "scales"], ["r"], name="resize", mode="linear"),
        helper.make_node("Conv", ["r", "w1"], ["c"], name="conv_out"),
        helper.make_node("GridSample", ["c", "grid"], ["y"], name="sample"),
    ]
    model = make_model(nodes, [float_input("x", [1, 3, 8, 8])], [float_input("y", [1, 4, 8, 8])], [
        ("w0", rng.normal(0, 0.3, (6, 3, 3, 3)).astype(np.float32)),
        ("wt", rng.normal(0, 0.3, (6, 6, 2, 2)).astype(np.float32)), ("bt", np.full(6, 0.1, np.float32)),
        ("scales", np.array([1, 1, 0.5, 0.5], np.float32)),
        ("w1", rng.normal(0, 0.3, (4, 6, 1, 1)).astype(np.float32)),
        ("grid", rng.uniform(-1, 1, (1, 8, 8, 2)).astype(np.float32))], opset=17)
    path = save(model, tmp_path / "up.onnx")
    calib = write_npy_folder(tmp_path / "c", random_feeds(16, name="x"), name="x")
    node_config = {"up": {"input1": "ec"}, "resize": {"input0": "ec"}, "sample": {"input0": "ec"}}
    with pytest.warns(lowbit.LowbitWarning, match="sample \\(GridSample\\): ec asked by node_config .*stays float32"):
        out, result = quantize(path, tmp_path, calib, node_config=node_config, weight_rounding="NEAREST",
                               bias_correction=False)
    written = onnx.load(str(out))
    assert sum(n.op_type == "ConvTranspose" for n in written.graph.node) == 2
    assert sum(n.op_type == "Resize" for n in written.graph.node) == 2
    plain, _ = quantize(path, tmp_path, calib, weight_rounding="NEAREST", bias_correction=False)
    feeds = random_feeds(6, name="x", seed=9)
    assert output_error(out, path, feeds) <= output_error(plain, path, feeds)


def test_float16_leaves_ops_typed_by_an_attribute_in_float32(tmp_path):
    """A Cast's output type is its ``to``: casting its input would not make it float16, so it stays float32 (and
    the Mul after it, in float16, gets a Cast of its own). The model loads and runs."""
    nodes = [helper.make_node("Cast", ["x"], ["c"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Mul", ["c", "k"], ["y"], name="mul")]
    x = helper.make_tensor_value_info("x", TensorProto.INT32, [1, 3, 8, 8])
    model = make_model(nodes, [x], [float_input("y", [1, 3, 8, 8])], [("k", np.full((1, 3, 1, 1), 0.5, np.float32))])
    path = save(model, tmp_path / "cast.onnx")
    feeds = [{"x": np.random.default_rng(i).integers(-50, 50, (1, 3, 8, 8)).astype(np.int32)} for i in range(8)]
    out, result = quantize(path, tmp_path, write_npy_folder(tmp_path / "c", feeds, name="x"),
                           target_device="NVGPU", all_node_type="float16")
    got = precisions(result)
    assert got["mul"] == "float16" and got["cast"] == "float32"
    assert output_error(out, path, feeds[:2]) < 1e-6


def test_float16_constants_beyond_its_range_saturate(tmp_path, calib):
    """An attention-mask-like -1e9 becomes float16's -65504, not -inf (which would turn 0 x mask into NaN)."""
    nodes = [helper.make_node("Add", ["x", "mask"], ["y"], name="add")]
    model = make_model(nodes, [float_input("x", [1, 3, 8, 8])], [float_input("y", [1, 3, 8, 8])],
                       [("mask", np.where(np.arange(8) < 4, 0.0, -1e9).astype(np.float32).reshape(1, 1, 1, 8))])
    path = save(model, tmp_path / "mask.onnx")
    out, _ = quantize(path, tmp_path, calib, target_device="NVGPU", all_node_type="float16")
    half = next(numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer
                if t.data_type == TensorProto.FLOAT16)
    assert np.isfinite(half).all() and half.min() == np.finfo(np.float16).min
    assert np.isfinite(run(out, random_feeds(1, name="x")[0])[0]).all()
