"""Block reconstruction (block_reconstruction=true): blocks cut where one tensor carries everything on, the
torch runner agrees with ONNX Runtime, and learned integers leave less block output error than GPTQ's."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import conv_relu_pool_model, float_input, make_model, random_feeds, run, save
from onnx import helper

import lowbit
from lowbit.errors import LowbitError
from lowbit.recovery import reconstruction
from lowbit.recovery.reconstruction import GraphRunner, blocks

torch = pytest.importorskip("torch")


def residual_model(seed: int = 0) -> onnx.ModelProto:
    """input -> conv_a -> Relu -> [conv_b -> Relu -> conv_c] + (the Relu's output) -> conv_d -> output."""
    rng = np.random.default_rng(seed)
    weights = [("wa", rng.normal(size=(8, 3, 3, 3)) * 0.3), ("wb", rng.normal(size=(8, 8, 1, 1)) * 0.3),
               ("wc", rng.normal(size=(8, 8, 3, 3)) * 0.1), ("wd", rng.normal(size=(4, 8, 1, 1)) * 0.3)]
    nodes = [
        helper.make_node("Conv", ["input", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["ra", "wb"], ["b"], name="conv_b"),
        helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
        helper.make_node("Conv", ["rb", "wc"], ["c"], name="conv_c", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "ra"], ["s"], name="add"),
        helper.make_node("Conv", ["s", "wd"], ["output"], name="conv_d"),
    ]
    return make_model(nodes, [float_input("input", ["N", 3, 8, 8])], [float_input("output", ["N", 4, 8, 8])],
                      [(name, w.astype(np.float32)) for name, w in weights])


def test_blocks_end_where_one_tensor_carries_everything_on(tmp_path):
    model = ir.serde.deserialize_model(residual_model())
    layers = {"conv_a", "conv_b", "conv_c", "conv_d"}
    cut = [(b.source, b.result, b.layers) for b in blocks(model.graph, layers)]
    # ra is a cut (only it is read later), but a block needs two layers; inside the residual block nothing is
    # a cut until the Add; conv_d is left alone at the end
    assert cut == [("input", "s", ["conv_a", "conv_b", "conv_c"]), ("s", "output", ["conv_d"])]


def test_the_torch_runner_computes_what_onnxruntime_does(tmp_path):
    """Float mode on the quantized graph equals the float model; quantized mode equals the QDQ model."""
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    lowbit.quantize(src, out, data=random_feeds(16), progress=False)
    quantized = ir.load(str(out))
    runner = GraphRunner(torch, quantized.graph, {}, {})
    feed = random_feeds(4, seed=5)
    x = np.concatenate([f["input"] for f in feed])
    runner.record_shapes({"input": torch.tensor(x[:1])}, {"input": torch.tensor(x[:2])})
    with torch.no_grad():
        fake = runner.run(list(quantized.graph), {"input": torch.tensor(x)}, quantized=True)["output"].numpy()
        unquantized = runner.run(list(quantized.graph), {"input": torch.tensor(x)}, quantized=False)["output"].numpy()
    qdq = np.concatenate([run(out, f)[0] for f in feed])
    reference = np.concatenate([run(src, f)[0] for f in feed])
    # float mode skips the activations' Q/DQ: the float model, up to the weights' own rounding
    assert np.abs(unquantized - reference).max() < 0.05 * np.abs(reference).max()
    assert np.abs(fake - qdq).max() < 0.02 * np.abs(qdq).max()
    assert np.abs(fake - qdq).max() < 0.25 * np.abs(unquantized - qdq).max()  # closer to ORT than float mode is


def test_learned_integers_leave_less_block_error_than_gptq(tmp_path):
    src = save(residual_model(), tmp_path / "m.onnx")
    calib = random_feeds(64, seed=1)
    learned = tmp_path / "learned.onnx"
    result = lowbit.quantize(src, learned, data=calib, weight_bit_num=4, block_reconstruction=True,
                             block_reconstruction_iterations=300, progress=False)
    onnx.checker.check_model(str(learned), full_check=True)
    report = result.block_reconstruction
    assert [len(row.names) for row in report.rows] == [3, 1] and report.samples == 64
    assert all(min(row.error_after, row.error_before) <= row.error_before for row in report.rows)
    assert report.improved >= 1
    first = report.rows[0]
    assert first.kept and first.error_after < 0.97 * first.error_before  # below GPTQ's integers, same grid
    assert any("block reconstruction: 4 layers in 2 blocks" in line for s in result.passes for line in s.lines)
    for name, array in _int4_weights(learned).items():  # same grid: the narrow int4 range
        assert array.min() >= -7 and array.max() <= 7, name


def _int4_weights(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t).astype(np.int64) for t in model.graph.initializer
            if t.data_type == onnx.TensorProto.INT4}


def test_two_bit_digit_cnn_keeps_its_answers(tmp_path):
    """The digit CNN, weights at 2 bits (weight-only, GPTQ): block reconstruction on 128 digits recovers most
    of what GPTQ loses on 272 others (measured: agreement 0.901 -> 0.974, output error 19.3 -> 7.2)."""
    from test_weight_only import digit_samples

    from bench import zoo

    samples = digit_samples(400)
    calib, held_out = samples[:128], samples[128:]
    src = zoo.digit_cnn("torchscript")
    settings = dict(quant_type="WEIGHT_QUANT", bit_num=2, weight_rounding="GPTQ", progress=False)
    gptq, learned = tmp_path / "gptq.onnx", tmp_path / "learned.onnx"
    lowbit.quantize(src, gptq, data=calib, **settings)
    result = lowbit.quantize(src, learned, data=calib, block_reconstruction=True,
                             block_reconstruction_iterations=200, **settings)
    onnx.checker.check_model(str(learned), full_check=True)
    assert result.bias_correction is None or not set(result.bias_correction.shifts) & set(
        name for row in result.block_reconstruction.rows if row.kept for name in row.names)
    reference = np.concatenate([run(src, f)[0] for f in held_out])

    def scores(path):
        outputs = np.concatenate([run(path, f)[0] for f in held_out])
        return np.mean((outputs - reference) ** 2), np.mean(outputs.argmax(1) == reference.argmax(1))

    (error_gptq, agreement_gptq), (error_learned, agreement_learned) = scores(gptq), scores(learned)
    assert error_learned < 0.5 * error_gptq
    assert agreement_learned >= 0.95 and agreement_learned > agreement_gptq + 0.04


def test_an_op_it_cannot_run_is_named(tmp_path):
    model = residual_model()
    model.graph.node[3].op_type = "Softplus"  # relu_b
    src = save(model, tmp_path / "m.onnx")
    with pytest.raises(LowbitError, match="'relu_b' is a Softplus"):
        lowbit.quantize(src, tmp_path / "q.onnx", data=random_feeds(8), weight_bit_num=4,
                        block_reconstruction=True, block_reconstruction_iterations=2, progress=False)
    assert not (tmp_path / "q.onnx").exists()


def test_without_torch_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(LowbitError, match=r"lowbit\[reconstruction\]"):
        reconstruction._torch()


def test_it_needs_data_and_the_uniform_grid(tmp_path, tiny_model):
    with pytest.raises(LowbitError, match="weight_levels"):
        lowbit.quantize(tiny_model, tmp_path / "q.onnx", data=random_feeds(8), block_reconstruction=True,
                        weight_levels=16, progress=False)


def test_dynamic_quantization_refuses_it(tmp_path, tiny_model):
    with pytest.raises(LowbitError, match="DYNAMIC_QUANT"):
        lowbit.quantize(tiny_model, tmp_path / "q.onnx", quant_type="DYNAMIC_QUANT", block_reconstruction=True,
                        progress=False)


def test_the_cli_flag(tmp_path, tiny_model, tiny_calib):
    from lowbit.cli import main

    out = tmp_path / "q.onnx"
    assert main(["quantize", str(tiny_model), "-o", str(out), "--data", str(tiny_calib), "--block-reconstruction",
                 "--block-reconstruction-iterations", "20"]) == 0
    assert out.exists()
