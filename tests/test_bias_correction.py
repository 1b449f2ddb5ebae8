"""Empirical bias correction: the output shift caused by weight rounding is measured and removed."""

import numpy as np
import onnx
from conftest import float_input, make_model, producers, run, save
from onnx import helper, numpy_helper

import lowbit


def shifted_model(with_bias: bool):
    # Channel 0 of the output reads input channel 1 through a weight that rounds badly:
    # per-channel scale = 1 / 127, and 0.0049 becomes 1 / 127 = 0.00787 (+0.00297).
    w = np.array([[[[1.0]], [[0.0049]]], [[[0.5]], [[-0.25]]]], np.float32)  # 2 out, 2 in, 1x1
    inits = [("w", w)] + ([("b", np.array([0.1, -0.2], np.float32))] if with_bias else [])
    conv = helper.make_node("Conv", ["input", "w"] + (["b"] if with_bias else []), ["output"], name="conv")
    return make_model([conv], [float_input("input", ["N", 2, 4, 4])],
                      [float_input("output", ["N", 2, 4, 4])], inits)


def feeds(n, seed):
    rng = np.random.default_rng(seed)
    # input channel 1 around 100: the rounding error of 0.0049 shifts output channel 0 by about 0.3
    return [{"input": np.stack([rng.uniform(0, 1, (4, 4)), rng.uniform(90, 110, (4, 4))])[None].astype(np.float32)}
            for _ in range(n)]


def channel_shift(src, out, data):
    diffs = [run(out, f)[0] - run(src, f)[0] for f in data]
    return np.mean(diffs, axis=(0, 1, 3, 4))


def test_shift_is_removed_and_bias_added_where_missing(tmp_path):
    for with_bias in (True, False):
        src = save(shifted_model(with_bias), tmp_path / f"m{with_bias}.onnx")
        plain = lowbit.quantize(src, tmp_path / "plain.onnx", data=feeds(16, 0), bias_correction=False, progress=False)
        corrected = lowbit.quantize(src, tmp_path / "bc.onnx", data=feeds(16, 0), progress=False)
        assert plain.bias_correction is None and corrected.bias_correction.layers == 1
        held_out = feeds(8, 1)
        before = channel_shift(src, tmp_path / "plain.onnx", held_out)
        after = channel_shift(src, tmp_path / "bc.onnx", held_out)
        assert abs(before[0]) > 0.2  # the rounding error is real ...
        assert abs(after[0]) < abs(before[0]) / 10  # ... and the correction takes out most of it
        model = onnx.load(str(tmp_path / "bc.onnx"))
        conv = next(n for n in model.graph.node if n.name == "conv")
        bias_dq = producers(model)[conv.input[2]]
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        assert bias_dq.op_type == "DequantizeLinear" and inits[bias_dq.input[0]].dtype == np.int32


def test_dsp_corrects_too_unless_told_not_and_iterators_skip_it(tmp_path):
    src = save(shifted_model(True), tmp_path / "m.onnx")
    dsp = lowbit.quantize(src, tmp_path / "d.onnx", data=feeds(4, 0), target_device="DSP", progress=False)
    assert dsp.bias_correction is not None and dsp.bias_correction.layers == 1
    assert lowbit.quantize(src, tmp_path / "n.onnx", data=feeds(4, 0), target_device="DSP", bias_correction=False,
                           progress=False).bias_correction is None
    import pytest

    with pytest.warns(lowbit.LowbitWarning, match="bias_correction needs another pass"):
        result = lowbit.quantize(src, tmp_path / "i.onnx", data=iter(feeds(4, 0)), progress=False)
    assert result.bias_correction is None


def test_padded_strided_conv_mean_matches_float_on_the_calibration_data(tmp_path):
    # Weight-only 3-bit weights: the conv's input is the float input, so after correction the
    # mean of each output channel over the calibration samples must equal the float model's
    # exactly (the shift is (W_q - W) . mean patch, and padding zeros count in the mean patch).
    rng = np.random.default_rng(5)
    w = rng.normal(size=(24, 3, 3, 3)).astype(np.float32)  # over MindSpore's min_quant_weight_channel (16)
    conv = helper.make_node("Conv", ["input", "w", "b"], ["output"], name="conv", pads=[1, 0, 2, 1], strides=[2, 1])
    model = make_model([conv], [float_input("input", ["N", 3, 9, 8])], [float_input("output", ["N", 24, 5, 7])],
                       [("w", w), ("b", np.zeros(24, np.float32))])
    src = save(model, tmp_path / "m.onnx")
    data = [{"input": (rng.normal(size=(1, 3, 9, 8)) + 2).astype(np.float32)} for _ in range(12)]
    settings = dict(quant_type="WEIGHT_QUANT", bit_num=3, progress=False)
    plain = lowbit.quantize(src, tmp_path / "plain.onnx", **settings)
    corrected = lowbit.quantize(src, tmp_path / "bc.onnx", data=data, bias_correction=True, **settings)
    assert plain.bias_correction is None and corrected.bias_correction.layers == 1
    before = channel_shift(src, tmp_path / "plain.onnx", data)
    after = channel_shift(src, tmp_path / "bc.onnx", data)
    assert np.abs(before).max() > 0.05
    np.testing.assert_allclose(after, 0, atol=2e-5)
