"""Error-compensating weight rounding (GPTQ) and the layer-input moments it (and bias correction) reads."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import float_input, make_model, producers, run, save
from onnx import helper, numpy_helper

import lowbit
from lowbit.calibration.layer_inputs import ConvGeometry, LayerInputObserver
from lowbit.recovery.gptq import gptq_round, output_error


def test_two_correlated_inputs_by_hand():
    # H = [[1, .9], [.9, 1]]: the two inputs move together. Round to nearest takes w = (.3, .3) to
    # (0, 0). GPTQ rounds w0 to 0 (error +.3), then moves w1 by -H^-1_01 / H^-1_00 * .3 = .9 * .3 = .27
    # to .57, which rounds to 1. Output error e^T H e: nearest (.3, .3) -> .09 + .09 + 2*.9*.09 = .342;
    # GPTQ (.3, -.7) -> .09 + .49 - 2*.9*.21 = .202.
    h = np.array([[[1.0, 0.9], [0.9, 1.0]]])
    w = np.array([[[0.3, 0.3]]])
    q = gptq_round(w, h, scale=np.ones((1, 1)), zero_point=np.zeros((1, 1)), qmin=-127, qmax=127, damping=0.0)
    assert q.tolist() == [[[0, 1]]]
    assert output_error(w, np.zeros_like(w), h) == pytest.approx(0.342 / (0.09 + 0.09 + 2 * 0.9 * 0.09))
    assert output_error(w, q.astype(float), h) == pytest.approx(0.202 / 0.342)


def test_a_scale_per_input_column_is_read_column_by_column():
    # The pair above with a grid per column, scales (1, 0.25): w0 = .3 rounds to 0 on its own grid (error .3),
    # w1 moves by .27 to .57, which is 2.28 steps of 0.25: 2. Reading column 0's scale for both gives 1;
    # reading 0.25 for both rounds w0 to 1 (.25), leaves .05, moves w1 to .345: 1.
    h = np.array([[[1.0, 0.9], [0.9, 1.0]]])
    w = np.array([[[0.3, 0.3]]])
    q = gptq_round(w, h, scale=np.array([[[1.0, 0.25]]]), zero_point=np.zeros((1, 1, 2)), qmin=-7, qmax=7,
                   damping=0.0)
    assert q.tolist() == [[[0, 2]]]


def test_uncorrelated_inputs_round_to_nearest_and_the_grid_is_kept():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 5, 6))
    scale = np.abs(w).max(axis=2) / 7
    h = np.stack([np.diag(rng.uniform(0.5, 2, 6)) for _ in range(2)])
    q = gptq_round(w, h, scale, np.zeros((2, 5)), -7, 7, damping=0.0)
    assert np.array_equal(q, np.clip(np.rint(w / scale[..., None]), -7, 7))
    zero = np.full((2, 5), 3.0)
    q = gptq_round(w, h, scale, zero, -8, 7)
    assert q.min() >= -8 and q.max() <= 7  # clipped to the integer range, zero point included


def test_gptq_beats_nearest_on_correlated_data():
    rng = np.random.default_rng(1)
    mixing = rng.normal(size=(16, 16))
    x = rng.normal(size=(4000, 16)) @ mixing  # correlated inputs, as neighbouring pixels are
    h = (x.T @ x / len(x))[None]
    w = rng.normal(size=(1, 8, 16))
    scale = np.abs(w).max(axis=2) / 15  # 5 bits: a coarse grid
    nearest = np.clip(np.rint(w / scale[..., None]), -15, 15) * scale[..., None]
    q = gptq_round(w, h, scale, np.zeros((1, 8)), -15, 15)
    assert output_error(w, q * scale[..., None], h) < 0.5 * output_error(w, nearest, h)


def naive_patches(x, kernel, group, strides, pads, dilations):
    """im2col written out with loops: rows of (channels in group, kh, kw) per output position."""
    n, c, height, width = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    kh, kw = kernel
    out_h = (height + pads[0] + pads[2] - (kh - 1) * dilations[0] - 1) // strides[0] + 1
    out_w = (width + pads[1] + pads[3] - (kw - 1) * dilations[1] - 1) // strides[1] + 1
    per = c // group
    rows = [[] for _ in range(group)]
    for b in range(n):
        for i in range(out_h):
            for j in range(out_w):
                for g in range(group):
                    patch = [padded[b, g * per + ch, i * strides[0] + a * dilations[0], j * strides[1] + e * dilations[1]]
                             for ch in range(per) for a in range(kh) for e in range(kw)]
                    rows[g].append(patch)
    return [np.array(r) for r in rows]


@pytest.mark.parametrize("geometry", [
    ConvGeometry((3, 3), group=2, strides=(2, 1), pads=(1, 0, 1, 2), dilations=(1, 2)),
    ConvGeometry((3, 3), group=4, strides=(1, 1), pads=(1, 1, 1, 1)),  # depthwise
    ConvGeometry((5, 5), group=4, strides=(3, 2), pads=(4, 0, 1, 5)),  # pads wider than a stride
    ConvGeometry((1, 1)),
])
def test_conv_moments_match_explicit_patches(geometry):
    rng = np.random.default_rng(2)
    batches = [rng.normal(size=(2, 4, 7, 6)).astype(np.float32) for _ in range(2)]
    # every patch kept (rows_per_sample above the 42 positions), so the moments are exact
    observer, other = (LayerInputObserver(geometry, rows_per_sample=1000) for _ in range(2))
    observer.update(batches[0])
    other.update(batches[1])
    observer.merge(other)  # statistics of two workers add up
    rows = naive_patches(np.concatenate(batches), geometry.kernel, geometry.group, geometry.strides,
                         geometry.pads, geometry.dilations)
    np.testing.assert_allclose(observer.covariance(), np.stack([r.T @ r / len(r) for r in rows]), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(observer.mean(), np.stack([r.mean(axis=0) for r in rows]), rtol=1e-5, atol=1e-6)


def test_second_moments_read_a_fixed_subset_of_patches():
    # a 3x3 conv over 4 channels: D = 36 values a patch, so 36 of the 20 x 20 = 400 positions a sample
    geometry = ConvGeometry((3, 3), pads=(1, 1, 1, 1))
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 4, 20, 20)).astype(np.float32)
    observer = LayerInputObserver(geometry)
    observer.update(x)
    assert observer.rows == 3 * 36 and observer.first_rows == 3 * 400  # the mean still reads every patch
    kept = np.sort(np.random.default_rng(400).choice(400, 36, replace=False))
    rows = [r[np.concatenate([kept + 400 * i for i in range(3)])]
            for r in naive_patches(x, (3, 3), 1, (1, 1), (1, 1, 1, 1), (1, 1))]
    np.testing.assert_allclose(observer.covariance(), np.stack([r.T @ r / len(r) for r in rows]), rtol=1e-5,
                               atol=1e-6)
    # the same positions for every sample: one sample at a time gives the same sums
    one_by_one = LayerInputObserver(geometry)
    for sample in x:
        one_by_one.update(sample[np.newaxis])
    np.testing.assert_allclose(one_by_one.covariance(), observer.covariance(), rtol=1e-6)


def test_conv1d_is_a_conv2d_of_height_one():
    geometry = ConvGeometry((1, 3), strides=(1, 2), pads=(0, 1, 0, 1))
    x = np.arange(2 * 2 * 9, dtype=np.float32).reshape(2, 2, 9)  # (samples, channels, length)
    observer = LayerInputObserver(geometry, rows_per_sample=1000)
    observer.update(x)
    rows = naive_patches(x[:, :, np.newaxis], (1, 3), 1, (1, 2), (0, 1, 0, 1), (1, 1))[0]
    np.testing.assert_allclose(observer.mean()[0], rows.mean(axis=0))
    np.testing.assert_allclose(observer.covariance()[0], rows.T @ rows / len(rows))


def test_matrix_moments_read_the_last_axis():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    observer = LayerInputObserver()
    observer.update(x)
    rows = x.reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(observer.covariance()[0], rows.T @ rows / 6)
    np.testing.assert_allclose(observer.mean()[0], rows.mean(axis=0))


def test_huge_inputs_are_summed_in_float64():
    x = np.full((1, 1, 4), 1e30, dtype=np.float32)  # 1e60 overflows float32
    observer = LayerInputObserver()
    observer.update(x)
    assert observer.finite() and observer.covariance()[0, 0, 0] == pytest.approx(1e60)


def correlated_conv_model():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(8, 4, 3, 3)).astype(np.float32) * 0.2
    gemm_w = rng.normal(size=(8 * 6 * 6, 10)).astype(np.float32) * 0.05
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[0, 0, 0, 0]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "gw"], ["output"], name="fc")]
    return make_model(nodes, [float_input("input", ["N", 4, 8, 8])], [float_input("output", ["N", 10])],
                      [("w", w), ("gw", gemm_w)])


def smooth_feeds(n, seed):
    """Images whose neighbouring pixels are correlated (blurred noise), like photos."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(size=(1, 4, 10, 10))
        x = (x[:, :, :-2, :-2] + x[:, :, 1:-1, 1:-1] + x[:, :, 2:, 2:] + x[:, :, 1:-1, :-2]) / 2
        out.append({"input": x.astype(np.float32)})
    return out


def test_full_quantization_rounds_with_gptq_by_default(tmp_path):
    src = save(correlated_conv_model(), tmp_path / "m.onnx")
    calib, held_out = smooth_feeds(32, 0), smooth_feeds(16, 1)
    nearest = lowbit.quantize(src, tmp_path / "n.onnx", data=calib, weight_rounding="NEAREST",
                              bias_correction=False, progress=False)
    gptq = lowbit.quantize(src, tmp_path / "g.onnx", data=calib, bias_correction=False, progress=False)
    assert nearest.weight_rounding is None
    report = gptq.weight_rounding
    assert report.layers == 2 and report.samples == 32
    onnx.checker.check_model(str(tmp_path / "g.onnx"), full_check=True)

    def weights(path):
        model = onnx.load(str(path))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        dq = producers(model)[next(n for n in model.graph.node if n.name == "conv").input[1]]
        return inits[dq.input[0]], inits[dq.input[1]]

    (q_n, s_n), (q_g, s_g) = weights(tmp_path / "n.onnx"), weights(tmp_path / "g.onnx")
    assert q_g.dtype == np.int8 and np.array_equal(s_n, s_g)  # same grid, other integers
    assert not np.array_equal(q_n, q_g) and q_g.min() >= -127

    def error(path):
        return np.mean([np.mean((run(path, f)[0] - run(src, f)[0]) ** 2) for f in held_out])

    assert error(tmp_path / "g.onnx") < error(tmp_path / "n.onnx")
    assert "weight rounding: GPTQ" in gptq.summary()


def test_weight_rounding_needs_calibration_data(tmp_path):
    with pytest.raises(lowbit.LowbitError, match="weight_rounding=GPTQ measures layer inputs"):
        lowbit.load_config(None, {"quant_type": "DYNAMIC_QUANT", "weight_rounding": "GPTQ"})
    assert lowbit.load_config(None, {"quant_type": "DYNAMIC_QUANT"}).weight_rounding == "NEAREST"
    assert lowbit.load_config(None, {"quant_type": "WEIGHT_QUANT"}).weight_rounding == "NEAREST"
    src = save(correlated_conv_model(), tmp_path / "m.onnx")
    with pytest.warns(lowbit.LowbitWarning, match="none was given: weights are rounded to nearest"):
        result = lowbit.quantize(src, tmp_path / "w.onnx", quant_type="WEIGHT_QUANT", bit_num=4,
                                 weight_rounding="GPTQ", min_quant_weight_channel=0, progress=False)
    assert result.weight_rounding is None


@pytest.mark.parametrize("bits", [2, 4])
def test_weight_only_rounds_with_gptq_when_data_is_given(tmp_path, bits):
    """The digit CNN on 500 held-out digits; measured: 2 bits, output cosine 0.947 (nearest) -> 0.959 (GPTQ);
    4 bits, 0.99875 -> 0.99956."""
    from bench import zoo

    cells, _ = zoo.opencv_digits()
    order = np.random.default_rng(0).permutation(len(cells))
    calib = [{"input": zoo.digit_input(cells[i])} for i in order[:64]]
    x = np.concatenate([zoo.digit_input(cells[i]) for i in order[1000:1500]])
    src = zoo.digit_cnn("torchscript")
    settings = dict(quant_type="WEIGHT_QUANT", bit_num=bits, progress=False)
    nearest = lowbit.quantize(src, tmp_path / "n.onnx", data=calib, **settings)
    gptq = lowbit.quantize(src, tmp_path / "g.onnx", data=calib, weight_rounding="GPTQ", **settings)
    assert nearest.weight_rounding is None and gptq.weight_rounding.layers == 4  # the 10-class Gemm stays float
    assert gptq.weight_rounding.error_compensated < gptq.weight_rounding.error_nearest
    onnx.checker.check_model(str(tmp_path / "g.onnx"), full_check=True)

    def integer_constants(path):
        return {t.name: (t.data_type, tuple(t.dims)) for t in onnx.load(str(path)).graph.initializer
                if t.data_type != onnx.TensorProto.FLOAT}

    assert integer_constants(tmp_path / "g.onnx") == integer_constants(tmp_path / "n.onnx")  # same grid and types
    reference = run(src, {"input": x})[0]

    def cosine(path):
        out = run(path, {"input": x})[0]
        return np.mean((out * reference).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(reference, axis=1))

    assert cosine(tmp_path / "g.onnx") > cosine(tmp_path / "n.onnx")


def reference_gptq(w, h, scale, qmin, qmax, damping=0.01):
    """GPTQ as Optimal Brain Quantization writes it, one weight at a time with the explicit inverse
    (Frantar et al., eq. 2-3): no Cholesky factor, no lazy blocks; integers of one output row."""
    h = h + damping * np.mean(np.diag(h)) * np.eye(len(h))
    inverse = np.linalg.inv(h)
    w = w.astype(np.float64).copy()
    q = np.zeros(len(w), dtype=np.int64)
    for i in range(len(w)):
        q[i] = np.clip(np.rint(w[i] / scale), qmin, qmax)
        error = (w[i] - q[i] * scale) / inverse[i, i]
        w[i + 1:] -= error * inverse[i, i + 1:]
        inverse = inverse - np.outer(inverse[:, i], inverse[i, :]) / inverse[i, i]
    return q


def test_written_integers_equal_an_independent_gptq(tmp_path):
    """The conv's int8 weights in the written model equal GPTQ computed here from scratch: the second
    moment of the explicit patches of the *quantized* input over the calibration samples, then the
    one-weight-at-a-time update with the explicit inverse."""
    src = save(correlated_conv_model(), tmp_path / "m.onnx")
    calib = smooth_feeds(32, 0)
    # saturation_safe_weights off: the independent GPTQ here knows nothing of the weight pairs' bound
    lowbit.quantize(src, tmp_path / "g.onnx", data=calib, bias_correction=False, activation_quant_method="MAX_MIN",
                    saturation_safe_weights=False, progress=False)
    model = onnx.load(str(tmp_path / "g.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.name == "conv")
    x_dq, w_dq = producers(model)[conv.input[0]], producers(model)[conv.input[1]]
    x_scale, x_zero = float(inits[x_dq.input[1]]), int(inits[x_dq.input[2]])
    written, w_scale = inits[w_dq.input[0]], inits[w_dq.input[1]]

    x = np.concatenate([f["input"] for f in calib]).astype(np.float32)
    x_q = (np.clip(np.rint(x / np.float32(x_scale)) + x_zero, 0, 255) - x_zero) * np.float32(x_scale)
    patches = naive_patches(x_q, (3, 3), 1, (1, 1), (0, 0, 0, 0), (1, 1))[0]
    h = patches.T @ patches / len(patches)
    float_w = numpy_helper.to_array(next(t for t in onnx.load(str(src)).graph.initializer if t.name == "w"))
    expected = np.stack([reference_gptq(row, h, float(s), -127, 127)
                         for row, s in zip(float_w.reshape(8, -1), w_scale)])
    nearest = np.clip(np.rint(float_w.reshape(8, -1) / w_scale[:, None]), -127, 127)
    assert not np.array_equal(expected, nearest)  # the case is one where GPTQ moves integers
    np.testing.assert_array_equal(written.reshape(8, -1), expected)


def two_conv_chain():
    rng = np.random.default_rng(5)
    w1 = rng.normal(size=(4, 4, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.normal(size=(6, 4, 3, 3)).astype(np.float32) * 0.2
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c1", "w2"], ["output"], name="conv2", pads=[0, 0, 0, 0])]
    return make_model(nodes, [float_input("input", ["N", 4, 8, 8])], [float_input("output", ["N", 6, 6, 6])],
                      [("w1", w1), ("w2", w2)])


def test_each_layer_is_rounded_on_the_inputs_the_layers_before_it_were_rounded_to(tmp_path):
    """Layer after layer: conv2's integers equal GPTQ on the second moment of its input computed here from
    conv1's *written* (GPTQ-rounded) weights, and differ from GPTQ on the input that conv1's weights rounded to
    nearest would give (what one run over the data for every layer measured). 4-bit weights: at 8 bits the two
    inputs are too close for conv2's integers to differ in this small case."""
    src = save(two_conv_chain(), tmp_path / "m.onnx")
    calib = smooth_feeds(32, 0)
    result = lowbit.quantize(src, tmp_path / "g.onnx", data=calib, bias_correction=False, weight_bit_num=4,
                             activation_quant_method="MAX_MIN", progress=False)
    assert "weight rounding: GPTQ on 2 layers in 2 stages" in result.summary()
    assert "round_weights (quantized model, 32 samples, 2 stages)" in result.summary()
    assert [p.what for p in result.data_passes if p.model == "quantized model"] == \
        ["round_weights", "round_weights (stage 2 of 2)"]
    model = onnx.load(str(tmp_path / "g.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    made = producers(model)
    nodes = {n.name: n for n in model.graph.node}
    w1_dq = made[nodes["conv1"].input[1]]
    c1_dq, w2_dq = made[nodes["conv2"].input[0]], made[nodes["conv2"].input[1]]
    w1_scale, w2_scale = inits[w1_dq.input[1]], inits[w2_dq.input[1]]
    float_w1, float_w2 = (numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer)

    def conv2_integers(w1_integers):
        """GPTQ of conv2 on its input as ONNX Runtime computes it with conv1's integers set to these (run
        here, not recomputed in numpy: which side of a rounding tie a value falls on is the CPU kernel's)."""
        probe = onnx.load(str(tmp_path / "g.onnx"))
        for init in probe.graph.initializer:
            if init.name == w1_dq.input[0]:
                init.CopyFrom(helper.make_tensor(init.name, init.data_type, init.dims,
                                                 w1_integers.astype(np.int64).reshape(-1).tolist()))
        probe.graph.output.append(helper.make_tensor_value_info(c1_dq.output[0], onnx.TensorProto.FLOAT, None))
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        c1_q = np.concatenate([session.run([c1_dq.output[0]], f)[0] for f in calib])
        patches = naive_patches(c1_q, (3, 3), 1, (1, 1), (0, 0, 0, 0), (1, 1))[0]
        h = patches.T @ patches / len(patches)
        return np.stack([reference_gptq(row, h, float(s), -7, 7)
                         for row, s in zip(float_w2.reshape(6, -1), w2_scale)])

    written_w1 = inits[w1_dq.input[0]].astype(np.float64)
    nearest_w1 = np.clip(np.rint(float_w1 / w1_scale[:, None, None, None]), -7, 7)
    assert not np.array_equal(written_w1, nearest_w1)
    staged, one_run = conv2_integers(written_w1), conv2_integers(nearest_w1)
    assert not np.array_equal(staged, one_run)  # the case is one where the stage matters
    written = inits[w2_dq.input[0]].astype(np.int64).reshape(6, -1)
    # The second moment summed in float32 by the observer and in float64 here can put one weight of a row on
    # the other side of a rounding tie (seen on an AVX2 CPU, not on an AVX-512 one), and GPTQ carries that
    # row's change on to the weights after it; the other rows are equal, and the staged input explains the
    # written integers far better than one run's does.
    differing_rows = np.flatnonzero(np.any(written != staged, axis=1))
    assert len(differing_rows) <= 1
    assert np.sum(written != staged) * 2 < np.sum(staged != one_run)


def test_stages_follow_the_graph():
    """A layer's stage is one more than the latest of the layers upstream of it; branches share a stage."""
    import onnx_ir as ir

    from lowbit.recovery.layers import LayerJob, in_stages

    w = np.ones((2, 2, 1, 1), np.float32)
    nodes = [helper.make_node("Conv", ["input", "w"], ["a"], name="a"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w"], ["b"], name="b"),
             helper.make_node("Conv", ["r", "w"], ["c"], name="c"),
             helper.make_node("Add", ["b", "input"], ["s"], name="add"),
             helper.make_node("Conv", ["s", "w"], ["d"], name="d"),
             helper.make_node("Add", ["d", "c"], ["output"], name="out")]
    model = ir.serde.deserialize_model(make_model(nodes, [float_input("input", [1, 2, 2, 2])],
                                                  [float_input("output", [1, 2, 2, 2])], [("w", w)]))
    convs = [node for node in model.graph if node.op_type == "Conv"]
    job = LayerJob([(type("L", (), {"node": n})(), (n.name, None)) for n in reversed(convs)],
                   {(n.name, None): n.name for n in convs})
    stages = in_stages(job, model.graph)
    assert [[layer.node.name for layer, _ in stage.layers] for stage in stages] == [["a"], ["c", "b"], ["d"]]
    assert [list(stage.observers.values()) for stage in stages] == [["a"], ["c", "b"], ["d"]]
