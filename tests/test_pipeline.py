"""The pipeline of passes and the data engine: contracts, the runs over the data, and what they check."""

import numpy as np
import onnx
import pytest
from conftest import conv_relu_pool_model, float_input, make_model, random_feeds, save
from onnx import helper

import lowbit
from lowbit.cli import main
from lowbit.pipeline.full import full_quant
from lowbit.pipeline.passes import PipelineError, run_pipeline
from lowbit.pipeline.state import QuantState


def test_full_quantization_reads_the_data_three_times_and_says_so(tmp_path):
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    result = lowbit.quantize(src, tmp_path / "q.onnx", data=random_feeds(40), progress=False)
    assert [s.name for s in result.passes] == ["prepare", "plan", "order_channels", "candidates", "check_settings",
                                               "calibrate", "choose_ranges", "rewrite", "round_weights",
                                               "correct_biases", "saturation_safe_weights", "save", "speed_check"]
    runs = [(p.what, p.model, p.samples) for p in result.data_passes if p.over_calibration_data]
    # the search's float references ride on the calibration run: 35 statistics + 5 held-back samples
    assert runs == [("calibrate + choose_ranges", "float model", 40),
                    ("round_weights", "quantized model", 40),
                    ("correct_biases", "quantized model", 40)]
    assert result.calibration_samples == 35 and result.search.samples == 5
    assert "data: 3 runs over the calibration data" in result.summary()
    assert result.timings["calibrate"] > 0 and set(result.timings) == {s.name for s in result.passes}


def test_weight_only_reads_the_float_model_once_for_the_search_and_the_check(tmp_path):
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    result = lowbit.quantize(src, tmp_path / "q.onnx", data=random_feeds(20), quant_type="WEIGHT_QUANT", bit_num=0,
                             min_quant_weight_channel=0, progress=False)
    runs = [(p.what, p.model, p.samples) for p in result.data_passes if p.over_calibration_data]
    assert runs == [("probe", "float model", 16), ("correct_biases", "quantized model", 20)]
    assert result.mixed_bits is not None and result.output_cosine > 0.9


def test_a_pass_before_what_it_needs_is_a_pipeline_error(tmp_path):
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    passes = full_quant()
    rewrite = next(p for p in passes if p.name == "rewrite")
    passes.remove(rewrite)
    passes.insert(1, rewrite)  # the rewrite before the plan
    config = lowbit.load_config(None, {})
    state = QuantState(config, src, tmp_path / "q.onnx", note=print, progress=False, user_data=random_feeds(8))
    with pytest.raises(PipelineError, match="pass rewrite requires plan"):
        run_pipeline(passes, state)


def _chain(weights):
    """input -> Conv(w0) -> Conv(w1) -> ... -> output, 2 channels, 1x1 kernels."""
    nodes, inits, previous = [], [], "input"
    for i, w in enumerate(weights):
        out = "output" if i == len(weights) - 1 else f"c{i}"
        nodes.append(helper.make_node("Conv", [previous, f"w{i}"], [out], name=f"conv{i}"))
        inits.append((f"w{i}", w))
        previous = out
    return make_model(nodes, [float_input("input", [1, 2, 4, 4])], [float_input("output", [1, 2, 4, 4])], inits)


def test_an_activation_that_overflows_names_tensor_node_and_sample(tmp_path, capsys):
    """Finite but huge weights (a corrupted file) overflow to infinity two layers down."""
    huge = np.full((2, 2, 1, 1), 1e20, np.float32)
    src = save(_chain([huge, huge, np.eye(2, dtype=np.float32).reshape(2, 2, 1, 1)]), tmp_path / "m.onnx")
    feeds = random_feeds(4, shape=(1, 2, 4, 4))
    feeds[2]["input"] = np.abs(feeds[2]["input"]) + 1.0  # sample 3 overflows for sure
    for feed in feeds[:2] + feeds[3:]:
        feed["input"] *= 1e-30  # the others stay finite
    with pytest.raises(lowbit.LowbitError) as error:
        lowbit.quantize(src, tmp_path / "q.onnx", data=feeds, activation_quant_method="MAX_MIN", progress=False)
    message = str(error.value)
    assert "tensor 'c1'" in message and "node 'conv1', Conv" in message and "sample 3" in message
    assert not (tmp_path / "q.onnx").exists()
    code = main(["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--data", str(tmp_path)])
    assert code == 2


@pytest.mark.parametrize("layerwise", [False, True])
def test_huge_finite_weights_do_not_break_weight_rounding(tmp_path, layerwise):
    """One weight of 1e36: the activations stay finite, their squares do not fit in float32.

    GPTQ's second moments were inf and numpy raised LinAlgError; now they are summed in
    float64 where float32 overflows, and a statistic that still cannot be inverted falls
    back (more damping, then round to nearest), said in the summary. The layer-wise search's
    per-op sums of squares overflowed the same way (a NaN error) and are float64 too."""
    model = conv_relu_pool_model()
    weights = {t.name: t for t in model.graph.initializer}
    w1 = onnx.numpy_helper.to_array(weights["w1"]).copy()
    w1[0, 0, 0, 0] = 1e36
    weights["w1"].CopyFrom(onnx.numpy_helper.from_array(w1, "w1"))
    src = save(model, tmp_path / "m.onnx")
    result = lowbit.quantize(src, tmp_path / "q.onnx", data=random_feeds(16), progress=False,
                             layerwise_search=layerwise)
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    assert result.weight_rounding is not None
    for fallback in result.weight_rounding.fallbacks:
        assert f"fallback: {fallback}" in result.summary()


def test_gptq_falls_back_on_a_singular_statistic():
    from lowbit.recovery.gptq import _round_with_fallback

    class Layer:
        qmin, qmax, pairs = -127, 127, None

    rows = np.array([[[0.3, -0.2, 0.1]]])
    scale, zero = np.full((1, 1), 0.01), np.zeros((1, 1))
    q, damping = _round_with_fallback(rows, np.full((1, 3, 3), np.inf), scale, zero, Layer)
    assert q is None and damping == np.inf
    q, damping = _round_with_fallback(rows, np.eye(3)[None], scale, zero, Layer)
    assert damping == 0.01 and q.tolist() == [[[30, -20, 10]]]


def test_a_range_search_before_the_plan_names_what_it_misses(tmp_path):
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    passes = full_quant()
    ranges = next(p for p in passes if p.name == "choose_ranges")
    passes.remove(ranges)
    passes.insert(1, ranges)
    config = lowbit.load_config(None, {})
    state = QuantState(config, src, tmp_path / "q.onnx", note=print, progress=False, user_data=random_feeds(8))
    with pytest.raises(PipelineError, match="pass choose_ranges requires plan, observers, candidates"):
        run_pipeline(passes, state)


@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_batched_calibration_gives_the_same_model(tmp_path, batch_size):
    """Statistics samples run in batches, held-back ones one by one; the observers see the same values,
    so ranges, scales and integers match the sample-by-sample run (a free batch dimension)."""
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    feeds = random_feeds(40)
    one = lowbit.quantize(src, tmp_path / "one.onnx", data=feeds, progress=False)
    batched = lowbit.quantize(src, tmp_path / f"b{batch_size}.onnx", data=feeds, calibrate_batch_size=batch_size,
                              progress=False)
    assert batched.calibration_samples == one.calibration_samples == 35 and batched.search.samples == 5
    assert [(p.what, p.samples) for p in batched.data_passes] == [(p.what, p.samples) for p in one.data_passes]
    for name, report in one.tensors.items():
        assert batched.tensors[name].scale == pytest.approx(report.scale, rel=1e-6)
        assert batched.tensors[name].zero_point == report.zero_point
    assert batched.search.chosen == one.search.chosen
