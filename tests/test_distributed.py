"""Calibration and candidate scoring on Ray workers give what one process gives.

A local Ray with 2 CPUs (CI has 2 cores) is started once for the module; lowbit joins it
instead of starting its own (it starts and stops one per job otherwise).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import lowbit
from bench import zoo
from lowbit.calibration.observers import MinMaxObserver
from lowbit.config import load_config
from lowbit.data.calibration import CalibrationData
from lowbit.data.feeds import input_specs
from lowbit.distributed.workers import start_workers
from lowbit.errors import LowbitError
from lowbit.graph.loading import load_model
from lowbit.pipeline.engine import DataEngine, Request

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the observer below travels by value
    yield
    ray.shutdown()


def constants(path) -> dict[str, np.ndarray]:
    """Every initializer: int8 weights, int32 biases, scales and zero points."""
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def assert_same_model(a, b, flips=0.0):
    """Every constant equal; ``flips``: the share of a weight's integers that may differ by one or two.

    GPTQ turns a float sum that differs in its last bit (ONNX Runtime's float kernels split
    their work by thread count, which differs in a worker) into an integer on the other side of
    a rounding tie, and carries that on along the row, and bias correction follows those integers
    (int32 biases within 1% of their largest): seen on EfficientNet-Lite0 on an AVX2 CPU."""
    first, second = constants(a), constants(b)
    assert first.keys() == second.keys()
    for name in first:
        x, y = first[name], second[name]
        if flips and x.dtype == np.int8 and x.shape == y.shape:
            differ = x.astype(np.int64) != y.astype(np.int64)
            assert differ.mean() <= flips and np.abs(x.astype(np.int64) - y).max() <= 2, name
        elif flips and x.dtype == np.int32 and x.shape == y.shape:  # biases corrected for those weights
            assert np.abs(x.astype(np.int64) - y).max() <= 0.01 * np.abs(x.astype(np.int64)).max(), name
        elif flips and x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=1e-5, err_msg=name)
        else:
            assert np.array_equal(x, y), name


def npy_folder(folder, arrays):
    folder.mkdir()
    for i, x in enumerate(arrays):
        np.save(folder / f"{i:04d}.npy", x)
    return folder


@pytest.fixture(scope="module")
def digit_calib(tmp_path_factory):
    cells, _ = zoo.opencv_digits()
    order = np.random.default_rng(0).permutation(len(cells))
    return npy_folder(tmp_path_factory.mktemp("d") / "calib", [zoo.digit_input(cells[i]) for i in order[:72]])


@pytest.fixture(scope="module")
def photo_calib(tmp_path_factory):
    photos = zoo.skimage_photos()
    crops = [zoo.efficientnet_input(c) for name in ("astronaut", "coffee", "chelsea", "motorcycle_left")
             for c in zoo.crops(photos[name], 12, seed=0)]
    return npy_folder(tmp_path_factory.mktemp("e") / "calib", crops)


@pytest.mark.parametrize("model, settings, candidates", [
    ("digits", {}, 4),  # the default search: 4 candidates scored
    ("digits", {"activation_quant_method": "KL,AUTO_TUNE", "layerwise_search": True}, 3),  # + per-op scoring
    ("efficientnet", {}, 4),
])
def test_one_and_two_workers_write_what_one_process_writes(model, settings, candidates, digit_calib, photo_calib,
                                                           tmp_path):
    src = zoo.digit_cnn("torchscript") if model == "digits" else zoo.efficientnet_lite0("torchscript")
    calib = digit_calib if model == "digits" else photo_calib
    alone = tmp_path / "alone.onnx"
    result = lowbit.quantize(src, alone, data=calib, progress=False, **settings)
    assert result.search is not None and len(result.search.rows) == candidates
    for workers in (1, 2):
        out = tmp_path / f"w{workers}.onnx"
        spread = lowbit.quantize(src, out, data=calib, progress=False, workers=workers, **settings)
        assert_same_model(alone, out, flips=0.001 if model == "efficientnet" else 0.0)
        assert [r.score for r in spread.search.rows] == pytest.approx([r.score for r in result.search.rows])
        assert spread.calibration_samples == result.calibration_samples


class DiesOnce(MinMaxObserver):
    """Kills its worker process the first time it sees data anywhere (a marker file remembers)."""

    def __init__(self, marker):
        super().__init__()
        self.marker = str(marker)

    def update(self, x):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)  # the worker process dies: no exception, no clean-up, as with a lost node
        super().update(x)


def test_a_worker_that_dies_is_retried_with_the_same_result(digit_calib, tmp_path):
    model, _ = load_model(zoo.digit_cnn("torchscript"))
    config = load_config(None, {})
    specs = input_specs(model)
    data = CalibrationData(digit_calib, config, specs, lambda message: None)
    plain = {"input": MinMaxObserver()}
    DataEngine(data, specs, 1, False).run(model, [Request(plain)], what="t", model_label="float")
    dying = {"input": DiesOnce(tmp_path / "died")}
    with start_workers(2, None, "test") as workers:
        DataEngine(data, specs, 1, False, workers).run(model, [Request(dying)], what="t", model_label="float")
    assert (tmp_path / "died").exists()
    assert dying["input"].range() == plain["input"].range()


def test_a_bad_file_is_named_as_in_one_process(digit_calib, tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    for path in sorted(digit_calib.iterdir())[:24]:
        (calib / path.name).write_bytes(path.read_bytes())
    (calib / "0010.npy").write_bytes(b"not an npy file")
    errors = []
    for workers in (None, 2):
        with pytest.raises(LowbitError) as caught:
            lowbit.quantize(zoo.digit_cnn("torchscript"), tmp_path / "out.onnx", data=calib, progress=False,
                            workers=workers)
        errors.append(str(caught.value))
    assert "0010.npy" in errors[0] and errors[0] == errors[1]
    assert not (tmp_path / "out.onnx").exists()


def test_workers_without_ray_say_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as where it is not installed
    with pytest.raises(LowbitError, match=r"pip install 'lowbit\[ray\]'"):
        with start_workers(2, None, "--workers"):
            pass


def test_the_sensitivity_ranking_on_workers_is_the_one_process_ranking(digit_calib, tmp_path):
    from lowbit.analysis.sensitivity import OutputError, ranked_nodes
    from lowbit.analysis.switches import switched_model
    from lowbit.graph.passes import prepare, typed
    from lowbit.graph.runtime import make_session

    src = zoo.digit_cnn("torchscript")
    lowbit.quantize(src, tmp_path / "q.onnx", data=digit_calib, progress=False)
    switched = switched_model(typed(load_model(tmp_path / "q.onnx")[0]), prepare(load_model(src)[0]))
    batches = [{"input": np.load(path)} for path in sorted(digit_calib.iterdir())[:8]]
    outputs = [v.name for v in switched.model.graph.outputs]
    error = OutputError(make_session(switched.model), switched, batches, outputs)
    everything = {node.name for node in switched.nodes}
    alone, _ = ranked_nodes(error, error(everything), alone=False)
    with start_workers(2, None, "test") as workers:
        spread, _ = ranked_nodes(error, error(everything), workers=workers, alone=False)
    assert [n.name for n in spread] == [n.name for n in alone]
    assert [n.gain for n in spread] == pytest.approx([n.gain for n in alone])


def test_analyze_on_workers_ranks_as_one_process(digit_calib, tmp_path):
    src = zoo.digit_cnn("torchscript")
    lowbit.quantize(src, tmp_path / "q.onnx", data=digit_calib, progress=False)
    alone = lowbit.analyze(src, tmp_path / "q.onnx", data=digit_calib, samples=16)
    spread = lowbit.analyze(src, tmp_path / "q.onnx", data=digit_calib, samples=16, workers=2)
    assert [n.name for n in spread.nodes] == [n.name for n in alone.nodes]
    assert [n.alone for n in spread.nodes] == pytest.approx([n.alone for n in alone.nodes])
