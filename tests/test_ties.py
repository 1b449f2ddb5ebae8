"""Graph inputs off the rounding ties of their grid: the rule by hand, and in a quantized model."""

import json

import numpy as np
import onnx
from conftest import conv_relu_pool_model, float_input, make_model, run, save
from onnx import helper, numpy_helper

import lowbit
from lowbit.quantizers.qparams import UINT8, QParams, QuantScheme
from lowbit.quantizers.ties import WIDENINGS, as_recorded, off_ties, tied_share

PIXELS = np.arange(256)
NORMALISED = ((PIXELS - 127.5) / 127.5).astype(np.float32)  # (p - 127.5) / 127.5: half a spacing off zero
COUNTS = np.ones(256, np.int64)


def uint8_qparams(scale: float, zero_point: int) -> QParams:
    return QParams(np.array(scale, np.float32), np.array(zero_point, np.uint8), QuantScheme(UINT8, symmetric=False))


def pixel_feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Random 8-bit images normalised as (p - 127.5) / 127.5, for the 3-channel input of conv_relu_pool_model."""
    rng = np.random.default_rng(seed)
    return [{"input": ((rng.integers(0, 256, size=(1, 3, 8, 8)) - 127.5) / 127.5).astype(np.float32)}
            for _ in range(count)]


def test_normalised_pixels_sit_on_ties_of_the_minus_one_to_one_grid_and_a_wider_scale_rounds_them_toward_zero():
    on_ties = uint8_qparams(2 / 255, 128)  # MAX_MIN of [-1, 1]: every value is k + 1/2 steps from zero
    assert tied_share(on_ties, NORMALISED, COUNTS) == 1.0
    # round half to even (and the last bit of each float32 quotient) sends pixels of the same sign half a
    # step down or up, from one pixel value to the next: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2 ...
    moves = on_ties.quantize(NORMALISED[128:255]).astype(int) - 128 - (PIXELS[128:255] - 127.5)
    assert set(moves.tolist()) == {-0.5, 0.5}
    assert moves[:3].tolist() == [-0.5, 0.5, -0.5]

    moved = off_ties(on_ties, NORMALISED, COUNTS)
    assert float(moved.scale) == np.float32(np.float32(2 / 255) * WIDENINGS[0])  # the first widening is enough
    assert moved.zero_point == on_ties.zero_point
    assert tied_share(moved, NORMALISED, COUNTS) == 0.0
    # every pixel now goes toward zero by half a step: p - 127.5 -> p - 128 above the middle, p - 127 below
    toward_zero = np.where(PIXELS >= 128, PIXELS - 128, PIXELS - 127)
    np.testing.assert_array_equal(moved.quantize(NORMALISED).astype(int) - 128, toward_zero)


def test_values_off_ties_keep_their_scale():
    unit = ((PIXELS / 255.0).astype(np.float32))  # p / 255 on the grid of [0, 1]: each value is a level
    qparams = uint8_qparams(1 / 255, 0)
    assert tied_share(qparams, unit, COUNTS) == 0.0
    assert off_ties(qparams, unit, COUNTS) is qparams
    few = uint8_qparams(2 / 255, 128)  # one tied value in 256 is under TIED_SHARE: left alone
    mixed = np.array([0.5 * np.float32(2 / 255), 0.3], np.float32)
    assert off_ties(few, mixed, np.array([1, 255])) is few


def test_a_quantized_image_input_is_kept_off_the_ties_and_the_summary_says_so(tmp_path):
    feeds = pixel_feeds(8, seed=0)
    for feed in feeds:  # every sample reaches both ends, so MAX_MIN's range is [-1, 1]
        feed["input"][0, 0, 0, :2] = [-1.0, 1.0]
    path = save(conv_relu_pool_model(), tmp_path / "float.onnx")
    result = lowbit.quantize(path, tmp_path / "int8.onnx", data=feeds, progress=False,
                             activation_quant_method="MAX_MIN")
    model = onnx.load(str(tmp_path / "int8.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quantize = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    written = uint8_qparams(float(inits[quantize.input[1]]), int(inits[quantize.input[2]]))
    assert float(written.scale) == np.float32(np.float32(2 / 255) * WIDENINGS[0])
    assert tied_share(written, NORMALISED, COUNTS) == 0.0
    assert "input: 100% of its calibration values lie on rounding ties" in result.summary()
    # computed activations (continuous) are never checked: they keep MAX_MIN's scale
    computed = [report for name, report in result.tensors.items() if name != "input"]
    assert computed and all(report.scale == np.float32((report.max - min(report.min, 0)) / 255) for report in computed)


def test_onnx_runtime_rounds_as_tied_share_assumes(tmp_path):
    """The rule models QuantizeLinear as float32 x / scale rounded half to even; ONNX Runtime agrees."""
    for qparams in (uint8_qparams(2 / 255, 128), off_ties(uint8_qparams(2 / 255, 128), NORMALISED, COUNTS)):
        model = make_model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])], [float_input("x", [256])],
                           [helper.make_tensor_value_info("q", onnx.TensorProto.UINT8, [256])],
                           [("s", qparams.scale), ("z", qparams.zero_point)])
        got = run(save(model, tmp_path / "q.onnx"), {"x": NORMALISED})[0]
        np.testing.assert_array_equal(got, qparams.quantize(NORMALISED))


def test_the_accuracy_search_builds_candidates_that_read_the_input_in_float(tmp_path):
    """Candidates of the precision search may leave the input's reader float: then the input has no grid."""
    feeds = pixel_feeds(16, seed=1)
    path = save(conv_relu_pool_model(), tmp_path / "float.onnx")
    result = lowbit.quantize(path, tmp_path / "int8.onnx", data=feeds, progress=False,
                             accuracy_target="cosine>=0.999999", max_evaluations=4)
    assert result.accuracy.evaluations >= 2
    onnx.checker.check_model(str(tmp_path / "int8.onnx"), full_check=True)


def test_a_lowbit_table_brings_the_widened_scale_back_and_a_range_edited_by_hand_wins(tmp_path):
    """The table's range gives MAX_MIN's scale; only the recorded scale says the rule widened it."""
    feeds = pixel_feeds(8, seed=0)
    for feed in feeds:
        feed["input"][0, 0, 0, :2] = [-1.0, 1.0]
    path = save(conv_relu_pool_model(), tmp_path / "float.onnx")
    table = tmp_path / "table.json"
    lowbit.quantize(path, tmp_path / "a.onnx", data=feeds, progress=False, activation_quant_method="MAX_MIN",
                    calibration_table_out=str(table))
    lowbit.quantize(path, tmp_path / "b.onnx", data=feeds, progress=False, calibration_table=str(table))
    widened = np.float32(np.float32(2 / 255) * WIDENINGS[0])
    assert _input_scale(tmp_path / "a.onnx") == _input_scale(tmp_path / "b.onnx") == widened

    edited = json.loads(table.read_text())
    edited["tensors"]["input"].update(min=-2.0, max=2.0)  # the user's own range; the old scale is not its widening
    table.write_text(json.dumps(edited))
    lowbit.quantize(path, tmp_path / "c.onnx", data=feeds, progress=False, calibration_table=str(table))
    assert _input_scale(tmp_path / "c.onnx") == np.float32(4 / 255)


def test_a_recorded_scale_is_taken_only_as_a_widening_of_the_ranges_own():
    own = uint8_qparams(2 / 255, 128)
    widened = np.float32(np.float32(2 / 255) * WIDENINGS[2])
    assert as_recorded(own, float(widened)).scale == widened
    assert as_recorded(own, float(own.scale)) is own  # not widened: the range's own
    assert as_recorded(own, 2.5 / 255) is own  # no widening of the rule: a range edited by hand
    assert as_recorded(own, float(np.float32(2 / 255) * 1.5)) is own


def _input_scale(path) -> np.float32:
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quantize = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    return inits[quantize.input[1]].astype(np.float32)[()]
