"""Scales, zero points, rounding and clipping against values computed by hand."""

import numpy as np
import pytest

from lowbit.quantizers.qparams import INT8, INT32, UINT8, QuantScheme, compute_qparams


def test_asymmetric_uint8_by_hand():
    # range [-1, 3]: scale = 4 / 255, zero point = round(0 - (-1) / (4/255)) = round(63.75) = 64
    q = compute_qparams(-1.0, 3.0, QuantScheme(UINT8, symmetric=False))
    assert q.scale == pytest.approx(np.float32(4 / 255))
    assert int(q.zero_point) == 64
    assert q.zero_point.dtype == np.uint8


def test_range_is_widened_to_include_zero():
    # [2, 10] becomes [0, 10]: scale 10/255, zero point 0, so 0.0 is exact
    q = compute_qparams(2.0, 10.0, QuantScheme(UINT8, symmetric=False))
    assert q.scale == pytest.approx(np.float32(10 / 255))
    assert int(q.zero_point) == 0
    assert q.dequantize(q.quantize(np.array([0.0], np.float32)))[0] == 0.0


def test_zero_exactly_representable_for_any_range():
    for lo, hi in [(-0.3, 7.1), (-5.0, 0.01), (-1e-3, 1e3)]:
        q = compute_qparams(lo, hi, QuantScheme(UINT8, symmetric=False))
        assert q.dequantize(q.quantize(np.zeros(3, np.float32))).tolist() == [0.0, 0.0, 0.0]


def test_symmetric_int8_narrow_range_weights():
    # absmax 2.54 -> scale 2.54 / 127 = 0.02; -2.54 maps to -127, never -128
    scheme = QuantScheme(INT8, symmetric=True, narrow_range=True)
    q = compute_qparams(-2.54, 1.0, scheme)
    assert q.scale == pytest.approx(0.02)
    assert int(q.zero_point) == 0
    assert q.quantize(np.array([-2.54, -10.0, 2.54, 0.011, 0.009], np.float32)).tolist() == [-127, -127, 127, 1, 0]


def test_symmetric_uint8_centres_the_zero_point():
    q = compute_qparams(-1.0, 1.0, QuantScheme(UINT8, symmetric=True))
    assert int(q.zero_point) == 128
    assert q.scale == pytest.approx(1 / 127)


def test_round_half_to_even_like_quantize_linear():
    q = compute_qparams(-127.0, 127.0, QuantScheme(INT8, symmetric=True, narrow_range=True))  # scale 1
    assert q.quantize(np.array([0.5, 1.5, 2.5, -0.5, -1.5], np.float32)).tolist() == [0, 2, 2, 0, -2]


def test_clipping_to_the_range():
    q = compute_qparams(0.0, 2.55, QuantScheme(UINT8, symmetric=False))  # scale 0.01
    assert q.quantize(np.array([-1.0, 3.0, 1.234], np.float32)).tolist() == [0, 255, 123]


def test_per_channel_along_axis():
    w = np.array([[[-1.0, 0.5]], [[0.021, -0.04]]], np.float32)  # 2 channels on axis 0
    lo, hi = w.min(axis=(1, 2)), w.max(axis=(1, 2))
    q = compute_qparams(lo, hi, QuantScheme(INT8, symmetric=True, axis=0, narrow_range=True))
    assert q.scale.tolist() == pytest.approx([1 / 127, 0.04 / 127])
    # 0.5 * 127 = 63.5 -> 64 (half to even); 0.021 / (0.04 / 127) = 66.7 -> 67
    assert q.quantize(w).tolist() == [[[-127, 64]], [[67, -127]]]


def test_all_zero_tensor_gets_scale_one():
    q = compute_qparams(np.zeros(3), np.zeros(3), QuantScheme(INT8, symmetric=True, axis=0))
    assert q.scale.tolist() == [1.0, 1.0, 1.0]


def test_int32_bias_type():
    assert (INT32.qmin, INT32.qmax) == (-(2**31), 2**31 - 1)
    assert (UINT8.qmin, UINT8.qmax, INT8.qmin, INT8.qmax) == (0, 255, -128, 127)
