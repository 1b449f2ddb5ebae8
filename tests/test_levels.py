"""Non-uniform weights (weight_levels): the level choice against a brute-force optimum, packing round trips,
files that shrink and still run, and the errors for settings that cannot work."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from bench import zoo
from lowbit.errors import LowbitError
from lowbit.quantizers.levels import (
    DECODER_BYTES,
    LEVEL_COUNTS,
    nearest_level,
    optimal_levels,
    pack_indices,
    packed_bytes,
    unpack_indices,
    unpack_model,
)


@pytest.mark.parametrize("seed", range(12))
def test_levels_are_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    values = rng.normal(scale=2.5, size=int(rng.integers(3, 30)))
    importance = rng.uniform(0.1, 3.0, size=values.shape)
    count = int(rng.integers(1, 5))
    chosen = optimal_levels(values, importance, count, -6, 6)

    def cost(levels):
        clipped = np.clip(values, -6, 6)
        return float(np.sum(importance * (clipped - nearest_level(clipped, np.array(sorted(levels)))) ** 2))

    best = min(cost(c) for c in itertools.combinations(range(-6, 7), count))
    assert len(chosen) == count and np.all(np.diff(chosen) > 0)
    assert cost(chosen) == pytest.approx(best, abs=1e-9)


def test_levels_by_hand():
    # three weights near 0 that matter little, one at 9.6 that matters a lot: with two levels, 0 and 10
    values, importance = np.array([-0.4, 0.2, 0.3, 9.6]), np.array([1.0, 1.0, 1.0, 100.0])
    np.testing.assert_array_equal(optimal_levels(values, importance, 2, -12, 12), [0, 10])
    # one level: the integer nearest the weighted mean (sum a v / sum a = 9.37...) is 9
    np.testing.assert_array_equal(optimal_levels(values, importance, 1, -12, 12), [9])
    # as many levels as the grid has integers: the grid itself
    np.testing.assert_array_equal(optimal_levels(values, importance, 8, -3, 3), np.arange(-3, 4))


@pytest.mark.parametrize("count", LEVEL_COUNTS)
def test_pack_and_unpack_round_trip(count):
    rng = np.random.default_rng(count)
    indices = rng.integers(0, count, size=1003)  # not a multiple of 8
    bits = int(np.log2(count))
    planes = pack_indices(indices, bits)
    assert planes.shape == (bits, 126) and planes.dtype == np.uint8
    np.testing.assert_array_equal(unpack_indices(planes, 1003), indices)
    assert packed_bytes(1003, count) == bits * 126 + count


def _conv_model(rng) -> onnx.ModelProto:
    init = [numpy_helper.from_array(rng.normal(size=(64, 8, 3, 3)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.normal(size=64).astype(np.float32), "b1"),
            numpy_helper.from_array((rng.normal(size=(128, 64, 1, 1)) * 0.2).astype(np.float32), "w2"),
            numpy_helper.from_array((rng.normal(size=(10, 128)) * 0.3).astype(np.float32), "wf")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "wf"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _weights(path) -> dict[str, np.ndarray]:
    """The integer weights behind the DequantizeLinear of every weighted node, packed or not."""
    model = ir.load(str(path))
    unpack_model(model)
    weights = {}
    for node in model.graph:
        dq = node.inputs[1].producer() if node.op_type in ("Conv", "Gemm", "MatMul") else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.inputs[0].const_value is not None:
            weights[node.name] = dq.inputs[0].const_value.numpy()
    return weights


def _saved_model_and_feeds(tmp_path, seed: int, samples: int):
    """The test model saved, its random number generator, and calibration feeds drawn from it."""
    rng = np.random.default_rng(seed)
    src = tmp_path / "m.onnx"
    onnx.save(_conv_model(rng), src)
    return src, rng, [{"x": rng.normal(size=(1, 8, 12, 12)).astype(np.float32)} for _ in range(samples)]


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_full_quant_levels_shrink_the_file_and_run(tmp_path):
    src, rng, feeds = _saved_model_and_feeds(tmp_path, 0, 32)
    x = rng.normal(size=(16, 8, 12, 12)).astype(np.float32)
    uniform, packed, plain = tmp_path / "u.onnx", tmp_path / "k4.onnx", tmp_path / "k4plain.onnx"
    lowbit.quantize(src, uniform, data=feeds, progress=False)
    result = lowbit.quantize(src, packed, data=feeds, progress=False, weight_levels=4)
    lowbit.quantize(src, plain, data=feeds, progress=False, weight_levels=4, pack_weight_levels=False)
    onnx.checker.check_model(str(packed), full_check=True)
    rows = result.weight_rounding.levels
    assert [r.node for r in rows] == ["conv1", "conv2", "fc"] and all(len(r.levels) == 4 for r in rows)
    for row in rows:
        assert row.output_error >= row.uniform_output_error  # 4 levels cannot beat 255
        assert row.bytes_packed == packed_bytes(row.bytes_uniform, 4)
    for name, weight in _weights(packed).items():
        row = next(r for r in rows if r.node == name)
        assert set(np.unique(weight)) <= set(row.levels)
    assert all(np.array_equal(_weights(packed)[n], w) for n, w in _weights(plain).items())
    np.testing.assert_array_equal(_run(packed, x), _run(plain, x))  # ORT folds the decoder: the same model
    # conv2 (8192 bytes) is packed at 2 bits; conv1 (4608) and fc (1280) would save less than twice a decoder
    decoders = [n.name for n in onnx.load(str(packed)).graph.node if n.op_type == "Gather"]
    assert decoders == ["w2_quantized_unpack_gathered"]
    saved = uniform.stat().st_size - packed.stat().st_size
    assert saved >= 8192 - packed_bytes(8192, 4) - DECODER_BYTES
    reference = _run(src, x)
    assert zoo.cosine(_run(packed, x), reference) > 0.95
    assert any("weight levels: 4 on 3 of 3 layers" in line for line in result.summary().splitlines())


def test_weight_only_levels_with_data(tmp_path):
    src, rng, feeds = _saved_model_and_feeds(tmp_path, 1, 16)
    out = tmp_path / "w.onnx"
    result = lowbit.quantize(src, out, data=feeds, progress=False, quant_type="WEIGHT_QUANT", bit_num=8,
                             weight_levels=16, min_quant_weight_channel=0)
    assert len(result.weight_rounding.levels) == 3
    assert all(len(np.unique(w)) <= 16 for w in _weights(out).values())
    x = rng.normal(size=(4, 8, 12, 12)).astype(np.float32)
    reference = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert zoo.cosine(_run(out, x), reference) > 0.99


def test_analysis_reads_packed_weights(tmp_path):
    src, rng, feeds = _saved_model_and_feeds(tmp_path, 2, 8)
    lowbit.quantize(src, tmp_path / "q.onnx", data=feeds, progress=False, weight_levels=8)
    analysis = lowbit.analyze(src, tmp_path / "q.onnx", feeds)
    assert {row.node for row in analysis.weights} == {"conv1", "conv2", "fc"}


@pytest.mark.parametrize("settings, message", [
    ({"weight_levels": 24}, "unknown value .*allowed: one of 2, 4, 8, 16, 32, 64, 128, 256, AUTO"),
    ({"weight_levels": "AUTO", "quant_type": "WEIGHT_QUANT"}, "for an evaluator or accuracy_target"),
    ({"weight_levels": "AUTO", "quant_type": "WEIGHT_QUANT", "bit_num": 4}, "16 to 256 levels of 8-bit"),
    ({"weight_levels": 16, "quant_type": "DYNAMIC_QUANT"}, "DYNAMIC_QUANT has none"),
    ({"weight_levels": 16, "weight_bit_num": 4}, "int4 weights have 15"),
    ({"weight_levels": 16, "quant_type": "WEIGHT_QUANT", "bit_num": 4}, "not fewer than the 16 levels"),
])
def test_levels_settings_that_cannot_work(tmp_path, settings, message):
    src = tmp_path / "m.onnx"
    onnx.save(_conv_model(np.random.default_rng(3)), src)
    with pytest.raises(LowbitError, match=message):
        lowbit.quantize(src, tmp_path / "q.onnx", progress=False, **settings)
    assert not (tmp_path / "q.onnx").exists()


def test_levels_need_data(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_conv_model(np.random.default_rng(4)), src)
    with pytest.raises(LowbitError, match="give --data"):
        lowbit.quantize(src, tmp_path / "q.onnx", progress=False, quant_type="WEIGHT_QUANT", weight_levels=16,
                        min_quant_weight_channel=0)
    assert not (tmp_path / "q.onnx").exists()


def test_digit_cnn_keeps_its_accuracy_on_16_levels(tmp_path):
    cells, labels = zoo.opencv_digits()
    order = np.random.default_rng(0).permutation(len(cells))
    calib = [{"input": zoo.digit_input(cells[i])} for i in order[:64]]
    held = order[1000:2000]
    x = np.concatenate([zoo.digit_input(cells[i]) for i in held])
    src, out = zoo.digit_cnn(), tmp_path / "digits.onnx"
    lowbit.quantize(src, out, data=calib, progress=False, weight_levels=16)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    float_session = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    accuracy = np.mean(session.run(None, {"input": x})[0].argmax(1) == labels[held])
    float_accuracy = np.mean(float_session.run(None, {"input": x})[0].argmax(1) == labels[held])
    # measured on these 1000 digits: 0.971 on 16 levels, float 0.974. Margin: 2 digits
    assert accuracy >= float_accuracy - 0.005


class DigitAccuracy:
    """Accuracy on held-out digits; satisfied when at most ``drop`` below the float model's."""

    def __init__(self, drop: float):
        cells, labels = zoo.opencv_digits()
        held = np.random.default_rng(0).permutation(len(cells))[1000:1600]
        self.x, self.labels, self.drop = np.concatenate([zoo.digit_input(cells[i]) for i in held]), labels[held], drop
        self.calls = 0

    def eval_model(self, model_file, batch_num):
        self.calls += 1
        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        return float(np.mean(session.run(None, {"input": self.x})[0].argmax(1) == self.labels))

    def is_satisfied(self, original_metric, new_metric):
        return new_metric >= original_metric - self.drop


def _digit_calibration():
    cells, _ = zoo.opencv_digits()
    order = np.random.default_rng(0).permutation(len(cells))
    return [{"input": zoo.digit_input(cells[i])} for i in order[:64]]


def test_auto_levels_search_the_fewest_the_evaluator_accepts(tmp_path):
    evaluator = DigitAccuracy(drop=0.004)
    out = tmp_path / "auto.onnx"
    result = lowbit.quantize(zoo.digit_cnn(), out, data=_digit_calibration(), progress=False, weight_levels="AUTO",
                             evaluator=evaluator, max_evaluations=12)
    search = result.report("search_levels")
    kept = [t for t in search.search.tries if t.evaluation.satisfied]
    assert kept and search.counts and set(search.counts.values()) <= {16, 32, 64, 128, 256}
    assert evaluator.calls <= 12
    # the written model is the kept allocation: the evaluator accepts it, and it is the smallest one accepted
    assert evaluator.is_satisfied(evaluator.eval_model(zoo.digit_cnn(), None), evaluator.eval_model(out, None))
    assert search.search.bits == search.counts
    assert min(t.average_bits for t in kept) == pytest.approx(min(
        t.average_bits for t in search.search.tries if t.evaluation.satisfied))
    for name, weight in _weights(out).items():
        assert len(np.unique(weight)) <= search.counts[name]
    assert search.bytes_kept < search.bytes_uniform
    assert any("weight levels (AUTO)" in line for line in result.summary().splitlines())


def test_auto_levels_never_satisfied_writes_nothing(tmp_path):
    class Never(DigitAccuracy):
        def is_satisfied(self, original_metric, new_metric):
            return False

    out = tmp_path / "never.onnx"
    with pytest.raises(LowbitError, match="not satisfied even with every layer on the uniform grid"):
        lowbit.quantize(zoo.digit_cnn(), out, data=_digit_calibration(), progress=False, quant_type="WEIGHT_QUANT",
                        weight_levels="AUTO", evaluator=Never(0.0), max_evaluations=30, min_quant_weight_channel=0)
    assert not out.exists()
def test_levels_per_op_type_and_node_from_a_horizon_json(tmp_path):
    import json

    src, rng, feeds = _saved_model_and_feeds(tmp_path, 6, 16)
    config = tmp_path / "quant_config.json"
    config.write_text(json.dumps({"op_config": {"Conv": {"weight_levels": 16}},
                                  "node_config": {"conv2": {"weight_levels": 4}}}))
    out = tmp_path / "q.onnx"
    result = lowbit.quantize(src, out, data=feeds, progress=False, config=str(config))
    counts = {row.node: row.count for row in result.weight_rounding.levels}
    assert counts == {"conv1": 16, "conv2": 4}  # fc: no entry, no model-wide weight_levels: uniform
    weights = _weights(out)
    assert len(np.unique(weights["conv1"])) <= 16 and len(np.unique(weights["conv2"])) <= 4
    assert len(np.unique(weights["fc"])) > 16
    # a weight_levels entry names no precision: every node stays int8 and none is "explicit"
    assert {n.name for n in result.quantized_nodes} >= {"conv1", "conv2", "fc"}
    with pytest.raises(LowbitError, match="weight_levels: unknown value '5'"):
        lowbit.quantize(src, tmp_path / "bad.onnx", data=feeds, progress=False,
                        node_config={"conv2": {"weight_levels": 5}})


def test_auto_levels_after_a_precision_search_write_a_config_that_reruns(tmp_path):
    """FULL_QUANT with an evaluator writes the quant_config of its precision search; AUTO's levels are left out of
    it (said in the summary), so that the rerun, which has no evaluator, does not search again."""
    import json

    out = tmp_path / "auto.onnx"
    result = lowbit.quantize(zoo.digit_cnn(), out, data=_digit_calibration(), progress=False, weight_levels="AUTO",
                             evaluator=DigitAccuracy(drop=0.004), max_evaluations=6)
    written = json.loads(result.quant_config_path.read_text())
    assert "weight_levels" not in written.get("lowbit", {})
    assert "without weight_levels=AUTO's per-layer levels" in result.summary()
    lowbit.quantize(zoo.digit_cnn(), tmp_path / "again.onnx", data=_digit_calibration(), progress=False,
                    config=str(result.quant_config_path))


def test_weight_only_levels_cover_lookup_tables(tmp_path):
    """A Gather table (word embeddings) takes its levels too: fewest squared error of the dequantized table,
    each entry to the nearest level, packed like the layers' weights."""
    rng = np.random.default_rng(7)
    table = rng.normal(size=(1000, 64)).astype(np.float32)
    weight = (rng.normal(size=(64, 32)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 32])],
                              [numpy_helper.from_array(table, "table"), numpy_helper.from_array(weight, "w")])
    src, out, uniform = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "u.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    feeds = [{"ids": rng.integers(0, 1000, size=(1, 8))} for _ in range(16)]
    settings = dict(data=feeds, progress=False, quant_type="WEIGHT_QUANT", bit_num=8, min_quant_weight_channel=0)
    result = lowbit.quantize(src, out, weight_levels=16, **settings)
    lowbit.quantize(src, uniform, **settings)
    rows = {row.node: row for row in result.weight_rounding.levels}
    assert set(rows) == {"table", "proj"} and rows["table"].count == 16
    model = ir.load(str(out))
    assert any(node.op_type == "BitShift" for node in model.graph)  # the table is packed (64000 bytes -> 32000)
    unpack_model(model)
    dq = next(node for node in model.graph if node.op_type == "Gather").inputs[0].producer()
    assert len(np.unique(dq.inputs[0].const_value.numpy())) <= 16
    assert out.stat().st_size < 0.6 * uniform.stat().st_size
    ids = rng.integers(0, 1000, size=(4, 8))
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    assert zoo.cosine(got, want) > 0.99
