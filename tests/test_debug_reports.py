"""MindSpore's debug reports (debug_info_save_path): the seed's files and columns, with values checked by hand."""

import csv

import numpy as np
import onnx
import pytest
from conftest import float_input, make_model, run, save
from onnx import helper, numpy_helper

import lowbit
from lowbit.cli import main
from lowbit.reports.debug import PARAM_COLUMNS, ROUND_COLUMNS, SUMMARY_COLUMNS


def conv_relu_model():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(24, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["output"], name="pool")]
    return make_model(nodes, [float_input("input", ["N", 3, 8, 8])], [float_input("output", ["N", 24, 1, 1])],
                      [("w", w), ("b", rng.normal(size=24).astype(np.float32))])


def samples(n, outlier=False):
    rng = np.random.default_rng(1)
    data = [{"input": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]
    if outlier:  # one value far out: REMOVAL_OUTLIER clips it
        data[0]["input"][0, 0, 0, 0] = 40.0
    return data


def read(path):
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        return header, [dict(zip(header, row)) for row in reader]


def test_full_quant_writes_every_round_with_the_seed_columns(tmp_path):
    src = save(conv_relu_model(), tmp_path / "m.onnx")
    folder = tmp_path / "debug"
    data = samples(8, outlier=True)
    result = lowbit.quantize(src, tmp_path / "q.onnx", data=data, debug_info_save_path=str(folder),
                             activation_quant_method="REMOVAL_OUTLIER", max_percentile=0.99, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["output_summary.csv", "quant_param.csv"] + [f"round_{k}.csv" for k in range(1, 9)])
    header, summary = read(folder / "output_summary.csv")
    assert header == SUMMARY_COLUMNS and [r["Round"] for r in summary] == [str(k) for k in range(1, 9)]

    # round 1, by hand: the float model's tensors on sample 1, the quantized model's dequantized ones
    header, rows = read(folder / "round_1.csv")
    assert header == ROUND_COLUMNS
    by_key = {(r["NodeName"], r["TensorName"], r["DataTypeFlag"]): r for r in rows}
    float_input_values = data[0]["input"]
    origin = by_key[("conv", "input", "Origin")]
    assert float(origin["MAX"]) == pytest.approx(40.0) and float(origin["Min"]) == pytest.approx(
        float_input_values.min())
    assert float(origin["Median"]) == pytest.approx(float(np.median(float_input_values)), rel=1e-6)
    assert float(origin["Mean"]) == pytest.approx(float(float_input_values.mean()), rel=1e-5)
    assert float(origin["Var"]) == pytest.approx(float(float_input_values.var()), rel=1e-5)
    # the input's range comes from the quantized model: the 40 lies outside it, one value of 192
    model = onnx.load(str(tmp_path / "q.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    scale, zero = float(inits[q.input[1]]), int(inits[q.input[2]])
    high = (255 - zero + 0.5) * scale
    assert high < 40.0
    expected_clip = np.mean(float_input_values > high) + np.mean(float_input_values < (0 - zero - 0.5) * scale)
    dequant = by_key[("conv", "input", "Dequant")]
    assert float(dequant["Clip"]) == pytest.approx(expected_clip) and float(dequant["Clip"]) > 0
    assert float(dequant["MAX"]) == pytest.approx((255 - zero) * scale, rel=1e-5)  # saturated
    x = float_input_values.astype(np.float64).ravel()
    expected = (np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale  # QuantizeLinear then DequantizeLinear
    assert float(origin["CosineSimilarity"]) == 1.0
    assert float(dequant["CosineSimilarity"]) == pytest.approx(x @ expected / np.linalg.norm(x) / np.linalg.norm(
        expected), rel=1e-5)  # 0.49: the clipped 40 held most of the norm

    # the seed's advice: InOutFlag == Output and DataTypeFlag == Dequant lists each quantized op's output
    outputs = {r["NodeName"] for r in rows if r["InOutFlag"] == "Output" and r["DataTypeFlag"] == "Dequant"}
    assert outputs == {n.name for n in result.quantized_nodes}
    relu = by_key[("relu", "r", "Origin")]
    assert float(relu["Sparsity"]) > 0.2  # a ReLU output: zeros are counted
    weights = [r for r in rows if r["TensorTypeFlag"] == "Weight"]
    assert {r["TensorName"] for r in weights} == {"w", "b"} and len(weights) == 4  # the int32 bias too

    # quant_param.csv: the scales and zero points the model holds; bias correction's shift per channel
    header, params = read(folder / "quant_param.csv")
    assert header == PARAM_COLUMNS
    weight_rows = [r for r in params if r["TensorName"] == "w"]
    conv = next(n for n in model.graph.node if n.name == "conv")
    weight_dq = next(n for n in model.graph.node if n.output[0] == conv.input[1])
    np.testing.assert_allclose([float(r["Scale"]) for r in weight_rows], inits[weight_dq.input[1]], rtol=1e-6)
    assert {r["Bits"] for r in weight_rows} == {"8"} and weight_rows[0]["Dims"] == "[24, 3, 3, 3]"
    assert weight_rows[0]["ElementsNum"] == str(24 * 27)
    shifts = result.bias_correction.shifts["conv"]
    np.testing.assert_allclose([float(r["CorrectionMean"]) for r in weight_rows], shifts, rtol=1e-6)
    assert next(r for r in params if r["TensorName"] == "input")["ZeroPoint"] == str(zero)
    assert {r["Bits"] for r in params if r["TensorName"] == "b"} == {"32"}


def test_output_summary_is_the_output_cosine_per_round(tmp_path):
    src = save(conv_relu_model(), tmp_path / "m.onnx")
    data = samples(3)
    lowbit.quantize(src, tmp_path / "q.onnx", data=data, debug_info_save_path=str(tmp_path / "d"), progress=False)
    _, summary = read(tmp_path / "d" / "output_summary.csv")
    for row, feed in zip(summary, data):
        a, b = run(src, feed)[0].ravel().astype(np.float64), run(tmp_path / "q.onnx", feed)[0].ravel()
        assert float(row["CosineSimilarity"]) == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_weight_quant_writes_one_report_of_weights(tmp_path):
    src = save(conv_relu_model(), tmp_path / "m.onnx")
    folder = tmp_path / "debug"
    lowbit.quantize(src, tmp_path / "q.onnx", quant_type="WEIGHT_QUANT", bit_num=3, debug_info_save_path=str(folder),
                    progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["quant_param.csv", "round_1.csv"]  # no data: no outputs
    _, rows = read(folder / "round_1.csv")
    assert {r["TensorTypeFlag"] for r in rows} == {"Weight"} and {r["DataTypeFlag"] for r in rows} == {
        "Origin", "Dequant"}
    _, params = read(folder / "quant_param.csv")
    assert {r["Bits"] for r in params} == {"3"} and len(params) == 24  # stored as int4, 3 bits used


def test_dynamic_refuses_it_and_the_cli_takes_it(tmp_path, capsys):
    src = save(conv_relu_model(), tmp_path / "m.onnx")
    code = main(["quantize", str(src), "-o", str(tmp_path / "d.onnx"), "--quant-type", "DYNAMIC_QUANT",
                 "--debug-info-save-path", str(tmp_path / "x")])
    assert code == 2 and "debug_info_save_path applies to FULL_QUANT and WEIGHT_QUANT" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "d.onnx").exists()
    np.save(tmp_path / "s.npy", samples(1)[0]["input"])
    code = main(["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--data", str(tmp_path), "-q",
                 "--debug-info-save-path", str(tmp_path / "y")])
    assert code == 0 and (tmp_path / "y" / "round_1.csv").exists()


def test_a_debug_folder_that_is_a_file_fails_before_any_output(tmp_path, tiny_model, tiny_calib):
    from lowbit.cli import main

    (tmp_path / "taken").write_text("")
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(tiny_model), "-o", str(out), "--data", str(tiny_calib), "--quiet",
                 f"--debug-info-save-path={tmp_path / 'taken'}"]) == 2
    assert not out.exists()
