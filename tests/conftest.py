"""Shared helpers: small ONNX graphs built with onnx.helper, and a CLI runner."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the bench package holds the real-model zoo


def make_model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in initializers])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def float_input(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def conv_relu_pool_model(seed: int = 0) -> onnx.ModelProto:
    """input -> Conv(3->8, bias) -> Relu -> MaxPool -> Conv(8->4, no bias) -> output."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(8, 3, 3, 3)).astype(np.float32) * 0.3
    b1 = rng.normal(size=8).astype(np.float32) * 0.1
    w2 = rng.normal(size=(4, 8, 1, 1)).astype(np.float32) * 0.3
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["output"], name="conv2"),
    ]
    return make_model(nodes, [float_input("input", ["N", 3, 8, 8])], [float_input("output", ["N", 4, 4, 4])],
                      [("w1", w1), ("b1", b1), ("w2", w2)])


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def random_feeds(n: int, shape=(1, 3, 8, 8), seed: int = 1, name: str = "input"):
    rng = np.random.default_rng(seed)
    return [{name: rng.normal(size=shape).astype(np.float32)} for _ in range(n)]


def write_npy_folder(folder: Path, feeds, name: str = "input") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.save(folder / f"{i:04d}.npy", feed[name])
    return folder


def run(path, feed):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def initializers(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


@pytest.fixture(autouse=True)
def steady_speed_check(request, monkeypatch):
    """Every quantization times its model (speed_check); on the small graphs of the tests int8 is slower than
    float and the timing varies from run to run, so the tests that do not test it see fixed latencies (float 2 ms,
    quantized 1 ms) and their warnings stay the same on every machine. tests/test_check_speed.py times for real."""
    if request.node.get_closest_marker("real_latency") is None:
        from lowbit.passes import check_speed

        monkeypatch.setattr(check_speed, "latencies", lambda *args, **kwargs: (2.0, 1.0))


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    return save(conv_relu_pool_model(), tmp_path / "tiny.onnx")


@pytest.fixture
def tiny_calib(tmp_path) -> Path:
    return write_npy_folder(tmp_path / "calib", random_feeds(6))
