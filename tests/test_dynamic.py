"""Dynamic quantization: int8 weights offline, activations quantized at run time."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import float_input, make_model, run, save
from onnx import helper

import lowbit
from bench import zoo
from lowbit.cli import main


def small_model():
    """MatMul(3-D) + bias, Gemm(transB, alpha, beta, C), attention-like MatMul, a Conv, an embedding Gather."""
    rng = np.random.default_rng(0)
    inits = [("w1", rng.normal(size=(8, 6)).astype(np.float32)), ("b1", rng.normal(size=6).astype(np.float32)),
             ("w2", rng.normal(size=(5, 6)).astype(np.float32)), ("c2", rng.normal(size=5).astype(np.float32)),
             ("table", rng.normal(size=(50, 8)).astype(np.float32)),
             ("wc", rng.normal(size=(2, 1, 1, 1)).astype(np.float32)), ("flat", np.array([2, 3, 6], np.int64)),
             ("two_d", np.array([6, 6], np.int64))]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
        helper.make_node("Add", ["x", "emb"], ["h"], name="add_emb"),
        helper.make_node("MatMul", ["h", "w1"], ["m1"], name="proj"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="bias"),
        helper.make_node("Transpose", ["a1"], ["a1t"], name="t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["a1", "a1t"], ["scores"], name="scores"),  # activation x activation
        helper.make_node("Reshape", ["a1", "two_d"], ["r2"], name="flatten"),
        helper.make_node("Gemm", ["r2", "w2", "c2"], ["g"], name="gemm", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Unsqueeze", ["scores", "ax"], ["s4"], name="unsq"),
        helper.make_node("Conv", ["s4", "wc"], ["conv_out"], name="conv"),
    ]
    inits.append(("ax", np.array([1], np.int64)))
    model = make_model(
        nodes,
        [float_input("x", [2, 3, 8]), helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2, 3])],
        [float_input("g", [6, 5]), float_input("conv_out", [2, 2, 3, 3])],
        inits)
    return model


def feed(seed=1):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(2, 3, 8)).astype(np.float32), "ids": rng.integers(0, 50, (2, 3)).astype(np.int64)}


@pytest.mark.parametrize("granularity", ["AUTO", "TOKEN", "TENSOR"])
def test_small_graph(tmp_path, granularity):
    src = save(small_model(), tmp_path / "m.onnx")
    out = tmp_path / "d.onnx"
    result = lowbit.quantize(src, out, quant_type="DYNAMIC_QUANT", dynamic_quant_granularity=granularity,
                             progress=False)
    onnx.checker.check_model(str(out), full_check=True)
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert ops.count("MatMulInteger") == 2 and "ConvInteger" not in ops and "Conv" in ops
    # AUTO: neither weight (8x6, 6x5) widens or narrows the hidden size 2x, so both per tensor
    assert ("DynamicQuantizeLinear" in ops) == (granularity != "TOKEN")
    assert {n.name for n in result.quantized_nodes} == {"proj", "gemm", "embed"}
    reasons = {n.name: n.reason for n in result.float_nodes}
    assert "dynamic_quant_activation_matmul" in reasons["scores"] and "ConvInteger" in reasons["conv"]
    for name in ("g", "conv_out"):
        assert [o.name for o in model.graph.output].count(name) == 1
    f = feed()
    for expected, got in zip(run(src, f), run(out, f)):
        assert zoo.cosine(expected, got) > 0.999


def test_auto_scales_feed_forward_matmuls_per_token_and_shares_quantization(tmp_path):
    from lowbit.quantizers.dynamic import token_scales

    assert token_scales((384, 1536), "AUTO") and token_scales((1536, 384), "AUTO")  # feed-forward pair
    assert not token_scales((384, 384), "AUTO") and not token_scales((384, 767), "AUTO")
    assert token_scales((384, 384), "TOKEN") and not token_scales((384, 1536), "TENSOR")
    # q, k, v read one activation: one run-time quantization for the three; up (8 -> 32) per token
    rng = np.random.default_rng(2)
    inits = [(name, rng.normal(size=shape).astype(np.float32))
             for name, shape in [("wq", (8, 8)), ("wk", (8, 8)), ("wv", (8, 8)), ("wu", (8, 32))]]
    nodes = [helper.make_node("MatMul", ["x", w], [w + "_out"], name=w) for w in ("wq", "wk", "wv", "wu")]
    outputs = [float_input(w + "_out", [2, 5, 32 if w == "wu" else 8]) for w in ("wq", "wk", "wv", "wu")]
    src = save(make_model(nodes, [float_input("x", [2, 5, 8])], outputs, inits), tmp_path / "m.onnx")
    out = tmp_path / "d.onnx"
    lowbit.quantize(src, out, quant_type="DYNAMIC_QUANT", min_quant_weight_channel=0, progress=False)
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    # shapes only on the graph's ends: written for every tensor, they let ORT fuse Add + LayerNormalization
    # into its slower SkipLayerNormalization (graph/saving.py)
    produced = {o for n in model.graph.node for o in n.output} - {o.name for o in model.graph.output}
    assert not [v.name for v in model.graph.value_info if v.name in produced]
    assert ops.count("MatMulInteger") == 4
    assert ops.count("DynamicQuantizeLinear") == 1 and ops.count("QuantizeLinear") == 1
    f = {"x": rng.normal(size=(2, 5, 8)).astype(np.float32)}
    for expected, got in zip(run(src, f), run(out, f)):
        assert zoo.cosine(expected, got) > 0.999


@pytest.mark.parametrize("opset", [12, 14])
def test_per_token_scales_on_older_opsets(tmp_path, opset):
    # opset 12: QuantizeLinear has no axis yet, so the model is converted to opset 13;
    # before opset 15, Shape has no ``end``: the leading dimensions come from a Slice
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="up")]
    src = save(make_model(nodes, [float_input("x", [2, 5, 8])], [float_input("y", [2, 5, 32])],
                          [("w", rng.normal(size=(8, 32)).astype(np.float32))], opset=opset), tmp_path / "m.onnx")
    out = tmp_path / "d.onnx"
    lowbit.quantize(src, out, quant_type="DYNAMIC_QUANT", min_quant_weight_channel=0, progress=False)
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 13
    assert "QuantizeLinear" in [n.op_type for n in model.graph.node]  # per token: the weight widens 4x
    f = {"x": rng.normal(size=(2, 5, 8)).astype(np.float32)}
    assert zoo.cosine(run(src, f)[0], run(out, f)[0]) > 0.999


def test_weights_per_tensor_skip_and_activation_matmul(tmp_path):
    src = save(small_model(), tmp_path / "m.onnx")
    result = lowbit.quantize(src, tmp_path / "d.onnx", quant_type="DYNAMIC_QUANT", per_channel=False,
                             skip_quant_node="gemm", dynamic_quant_activation_matmul=True, progress=False)
    assert {n.name for n in result.quantized_nodes} == {"proj", "scores", "embed"}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "d.onnx")).graph.initializer}
    assert inits["proj_weight_scale"].shape == () and inits["proj_weight_quantized"].dtype == np.int8
    f = feed(2)
    for expected, got in zip(run(src, f), run(tmp_path / "d.onnx", f)):
        assert zoo.cosine(expected, got) > 0.99


def test_dynamic_needs_no_data_and_checks_its_options(tmp_path, capsys):
    src = save(small_model(), tmp_path / "m.onnx")
    assert main(["quantize", str(src), "-o", str(tmp_path / "d.onnx"), "--quant-type", "DYNAMIC_QUANT", "-q"]) == 0
    code = main(["quantize", str(src), "-o", str(tmp_path / "e.onnx"), "--quant-type", "DYNAMIC_QUANT",
                 "--bias-correction", "-q"])
    assert code == 2 and "bias_correction=true applies to FULL_QUANT only" in capsys.readouterr().err
    code = main(["quantize", str(src), "-o", str(tmp_path / "e.onnx"), "--quant-type", "DYNAMIC_QUANT",
                 "--target-device", "NVGPU", "-q"])
    assert code == 2 and "DYNAMIC_QUANT targets ONNX Runtime on CPU" in capsys.readouterr().err
    with pytest.warns(lowbit.LowbitWarning, match="calibration data is not used"):
        lowbit.quantize(src, tmp_path / "f.onnx", quant_type="DYNAMIC_QUANT", data=[feed()], progress=False)


def embeddings(path, batch):
    from bench import minilm

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return minilm.mean_pool(session.run(None, batch)[0], batch["attention_mask"])


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo", "transformers"])
def test_minilm_sentence_embeddings(tmp_path, exporter):
    from bench import minilm

    src = zoo.minilm_encoder(exporter)
    out = tmp_path / "minilm_dynamic.onnx"
    result = lowbit.quantize(src, out, quant_type="DYNAMIC_QUANT", progress=False)
    assert result.size_ratio <= 0.3
    tokenize = minilm.WordPiece()
    sentences = zoo.stdlib_sentences()[:512]
    cosines = []
    for i in range(0, len(sentences), 64):
        batch = tokenize(sentences[i:i + 64], 64)
        cosines.append((embeddings(src, batch) * embeddings(out, batch)).sum(1))
    cosines = np.concatenate(cosines)
    # measured on 844 sentences at length 128 (bench): mean 0.9967 (per token everywhere: 0.9966; one scale
    # per tensor everywhere: 0.9920)
    assert len(cosines) >= 500 and cosines.mean() >= 0.995 and cosines.min() >= 0.98


def test_plain_torch_minilm_matches_transformers():
    """bench/minilm.py rebuilds the same network as transformers' BertModel."""
    from bench import minilm

    batch = minilm.WordPiece()(zoo.stdlib_sentences()[:8], 48)
    plain = ort.InferenceSession(str(zoo.minilm_encoder("torchscript")), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(zoo.minilm_encoder("transformers")), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(plain.run(None, batch)[0], reference.run(None, batch)[0], atol=1e-3)


def test_magika(tmp_path):
    src = zoo.magika_model()
    out = tmp_path / "magika_dynamic.onnx"
    result = lowbit.quantize(src, out, quant_type="DYNAMIC_QUANT", progress=False)
    assert any(n.op_type == "MatMul" for n in result.quantized_nodes)
    files = sorted(Path(np.__file__).parent.rglob("*.py"))[:60] + sorted(Path(onnx.__file__).parent.rglob("*"))[:60]
    x = np.concatenate([zoo.magika_input(p.read_bytes()) for p in files if p.is_file()])
    f = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"bytes": x})[0]
    q = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"bytes": x})[0]
    assert np.mean(f.argmax(1) == q.argmax(1)) >= 0.97
    assert np.mean([zoo.cosine(a, b) for a, b in zip(f, q)]) > 0.99
