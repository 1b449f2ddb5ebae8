"""AdaRound: learned up/down rounding on the layer's input second moment, refining GPTQ's choices."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import lowbit
from bench import zoo
from lowbit.recovery.adaround import adaround
from lowbit.recovery.gptq import gptq_round, output_error


def correlated_layer(groups: int, outputs: int, inputs: int, bits: int, seed: int = 0):
    """A layer whose inputs are correlated neighbours (as image patches are), on a symmetric grid of ``bits``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4096, inputs))
    x = x + 0.8 * np.roll(x, 1, 1) + 0.5 * np.roll(x, 3, 1)
    covariance = np.broadcast_to((x.T @ x / len(x))[None], (groups, inputs, inputs)).copy()
    weights = rng.normal(size=(groups, outputs, inputs)) * 0.1
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(weights).max(-1) / qmax
    return weights, covariance, scale, np.zeros((groups, outputs)), -qmax, qmax


@pytest.mark.parametrize("shape", [(1, 64, 144, 4), (32, 1, 9, 4), (1, 64, 144, 8), (1, 64, 288, 3)])
def test_adaround_beats_nearest_and_gptq_on_the_same_grid(shape):
    weights, covariance, scale, zero, qmin, qmax = correlated_layer(*shape)

    def error(q):
        return output_error(weights, (q - zero[..., None]) * scale[..., None], covariance)

    nearest = np.clip(np.rint(weights / scale[..., None]), qmin, qmax)
    gptq = gptq_round(weights, covariance, scale, zero, qmin, qmax)
    learned = adaround(weights, covariance, scale, zero, qmin, qmax, start=gptq)
    assert learned.min() >= qmin and learned.max() <= qmax
    assert np.all(np.abs(learned - weights / scale[..., None]) < 1 + 1e-9)  # each weight rounds up or down
    assert error(learned) < error(gptq) < error(nearest)


def test_adaround_from_nearest_lowers_the_error_of_nearest():
    weights, covariance, scale, zero, qmin, qmax = correlated_layer(1, 32, 72, 4, seed=3)
    nearest = np.clip(np.rint(weights / scale[..., None]), qmin, qmax)
    learned = adaround(weights, covariance, scale, zero, qmin, qmax)

    def error(q):
        return output_error(weights, q * scale[..., None], covariance)

    assert error(learned) < error(nearest)


def test_weight_rounding_adaround_on_the_digit_cnn(tmp_path):
    cells, _ = zoo.opencv_digits()
    order = np.random.default_rng(0).permutation(len(cells))
    calib = [{"input": zoo.digit_input(cells[i])} for i in order[:64]]
    src = zoo.digit_cnn("torchscript")
    gptq = lowbit.quantize(src, tmp_path / "g.onnx", data=calib, weight_bit_num=4, progress=False)
    learned = lowbit.quantize(src, tmp_path / "a.onnx", data=calib, weight_bit_num=4, weight_rounding="ADAROUND",
                              progress=False)
    onnx.checker.check_model(str(tmp_path / "a.onnx"), full_check=True)
    assert learned.weight_rounding.method == "GPTQ + AdaRound" and gptq.weight_rounding.method == "GPTQ"
    assert learned.weight_rounding.error_compensated < gptq.weight_rounding.error_compensated
    assert "weight rounding: GPTQ + AdaRound" in learned.summary()
