"""Calibration tables: lowbit JSON, tpu-mlir and TensorRT caches out and back in, formats checked by hand."""

import json
import struct
import warnings

import numpy as np
import onnx
import pytest
from conftest import conv_relu_pool_model, initializers, random_feeds, save

import lowbit
from lowbit.cli import main

SETTINGS = dict(progress=False, activation_quant_method="KL")


def _same_model(a, b):
    x, y = initializers(a), initializers(b)
    assert x.keys() == y.keys()
    for name in x:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)


@pytest.mark.parametrize("table_format, target", [("json", "CPU"), ("tpu-mlir", "CPU"), ("tpu-mlir", "NVGPU"),
                                                  ("tensorrt", "NVGPU"), ("json", "DSP")])
def test_a_table_read_back_gives_the_same_model(tmp_path, table_format, target):
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    feeds = random_feeds(16)
    table = tmp_path / f"table.{table_format}"
    first = lowbit.quantize(src, tmp_path / "a.onnx", data=feeds, calibration_table_out=str(table),
                            table_format=table_format, target_device=target, **SETTINGS)
    assert f"calibration table: wrote {table}" in first.summary()
    again = lowbit.quantize(src, tmp_path / "b.onnx", data=feeds, calibration_table=str(table),
                            target_device=target, progress=False)
    _same_model(tmp_path / "a.onnx", tmp_path / "b.onnx")
    runs = [p.what for p in again.data_passes if p.over_calibration_data]
    # no calibration run: the ranges came from the file
    assert runs == ["round_weights", "correct_biases"]


def test_the_three_formats_by_hand(tmp_path):
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    feeds = random_feeds(16)
    outputs = {}
    for table_format in ("json", "tpu-mlir", "tensorrt"):
        outputs[table_format] = tmp_path / f"t.{table_format}"
        result = lowbit.quantize(src, tmp_path / "q.onnx", data=feeds, calibration_table_out=str(outputs[table_format]),
                                 table_format=table_format, **SETTINGS)
    tensors = result.tensors  # input, r1 and p1 (r1 and p1 share one scale: MaxPool moves values)
    table = json.loads(outputs["json"].read_text())
    assert table["format"] == "lowbit-calibration-table" and set(table["tensors"]) == set(tensors)
    for name, entry in table["tensors"].items():
        assert entry["scale"] == pytest.approx(tensors[name].scale, rel=1e-7)
        assert entry["zero_point"] == tensors[name].zero_point and entry["bits"] == 8 and entry["dtype"] == "uint8"
    # the group's union range: r1 and p1 quantize with one range
    assert (table["tensors"]["r1"]["min"], table["tensors"]["r1"]["max"]) == \
        (table["tensors"]["p1"]["min"], table["tensors"]["p1"]["max"])

    lines = [line for line in outputs["tpu-mlir"].read_text().splitlines() if not line.startswith("#")]
    assert outputs["tpu-mlir"].read_text().startswith("# genetated time: ")
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines}
    for name, (threshold, lo, hi) in rows.items():
        assert (lo, hi) == (table["tensors"][name]["min"], table["tensors"][name]["max"])
        assert threshold == max(abs(lo), abs(hi))

    header, *entries = outputs["tensorrt"].read_text().splitlines()
    assert header.startswith("TRT-") and header.endswith("EntropyCalibration2")
    for line in entries:
        name, value = line.split(": ")
        threshold = rows[name][0]
        assert value == struct.pack(">f", threshold / 127).hex()  # big-endian float32 of threshold / 127


def test_a_tpu_mlir_threshold_clips_symmetric_targets(tmp_path):
    """tpu-mlir's rule: symmetric int8 uses [-threshold, threshold], asymmetric uses [min, max]."""
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    table = tmp_path / "cali_table"
    table.write_text("# op_name threshold min max\ninput 2.54 -3.0 4.0\nr1 12.7 0.0 20.0\np1 12.7 0.0 20.0\n")
    for target, scale in (("NVGPU", 2.54 / 127), ("CPU", 7.0 / 255)):
        lowbit.quantize(src, tmp_path / "q.onnx", data=random_feeds(8), calibration_table=str(table),
                        target_device=target, progress=False)
        model = onnx.load(str(tmp_path / "q.onnx"))
        quantize = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
        assert float(initializers(tmp_path / "q.onnx")[quantize.input[1]]) == pytest.approx(scale, rel=1e-6)


def test_without_data_the_table_is_enough(tmp_path):
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    table = tmp_path / "t.json"
    lowbit.quantize(src, tmp_path / "a.onnx", data=random_feeds(16), calibration_table_out=str(table), **SETTINGS)
    with pytest.warns(lowbit.LowbitWarning, match="weights are rounded to nearest"):
        result = lowbit.quantize(src, tmp_path / "b.onnx", calibration_table=str(table), progress=False)
    assert result.data_passes == [] and result.weight_rounding is None and result.bias_correction is None
    onnx.checker.check_model(str(tmp_path / "b.onnx"), full_check=True)


@pytest.mark.parametrize("content, message", [
    ("# op_name threshold min max\ninput 1.0 -1.0 1.0\n", "no range for 2 tensor(s) the model quantizes: r1, p1"),
    ("input 1 -1 1\nr1 1 0 1\np1 1 0 1\nconv7 1 0 1\n", "1 tensor(s) of the table are not tensors of the model: conv7"),
    ("input 1 -1\n", "line 1: expected 'name threshold min max'"),
    ("input one -1 1\n", "line 1: threshold, min and max must be numbers"),
    ("TRT-8601-EntropyCalibration2\ninput: zz\n", "line 2: expected 'tensor: <hex float32 scale>'"),
    ('{"tensors": {"input": {"min": -1}}}', "not a lowbit calibration table"),
    ("input inf -1 1\nr1 1 0 1\np1 1 0 1\n", "the range of tensor 'input' is not finite"),
    ("# nothing\n", "names no tensor"),
])
def test_bad_tables_are_one_line_errors(tmp_path, capsys, content, message):
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    table = tmp_path / "table.txt"
    table.write_text(content)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "q.onnx"
    np.save(tmp_path / "x.npy", random_feeds(1)[0]["input"])
    code = main(["quantize", str(src), "-o", str(out), "--calibration-table", str(table), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not list((tmp_path / "out").iterdir())


def test_tensors_the_target_leaves_float_are_ignored(tmp_path):
    """A table for another target (or a TensorRT cache, which lists every tensor) names tensors of the
    model that this target does not quantize: noted, not an error."""
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    table = tmp_path / "t.txt"
    table.write_text("input 1 -1 1\nr1 1 0 1\np1 1 0 1\nc1 2 -2 2\n")
    with pytest.warns(lowbit.LowbitWarning, match="1 tensor.* not quantized for target CPU.*: c1"):
        lowbit.quantize(src, tmp_path / "q.onnx", calibration_table=str(table), progress=False)


def test_table_keys_that_have_no_effect(tmp_path):
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    table = tmp_path / "t.json"
    lowbit.quantize(src, tmp_path / "a.onnx", data=random_feeds(16), calibration_table_out=str(table), **SETTINGS)
    with pytest.warns(lowbit.LowbitWarning, match="num_bin .* has no effect: the ranges come from calibration_table"):
        lowbit.quantize(src, tmp_path / "b.onnx", data=random_feeds(16), calibration_table=str(table), num_bin=2048,
                        progress=False)
    with warnings.catch_warnings():  # what the table does not replace: the precision rules and the scheme
        warnings.simplefilter("error", lowbit.LowbitWarning)
        lowbit.quantize(src, tmp_path / "d.onnx", data=random_feeds(16), calibration_table=str(table),
                        node_config={"conv2": {"qtype": "int8"}}, asymmetric=True, progress=False)
    with pytest.warns(lowbit.LowbitWarning, match="table_format .* has no effect: no calibration_table_out"):
        lowbit.quantize(src, tmp_path / "c.onnx", data=random_feeds(16), table_format="tensorrt", progress=False)
    with pytest.raises(lowbit.LowbitError, match="is the output model's path"):
        lowbit.quantize(src, tmp_path / "e.onnx", data=random_feeds(16), calibration_table_out=str(tmp_path / "e.onnx"),
                        progress=False)
    with pytest.raises(lowbit.LowbitError, match="output folder does not exist"):
        lowbit.quantize(src, tmp_path / "d.onnx", data=random_feeds(16), calibration_table_out="/nowhere/t.json",
                        progress=False)
