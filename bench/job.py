"""One quantization run, in its own process so that its peak memory can be measured from outside.

    python -m bench.job TOOL MODEL CALIB_DIR OUTPUT [--size N]

TOOL is ``lowbit`` (default settings: the search among MAX_MIN, REMOVAL_OUTLIER, KL and MSE, then
GPTQ weight rounding, then bias correction), ``lowbit-nearest`` (the same with weights rounded to
nearest), ``lowbit-no-bc`` (the search and GPTQ, no bias correction), ``lowbit-METHOD`` (one
activation_quant_method alone, weights rounded to nearest, no bias correction: ``lowbit-MAX_MIN``
is the method of onnxruntime's MinMax, ``lowbit-KL`` that of its Entropy) or ``ort-minmax`` / ``ort-entropy`` /
``ort-percentile`` (onnxruntime.quantization.quantize_static, QDQ, per-channel int8 weights,
uint8 activations: the same layout lowbit writes for the CPU target). Both read the same
folder of .npy samples, one file at a time. Dynamic quantization: ``lowbit-dynamic``
(the default: per-token activation scales on the feed-forward MatMuls, per tensor on the
others), ``lowbit-dynamic-token`` (per token everywhere), ``lowbit-dynamic-tensor``, ``ort-dynamic`` (quantize_dynamic's
defaults) and ``ort-dynamic-per-channel``; they take no data (pass any CALIB_DIR).
Diagnosis (``--quantized QUANTIZED``; OUTPUT is the report): ``lowbit-analyze`` (lowbit analyze
with its HTML/JSON report) and ``ort-qdq-loss-debug`` (onnxruntime.quantization.qdq_loss_debug:
every intermediate tensor of both models collected, then each tensor's and weight's SQNR), both
on the first ``--size`` samples (32 by default).
Prints one JSON line: {"seconds": ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("MAX_MIN", "KL", "REMOVAL_OUTLIER", "MSE", "ACIQ", "AUTO_TUNE")


def run_lowbit(model: Path, calib: Path, output: Path, size: int | None, **settings) -> None:
    import lowbit

    lowbit.quantize(model, output, data=calib, calibrate_size=size, progress=False, **settings)


def run_onnxruntime(method: str, model: Path, calib: Path, output: Path, size: int | None,
                    reduce_range: bool = False) -> None:
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model, calib, output = model.resolve(), calib.resolve(), output.resolve()  # the working folder changes below
    files = sorted(calib.glob("*.npy"))[:size]
    input_name = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class NpyReader(CalibrationDataReader):
        def __init__(self):
            self.files = iter(files)

        def get_next(self):
            path = next(self.files, None)
            return None if path is None else {input_name: np.load(path)}

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    working_folder = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # ORT's preprocessing and calibrators write scratch files into the working folder
        try:
            prepared = Path(tmp) / "pre.onnx"
            try:
                quant_pre_process(str(model), str(prepared))  # ORT's recommended preprocessing
            except Exception:  # its symbolic shape inference fails on some models (PP-OCRv4 rec)
                prepared = model
            quantize_static(str(prepared), str(output), NpyReader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods[method], reduce_range=reduce_range)
        finally:  # back before the folder goes: a caller in the same process (bench/recovery.py) goes on from there
            os.chdir(working_folder)


def run_onnxruntime_dynamic(model: Path, output: Path, per_channel: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(model), str(output), per_channel=per_channel, weight_type=QuantType.QInt8)


def run_lowbit_analyze(model: Path, quantized: Path, calib: Path, report: Path, size: int | None) -> None:
    from lowbit.analysis.analyze import analyze
    from lowbit.reports.analysis import write_report

    write_report(analyze(model, quantized, calib, samples=size or 32), report)


def run_onnxruntime_loss_debug(model: Path, quantized: Path, calib: Path, output: Path, size: int | None) -> None:
    """onnxruntime.quantization.qdq_loss_debug on the same pair: every tensor's SQNR, every weight's SQNR."""
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization import qdq_loss_debug as debug

    files = sorted(calib.glob("*.npy"))[: size or 32]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.files = iter(files)

        def get_next(self):
            path = next(self.files, None)
            return None if path is None else {_input_name(model): np.load(path)}

    with tempfile.TemporaryDirectory() as folder:
        float_augmented, quant_augmented = Path(folder) / "float.onnx", Path(folder) / "quant.onnx"
        debug.modify_model_output_intermediate_tensors(str(model), str(float_augmented))
        debug.modify_model_output_intermediate_tensors(str(quantized), str(quant_augmented))
        float_activations = debug.collect_activations(str(float_augmented), Reader())
        quant_activations = debug.collect_activations(str(quant_augmented), Reader())
    matched = debug.create_activation_matching(quant_activations, float_activations)
    errors = debug.compute_activation_error(matched)
    weights = debug.compute_weight_error(debug.create_weight_matching(str(model), str(quantized)))
    output.write_text(json.dumps({"activations": len(errors), "weights": len(weights)}))


def _input_name(model: Path) -> str:
    import onnx

    return onnx.load(str(model), load_external_data=False).graph.input[0].name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tool")
    parser.add_argument("model", type=Path)
    parser.add_argument("calib", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--size", type=int)
    parser.add_argument("--quantized", type=Path, help="analysis tools: the quantized model to analyse")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.tool == "lowbit-analyze":
        run_lowbit_analyze(args.model, args.quantized, args.calib, args.output, args.size)
    elif args.tool == "ort-qdq-loss-debug":
        run_onnxruntime_loss_debug(args.model, args.quantized, args.calib, args.output, args.size)
    elif args.tool == "lowbit":
        run_lowbit(args.model, args.calib, args.output, args.size)
    elif args.tool == "lowbit-nearest":
        run_lowbit(args.model, args.calib, args.output, args.size, weight_rounding="NEAREST")
    elif args.tool == "lowbit-no-bc":
        run_lowbit(args.model, args.calib, args.output, args.size, bias_correction=False)
    elif args.tool.removeprefix("lowbit-") in METHODS:
        run_lowbit(args.model, args.calib, args.output, args.size, bias_correction=False, weight_rounding="NEAREST",
                   activation_quant_method=args.tool.removeprefix("lowbit-"))
    elif args.tool.startswith("lowbit-dynamic"):
        import lowbit

        granularity = {"lowbit-dynamic": "AUTO", "lowbit-dynamic-token": "TOKEN",
                       "lowbit-dynamic-tensor": "TENSOR"}[args.tool]
        lowbit.quantize(args.model, args.output, quant_type="DYNAMIC_QUANT", dynamic_quant_granularity=granularity,
                        progress=False)
    elif args.tool.startswith("ort-dynamic"):
        run_onnxruntime_dynamic(args.model, args.output, per_channel=args.tool.endswith("per-channel"))
    else:
        run_onnxruntime(args.tool.removeprefix("ort-"), args.model, args.calib, args.output, args.size)
    print(json.dumps({"seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
