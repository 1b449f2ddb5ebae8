"""Bad input: a one-line error naming the culprit, exit code 2, and no output file."""

import pickle
import re

import numpy as np
import onnx
import pytest
from conftest import conv_relu_pool_model, random_feeds, save, write_npy_folder
from onnx import helper, numpy_helper

import lowbit
from lowbit.cli import main


def quantize_cli(capsys, *args):
    code = main(["quantize", *map(str, args), "--quiet"])
    return code, capsys.readouterr().err


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out" / "q.onnx"


@pytest.fixture(autouse=True)
def out_folder(tmp_path):
    (tmp_path / "out").mkdir()


def check(code, err, out, *culprits):
    assert code == 2
    assert err.startswith("lowbit: error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    for culprit in culprits:
        assert str(culprit) in err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir()]  # no temporary files either


def test_not_an_onnx_file(tmp_path, capsys, out, tiny_calib):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n" * 10)
    check(*quantize_cli(capsys, bad, "-o", out, "--data", tiny_calib), out, bad)


def test_truncated_onnx_file(tmp_path, capsys, out, tiny_model, tiny_calib):
    data = tiny_model.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    check(*quantize_cli(capsys, cut, "-o", out, "--data", tiny_calib), out, cut)


def test_a_name_that_is_not_utf8(tmp_path, capsys, out, tiny_model, tiny_calib):
    """Found by tests/test_fuzz.py: onnx.checker lets a corrupted node name through."""
    data = tiny_model.read_bytes()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(data.replace(b"relu1", b"r\xf4lu1"))
    code, err = quantize_cli(capsys, broken, "-o", out, "--data", tiny_calib)
    check(code, err, out, broken, "NodeProto.name is not valid UTF-8")


def test_a_weight_of_a_type_its_op_does_not_take(tmp_path, capsys, out, tiny_calib):
    """Found by tests/test_fuzz.py: a flipped type code that onnx.checker does not look at."""
    model = conv_relu_pool_model()
    weight = next(t for t in model.graph.initializer if t.name == "w2")
    weight.data_type = onnx.TensorProto.INT8
    weight.raw_data = bytes(4 * 8)  # int8 values that fill the shape: only the type is wrong
    broken = save(model, tmp_path / "typed.onnx")
    code, err = quantize_cli(capsys, broken, "-o", out, "--data", tiny_calib)
    check(code, err, out, broken, "ONNX Runtime cannot run the model")


def test_a_model_lowbit_already_quantized(tmp_path, capsys, out, tiny_model, tiny_calib):
    int8 = tmp_path / "int8.onnx"
    lowbit.quantize(tiny_model, int8, data=tiny_calib, progress=False)
    code, err = quantize_cli(capsys, int8, "-o", out, "--data", tiny_calib)
    check(code, err, out, int8, "is already quantized (", "QuantizeLinear", "give it the float model")
    for mode in ("WEIGHT_QUANT", "DYNAMIC_QUANT"):
        with pytest.raises(lowbit.LowbitError, match="already quantized"):
            lowbit.quantize(int8, out, quant_type=mode, progress=False)
    assert not out.exists()


def test_a_model_in_operator_form(tmp_path, capsys, out, tiny_calib):
    """onnxruntime's dynamic quantization and QOperator formats: integer ops, no Q/DQ pairs."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [1, 2, 4, 4])
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("ConvInteger", ["xq", "w", "xz"], ["y"])]
    weight = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.uint8), "w")
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [weight]),
                              opset_imports=[helper.make_opsetid("", 13)])
    path = save(model, tmp_path / "dynamic.onnx")
    code, err = quantize_cli(capsys, path, "-o", out, "--data", tiny_calib)
    check(code, err, out, path, "(ConvInteger 1, DynamicQuantizeLinear 1)")


def test_missing_model(tmp_path, capsys, out, tiny_calib):
    check(*quantize_cli(capsys, tmp_path / "none.onnx", "-o", out, "--data", tiny_calib), out, "none.onnx")


def test_ini_with_unknown_key(tmp_path, capsys, out, tiny_model, tiny_calib):
    cfg = tmp_path / "q.cfg"
    cfg.write_text("[full_quant_param]\nper_chanel=false\n")
    code, err = quantize_cli(capsys, tiny_model, "-o", out, "--config", cfg, "--data", tiny_calib)
    check(code, err, out, cfg, "per_chanel", "per_channel")


def test_value_out_of_range(tmp_path, capsys, out, tiny_model, tiny_calib):
    cfg = tmp_path / "q.cfg"
    cfg.write_text("[data_preprocess_param]\ncalibrate_size=0\n")
    code, err = quantize_cli(capsys, tiny_model, "-o", out, "--config", cfg, "--data", tiny_calib)
    check(code, err, out, cfg, "calibrate_size", "[1, 65535]")


def test_flag_out_of_range(capsys, out, tiny_model, tiny_calib):
    code, err = quantize_cli(capsys, tiny_model, "-o", out, "--data", tiny_calib, "--min-quant-weight-size", "-5")
    check(code, err, out, "--min-quant-weight-size", "[0, 65535]")


def test_calibration_file_of_wrong_shape(tmp_path, capsys, out, tiny_model):
    folder = write_npy_folder(tmp_path / "calib", random_feeds(3, shape=(1, 3, 9, 8)))
    code, err = quantize_cli(capsys, tiny_model, "-o", out, "--data", folder)
    check(code, err, out, folder / "0000.npy", "[1, 3, 9, 8]", "?x3x8x8")


def test_calibration_file_of_wrong_dtype(tmp_path, capsys, out, tiny_model):
    folder = tmp_path / "calib"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((1, 3, 8, 8), np.float64))
    code, err = quantize_cli(capsys, tiny_model, "-o", out, "--data", folder)
    check(code, err, out, folder / "a.npy", "float64", "float32")


def test_missing_calibration_folder(tmp_path, capsys, out, tiny_model):
    code, err = quantize_cli(capsys, tiny_model, "-o", out, "--data", tmp_path / "nowhere")
    check(code, err, out, tmp_path / "nowhere", "not found")


def test_empty_calibration_folder(tmp_path, capsys, out, tiny_model):
    (tmp_path / "empty").mkdir()
    code, err = quantize_cli(capsys, tiny_model, "-o", out, "--data", tmp_path / "empty")
    check(code, err, out, tmp_path / "empty", ".npy")


def test_output_folder_does_not_exist(tmp_path, capsys, tiny_model, tiny_calib):
    missing = tmp_path / "no" / "such" / "q.onnx"
    code, err = quantize_cli(capsys, tiny_model, "-o", missing, "--data", tiny_calib)
    assert code == 2 and str(missing.parent) in err
    assert not (tmp_path / "no").exists()


def test_npy_with_python_objects_is_never_unpickled(tmp_path, capsys, out, tiny_model):
    folder = tmp_path / "calib"
    folder.mkdir()
    np.save(folder / "evil.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    code, err = quantize_cli(capsys, tiny_model, "-o", out, "--data", folder)
    check(code, err, out, folder / "evil.npy", "unpickle")


@pytest.mark.parametrize("content, message", [
    (b"garbage, not an array", "no NumPy header"),
    (pickle.dumps({"a": 1}, protocol=2), "unpickle"),
])
def test_npy_of_other_bytes(tmp_path, capsys, out, tiny_model, content, message):
    """numpy calls any file without its header a pickle: only a real one is reported as Python objects."""
    folder = tmp_path / "calib"
    folder.mkdir()
    (folder / "sample.npy").write_bytes(content)
    code, err = quantize_cli(capsys, tiny_model, "-o", out, "--data", folder)
    check(code, err, out, folder / "sample.npy", message)


def test_npz_missing_an_input(tmp_path, capsys, out, tiny_model):
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "s.npz", image=np.zeros((1, 3, 8, 8), np.float32))
    code, err = quantize_cli(capsys, tiny_model, "-o", out, "--data", folder)
    check(code, err, out, folder / "s.npz", "image", "input")


def test_nan_in_calibration_data(tmp_path, capsys, out, tiny_model):
    feeds = random_feeds(2)
    feeds[1]["input"][0, 0, 0, 0] = np.nan
    folder = write_npy_folder(tmp_path / "calib", feeds)
    code, err = quantize_cli(capsys, tiny_model, "-o", out, "--data", folder)
    check(code, err, out, folder / "0001.npy", "NaN")


def test_no_calibration_data(capsys, out, tiny_model):
    code, err = quantize_cli(capsys, tiny_model, "-o", out)
    check(code, err, out, "--data")


def test_calibrate_size_larger_than_the_data(capsys, out, tiny_model, tiny_calib):
    code, err = quantize_cli(capsys, tiny_model, "-o", out, "--data", tiny_calib, "--calibrate-size", "50")
    check(code, err, out, "calibrate_size=50", "only 6")


def test_calibrate_size_larger_than_the_samples_in_memory(tiny_model, tmp_path):
    for data in (random_feeds(4), (feed for feed in random_feeds(4))):  # a list, and a generator
        with pytest.raises(lowbit.LowbitError, match="calibrate_size=50, but only 4 calibration samples"):
            lowbit.quantize(tiny_model, tmp_path / "q.onnx", data=data, calibrate_size=50, progress=False)
        assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("setting, culprit", [
    ({"skip_quant_node": 5}, "skip_quant_node=5"),
    ({"calibrate_path": 5}, "calibrate_path=5"),
    ({"input_shape": 5}, "input_shape=5"),
    ({"input_shape": {"input": "1,3"}}, "input_shape="),
])
def test_values_of_the_wrong_python_type_are_named(tiny_model, tiny_calib, tmp_path, setting, culprit):
    with pytest.raises(lowbit.LowbitError, match=re.escape(culprit)):
        lowbit.quantize(tiny_model, tmp_path / "q.onnx", data=tiny_calib, progress=False, **setting)


def test_a_ragged_feed_is_named(tiny_model, tmp_path):
    feeds = [{"input": [[1.0, 2.0], [3.0]]}]
    with pytest.raises(lowbit.LowbitError, match="calibration sample 1: input 'input' is not an array"):
        lowbit.quantize(tiny_model, tmp_path / "q.onnx", data=feeds, progress=False)


def test_input_shape_of_the_wrong_rank_for_bin_data(tmp_path, capsys, out, tiny_model):
    folder = tmp_path / "bins"
    folder.mkdir()
    np.zeros((1, 8, 8, 3), np.float32).tofile(folder / "a.bin")
    code, err = quantize_cli(capsys, tiny_model, "-o", out, "--data", folder, "--input-shape", "input:3,8,8")
    check(code, err, out, "input_shape", "3 dimensions")


def test_option_for_another_quant_type(capsys, out, tiny_model, tiny_calib):
    code, err = quantize_cli(capsys, tiny_model, "-o", out, "--quant-type", "DYNAMIC_QUANT", "--debug-info-save-path",
                             "/tmp/d")
    check(code, err, out, "--debug-info-save-path", "applies to FULL_QUANT and WEIGHT_QUANT")


def test_success_prints_a_summary(capsys, tmp_path, tiny_model, tiny_calib):
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(tiny_model), "-o", str(out), "--data", str(tiny_calib)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "int8 nodes: 4" in text and "calibration: 6 samples" in text
    assert out.exists()
