"""Int8 models on an x86 CPU without VNNI: what ONNX Runtime's integer kernels compute, beside what the Q/DQ nodes say.

    python bench/saturation.py             # writes bench/SATURATION.md and bench/saturation.json (about 10 minutes)

On CPUs with AVX2 (or AVX-512) but no VNNI, ONNX Runtime's u8 x s8 kernels add two products in a
16-bit lane and saturate (see lowbit.quantizers.saturation). For EfficientNet-Lite0 and Lite1
(300 held-out crops of natural photos, calibrated on 256 crops of other images), the digit
CNN (1000 held-out digits) and PP-OCR's direction classifier (bench/recovery.py's models), in one
run on the same data: onnxruntime.quantization's MinMax (QDQ, per channel, U8S8), the same with
reduce_range (7-bit weights, onnxruntime's advice for such CPUs), lowbit's default with
saturation_safe_weights=false and lowbit's default. Each model runs
twice: in ONNX Runtime as it is ("kernels": the fused QLinearConv / QGemm) and with graph
optimizations off ("Q/DQ": every QuantizeLinear and DequantizeLinear on its own around float
ops, what the integers stand for, never saturated). Figures: top-1 agreement with the float
model, 1 - cosine (mean over inputs), latency at batch 8 (kernels).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import recovery, run, zoo
from bench.job import run_onnxruntime

HERE = Path(__file__).resolve().parent
TOOLS = ("onnxruntime MinMax", "onnxruntime MinMax, reduce_range", "lowbit, saturation_safe_weights=false",
         "lowbit default")


def has_vnni() -> bool:
    return any(flag in run.cpu_flags() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def figures(path: Path, case: run.Case, reference: np.ndarray, fused: bool) -> dict:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {case.input_name: x[np.newaxis]})[0] for x in case.evaluation])
    return {"agreement": float(np.mean(reference.argmax(-1) == got.argmax(-1))),
            "error": float(1 - np.mean([zoo.cosine(a, b) for a, b in zip(reference, got)]))}


def bench_model(case: run.Case, work: Path) -> dict:
    import lowbit

    work.mkdir(parents=True, exist_ok=True)
    calib = run.write_calibration(case, work)
    reference = run.outputs(case.model, case)
    paths, seconds = {}, {}
    for tool in TOOLS:
        out = paths[tool] = work / (tool.replace(" ", "_").replace(",", "").replace("=", "_") + ".onnx")
        start = time.perf_counter()
        if tool.startswith("onnxruntime"):
            run_onnxruntime("minmax", case.model, calib, out, None, reduce_range="reduce_range" in tool)
        else:
            lowbit.quantize(case.model, out, data=calib, progress=False,
                            saturation_safe_weights=tool == "lowbit default")
        seconds[tool] = time.perf_counter() - start
    feed = {case.input_name: np.repeat(case.evaluation[:1], 8, axis=0)}
    latency = run.compare_latency({"float": case.model, **paths}, feed, runs=10)
    rows = {tool: {"kernels": figures(path, case, reference, True), "qdq": figures(path, case, reference, False),
                   "latency_b8_ms": latency[tool], "seconds": seconds[tool]} for tool, path in paths.items()}
    for tool, row in rows.items():
        print(f"  {tool}: {row}", flush=True)
    return {"case": case.name, "inputs": len(case.evaluation), "float_latency_b8_ms": latency["float"], "rows": rows}


def markdown(result: dict) -> str:
    lines = ["# Int8 models on a CPU without VNNI: integer kernels beside the Q/DQ nodes", "",
             f"Machine: {result['machine']}; VNNI: {'yes' if result['vnni'] else 'no'}. onnxruntime "
             f"{result['onnxruntime']}. `python bench/saturation.py`; held-out inputs only, against the float model. "
             "\"kernels\": ONNX Runtime as it runs the model (fused integer kernels); \"Q/DQ\": graph optimizations "
             "off, every Q/DQ node on its own around float ops (what the integers stand for).", ""]
    for model in result["models"]:
        lines += [f"## {model['case']} ({model['inputs']} held-out inputs; float latency at batch 8: "
                  f"{model['float_latency_b8_ms']:.1f} ms)", "",
                  "| tool | agreement, kernels | 1 - cosine, kernels | agreement, Q/DQ | 1 - cosine, Q/DQ | "
                  "latency b8 ms | quantize s |", "|---|---|---|---|---|---|---|"]
        for tool, row in model["rows"].items():
            k, q = row["kernels"], row["qdq"]
            lines.append(f"| {tool} | {k['agreement']:.3f} | {k['error']:.5f} | {q['agreement']:.3f} | "
                         f"{q['error']:.5f} | {row['latency_b8_ms']:.1f} | {row['seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:] == ["--markdown"]:
        (HERE / "SATURATION.md").write_text(markdown(json.loads((HERE / "saturation.json").read_text())))
        return
    work = zoo.cache_dir("bench", "saturation")
    models = []
    for name, case in recovery.cases().items():
        print(f"== {name}", flush=True)
        models.append(bench_model(case, work / name.split(" ")[0].lower()))
    result = {"machine": run.describe_machine(), "vnni": has_vnni(), "onnxruntime": ort.__version__,
              "models": models}
    (HERE / "saturation.json").write_text(json.dumps(result, indent=1) + "\n")
    (HERE / "SATURATION.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
