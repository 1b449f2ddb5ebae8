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


def run_onnxruntime(method: str, model: Path, calib: Path, output: Path, size: int | None) -> None:
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
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # ORT's preprocessing and calibrators write scratch files into the working folder
        prepared = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(model), str(prepared))  # ORT's recommended preprocessing
        except Exception:  # its symbolic shape inference fails on some models (PP-OCRv4 rec)
            prepared = model
        quantize_static(str(prepared), str(output), NpyReader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[method])


def run_onnxruntime_dynamic(model: Path, output: Path, per_channel: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(model), str(output), per_channel=per_channel, weight_type=QuantType.QInt8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tool")
    parser.add_argument("model", type=Path)
    parser.add_argument("calib", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--size", type=int)
    args = parser.parse_args()
    start = time.perf_counter()
    if args.tool == "lowbit":
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
