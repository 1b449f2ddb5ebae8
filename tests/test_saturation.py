"""Int8 weights that ONNX Runtime's x86 kernels cannot saturate (CPUs without VNNI add two u8 x s8 products in
16 bits): the pairs, the fit, the wider grid, and written models that compute what their Q/DQ nodes say."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from conftest import float_input, make_model, save
from onnx import helper, numpy_helper

import lowbit
from lowbit.quantizers.qparams import INT8, QParams, QuantScheme
from lowbit.quantizers.saturation import KernelPairs, fit_pairs, kernel_pairs, widen_for_pairs


def node(op, **attributes):
    return ir.node(op, [], attributes)


def test_conv_pairs_follow_the_kernels_nhwc_order():
    """Weight (O, C=3, 2, 2): a row holds c * 4 + s; the kernel reads s * 3 + c, two at a time."""
    pairs = kernel_pairs(node("Conv"), (5, 3, 2, 2))
    order = [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    assert pairs.first.tolist() == order[0::2] and pairs.second.tolist() == order[1::2]
    assert kernel_pairs(node("Conv", group=8), (8, 1, 3, 3)) is None  # depthwise: a 32-bit kernel
    grouped = kernel_pairs(node("Conv", group=2), (4, 2, 1, 1))  # per group: that group's 2 channels
    assert grouped.first.tolist() == [0] and grouped.second.tolist() == [1]


def test_matmul_and_gemm_pairs_run_along_k():
    pairs = kernel_pairs(node("MatMul"), (5, 7))  # [K=5, N]: 2 pairs, the fifth alone
    assert pairs.first.tolist() == [0, 2] and pairs.second.tolist() == [1, 3]
    assert kernel_pairs(node("Gemm", transB=1), (7, 4)).first.tolist() == [0, 2]  # [N, K=4]
    assert kernel_pairs(node("Gemm"), (3, 9)).second.tolist() == [1]  # [K=3, N]
    assert kernel_pairs(node("Add"), (3, 3)) is None


def test_fit_cuts_the_excess_evenly_from_the_larger_first():
    """(127, 127): excess 126 -> (64, 64); (0, 5): fine; (-100, -60): excess 32 -> (-84, -44); (-128, -1): excess
    1 -> (-127, -1); (127, -128), (-128, 0): opposite signs or a zero, never over (255 * 128 at most)."""
    rows = np.array([[127, 127, 0, 5, -100, -60, -128, -1, 127, -128, -128, 0]], np.int8)
    pairs = KernelPairs(np.array([0, 2, 4, 6, 8, 10]), np.array([1, 3, 5, 7, 9, 11]))
    fitted, changed = fit_pairs(rows, pairs)
    assert fitted.tolist() == [[64, 64, 0, 5, -84, -44, -127, -1, 127, -128, -128, 0]] and fitted.dtype == np.int8
    assert changed == 5
    assert fit_pairs(fitted, pairs) == (fitted, 0)


def test_two_largest_weights_side_by_side_widen_the_grid():
    """Row [1, 1] on scale 1/127: cutting to (64, 64) costs 2 (63/127)^2; the grid 254/128 times wider puts both
    on level 64 exactly, error 0."""
    qparams = QParams(np.array([1 / 127], np.float32), np.zeros(1, np.int8), QuantScheme(INT8, True, 0, True))
    widened = widen_for_pairs(node("Gemm", transB=1), np.array([[1.0, 1.0]], np.float32), qparams)
    np.testing.assert_allclose(widened.scale, [254 / 128 / 127], rtol=1e-6)
    assert widened.quantize(np.array([[1.0, 1.0]], np.float32)).tolist() == [[64, 64]]


def test_the_chosen_grid_costs_no_more_than_cutting_or_widening_fully():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(16, 64)).astype(np.float32)
    weight[:, :2] = 3.0 * np.sign(rng.normal(size=(16, 1)))  # the two largest weights of each row side by side
    weight[::2, 1] *= 0.1  # every other row: only a little over
    scheme = QuantScheme(INT8, True, 0, True)
    own = QParams((np.abs(weight).max(axis=1) / 127).astype(np.float32), np.zeros(16, np.int8), scheme)
    pairs = kernel_pairs(node("Gemm", transB=1), weight.shape)

    def error(qparams):
        q = fit_pairs(qparams.quantize(weight), pairs)[0]
        return np.sum((qparams.dequantize(q) - weight) ** 2, axis=1)

    q = own.quantize(weight).astype(np.int64)
    full = QParams(own.scale * np.maximum(1, np.max(np.abs(q[:, 0::2] + q[:, 1::2]), axis=1) / 128), own.zero_point,
                   scheme)  # widened just enough that no pair is over 128
    chosen = widen_for_pairs(node("Gemm", transB=1), weight, own)
    assert np.all(error(chosen) <= np.minimum(error(own), error(full)) + 1e-12)
    assert np.any(chosen.scale > own.scale) and np.any(chosen.scale < full.scale)


def saturating_model():
    """Conv (64 -> 8, 1x1) then Gemm (8 -> 4): positive inputs and same-sign neighbouring weights, as many as
    there are, near each channel's largest (what overflows a 16-bit pair sum)."""
    rng = np.random.default_rng(3)
    w = rng.uniform(0.8, 1.0, size=(8, 64, 1, 1)).astype(np.float32)
    g = rng.uniform(0.8, 1.0, size=(4, 8)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "g"], ["output"], name="gemm", transB=1)]
    return make_model(nodes, [float_input("input", [1, 64, 1, 1])], [float_input("output", [1, 4])],
                      [("w", w), ("g", g)])


def positive_feeds(n, seed):
    rng = np.random.default_rng(seed)
    return [{"input": rng.uniform(0, 1, size=(1, 64, 1, 1)).astype(np.float32)} for _ in range(n)]


def outputs(path, feeds, fused):
    options = ort.SessionOptions()
    if not fused:  # each Q/DQ node on its own: the float computation the model's integers stand for
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, f)[0] for f in feeds])


def test_written_weights_keep_every_pair_within_128_and_integer_kernels_compute_the_qdq_model(tmp_path):
    """On any CPU, ONNX Runtime's fused integer kernels give what the Q/DQ nodes say (on an AVX2 CPU without VNNI
    this model's integer kernels saturate when the pairs are not kept: the output drops by about half)."""
    src = save(saturating_model(), tmp_path / "m.onnx")
    calib, held = positive_feeds(16, 0), positive_feeds(8, 1)
    for rounding in ("NEAREST", "GPTQ", "ADAROUND"):
        out = tmp_path / f"{rounding}.onnx"
        result = lowbit.quantize(src, out, data=calib, weight_rounding=rounding, progress=False)
        assert "2 int8 weights kept within |a + b| <= 128" in result.summary()
        model = onnx.load(str(out))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        conv_w = inits["w_quantized"].reshape(8, 64).astype(np.int64)
        gemm_w = inits["g_quantized"].astype(np.int64)
        for rows in (conv_w, gemm_w):
            assert np.max(np.abs(rows[:, 0::2] + rows[:, 1::2])) <= 128
        fused, simulated = outputs(out, held, True), outputs(out, held, False)
        output_step = np.abs(simulated).max() / 255
        assert np.max(np.abs(fused - simulated)) <= 1.01 * output_step
        reference = outputs(src, held, False)
        assert np.max(np.abs(simulated - reference)) / np.abs(reference).max() < 0.02


def test_pairs_of_opposite_signs_keep_their_nearest_integers_and_compute_exactly(tmp_path):
    """Each pair (+w, -w'): a lane holds at most 255 * 128, so the guard leaves every integer as round to nearest
    gives it, and the integer kernels still compute what the Q/DQ nodes say."""
    model = saturating_model()
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[:, 1::2] *= -1
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    src = save(model, tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    held = positive_feeds(8, 1)
    lowbit.quantize(src, out, data=positive_feeds(16, 0), weight_rounding="NEAREST", progress=False)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    rows = w.reshape(8, 64)
    np.testing.assert_array_equal(inits["w_quantized"].reshape(8, 64),
                                  np.rint(rows / (np.abs(rows).max(axis=1, keepdims=True) / 127)))
    fused, simulated = outputs(out, held, True), outputs(out, held, False)
    assert np.max(np.abs(fused - simulated)) <= 1.01 * np.abs(simulated).max() / 255


def test_turned_off_the_weights_keep_their_nearest_integers(tmp_path):
    src = save(saturating_model(), tmp_path / "m.onnx")
    out = tmp_path / "off.onnx"
    result = lowbit.quantize(src, out, data=positive_feeds(16, 0), weight_rounding="NEAREST",
                             saturation_safe_weights=False, progress=False)
    assert "kept within" not in result.summary()
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    w = numpy_helper.to_array(saturating_model().graph.initializer[0]).reshape(8, 64)
    expected = np.rint(w / (w.max(axis=1, keepdims=True) / 127))
    np.testing.assert_array_equal(inits["w_quantized"].reshape(8, 64), expected)


def test_dynamic_matmul_weights_keep_their_pairs_within_128(tmp_path):
    rng = np.random.default_rng(4)
    weight = rng.uniform(0.8, 1.0, size=(32, 6)).astype(np.float32)  # [K, N]
    model = make_model([helper.make_node("MatMul", ["input", "w"], ["output"], name="mm")],
                       [float_input("input", [2, 32])], [float_input("output", [2, 6])], [("w", weight)])
    src = save(model, tmp_path / "m.onnx")
    out = tmp_path / "d.onnx"
    lowbit.quantize(src, out, quant_type="DYNAMIC_QUANT", progress=False)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    q = inits["mm_weight_quantized"].astype(np.int64)
    assert np.max(np.abs(q[0::2] + q[1::2])) <= 128
    x = {"input": rng.uniform(0, 1, size=(2, 32)).astype(np.float32)}
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(got, x["input"] @ weight, rtol=0.02)


def test_the_ini_key_and_the_flag_turn_it_off(tmp_path, capsys):
    from lowbit.cli import main

    src = save(saturating_model(), tmp_path / "m.onnx")
    data = tmp_path / "calib"
    data.mkdir()
    for i, feed in enumerate(positive_feeds(16, 0)):
        np.save(data / f"{i}.npy", feed["input"])
    config = tmp_path / "q.cfg"
    config.write_text("[common_quant_param]\nquant_type=FULL_QUANT\n[full_quant_param]\nsaturation_safe_weights=false\n")
    assert main(["quantize", str(src), "-o", str(tmp_path / "ini.onnx"), "--data", str(data),
                 "--config", str(config)]) == 0
    assert "kept within" not in capsys.readouterr().out
    assert main(["quantize", str(src), "-o", str(tmp_path / "on.onnx"), "--data", str(data)]) == 0
    assert "kept within" in capsys.readouterr().out
    assert main(["quantize", str(src), "-o", str(tmp_path / "flag.onnx"), "--data", str(data),
                 "--no-saturation-safe-weights"]) == 0
    assert "kept within" not in capsys.readouterr().out
