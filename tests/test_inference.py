"""lowbit.inference_session: weight-only models fold their DequantizeLinear at load; others keep their int8 kernels."""

import numpy as np
import onnxruntime as ort
import pytest
from conftest import conv_relu_pool_model, random_feeds, save

import lowbit
from lowbit.inference import FOLD_WEIGHTS


def _optimized_ops(path, tmp_path, options):
    """The op types of the graph ONNX Runtime runs, after its optimizations."""
    import onnx

    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def test_weight_only_models_fold_their_weights_at_load(tmp_path):
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    lowbit.quantize(src, tmp_path / "w.onnx", quant_type="WEIGHT_QUANT", bit_num=8, min_quant_weight_channel=0,
                    progress=False)
    options = lowbit.session_options(tmp_path / "w.onnx")
    assert options.get_session_config_entry(FOLD_WEIGHTS) == "1"
    assert "DequantizeLinear" not in _optimized_ops(tmp_path / "w.onnx", tmp_path, options)
    assert "DequantizeLinear" in _optimized_ops(tmp_path / "w.onnx", tmp_path, ort.SessionOptions())
    feed = random_feeds(1)[0]
    folded = lowbit.inference_session(tmp_path / "w.onnx").run(None, feed)[0]
    plain = ort.InferenceSession(str(tmp_path / "w.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(folded, plain, rtol=1e-5, atol=1e-6)


def test_full_and_dynamic_models_keep_the_default(tmp_path):
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    lowbit.quantize(src, tmp_path / "q.onnx", data=random_feeds(8), progress=False)
    with pytest.raises(RuntimeError):  # ORT raises for an entry that was never set
        lowbit.session_options(tmp_path / "q.onnx").get_session_config_entry(FOLD_WEIGHTS)
    assert "QLinearConv" in _optimized_ops(tmp_path / "q.onnx", tmp_path, lowbit.session_options(tmp_path / "q.onnx"))
    lowbit.quantize(src, tmp_path / "d.onnx", quant_type="DYNAMIC_QUANT", progress=False)
    with pytest.raises(RuntimeError):
        lowbit.session_options(tmp_path / "d.onnx").get_session_config_entry(FOLD_WEIGHTS)
