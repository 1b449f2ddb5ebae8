"""Mixed precision on real models: int16, float16 and float32 per node, and error compensation, in one run.

    python bench/mixed.py      # writes bench/MIXED.md and bench/mixed.json

With the calibration and held-out data of bench/run.py:

1. EfficientNet-Lite0, whole model: int8 (the defaults) against ``all_node_type=int16`` (CPU) and
   ``all_node_type=float16`` (the NVGPU preset, run here in ONNX Runtime CPU): held-out output
   error (1 - cosine), top-1 agreement, file size, and latency at batch 1 and 8 beside the
   float model and onnxruntime's quantize_static (QDQ, MinMax, per channel).
2. PP-OCRv4 rec and magika, node by node: ``lowbit analyze`` ranks the nodes of the int8 model
   on calibration samples; the first k of its ranking (k = 1, 2, 4, ...) get int16 through a
   Horizon quant_config JSON (``node_config``), until the held-out goal is met (PP-OCR rec:
   mean cosine >= 0.995; magika: the least cosine >= 0.9); the share of weighted nodes
   (Conv, Gemm, MatMul) still int8, and the latency.
3. Error compensation (``ec``) on real layers: the layer's own output against the float
   layer's, on held-out inputs, with int8 and with ec on the input the seed allows: an
   EfficientNet-Lite0 Conv weight, PP-OCRv4 rec MatMul inputs (a weight, an activation),
   a PP-OCRv4 det Resize input.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import run, zoo

HERE = Path(__file__).resolve().parent
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def held_out(path: Path, case: run.Case, reference: np.ndarray) -> dict[str, float]:
    got = run.outputs(path, case)
    cosines = [zoo.cosine(a, b) for a, b in zip(reference, got)]
    out = {"error": float(1 - np.mean(cosines)), "cosine_mean": float(np.mean(cosines)),
           "cosine_min": float(np.min(cosines))}
    if case.task == "classification":
        out["agreement"] = float(np.mean(reference.argmax(-1) == got.argmax(-1)))
    return out


def weighted_int8_share(result) -> dict:
    nodes = [n for n in result.quantized_nodes + result.float_nodes if n.op_type in WEIGHTED]
    int8 = [n for n in result.quantized_nodes if n.op_type in WEIGHTED and n.precision in ("int8", "")]
    return {"weighted": len(nodes), "weighted_int8": len(int8), "share": len(int8) / max(1, len(nodes))}


def latency(paths: dict[str, Path], case: run.Case, batches=(1, 8)) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {name: {} for name in paths}
    for batch in batches:
        feed = {case.input_name: case.evaluation[:batch]}
        for name, ms in run.compare_latency(paths, feed, runs=20 if batch == 1 else 8).items():
            out[name][batch] = ms
    return out


# -- 1. whole-model precisions ------------------------------------------------------------

def whole_model(work: Path) -> dict:
    import lowbit

    case = run.efficientnet_case(256, 32)
    calib = run.write_calibration(case, work)
    reference = run.outputs(case.model, case)
    settings = {"int8": {}, "all_node_type=int16": {"all_node_type": "int16"},
                "all_node_type=float16 (NVGPU)": {"all_node_type": "float16", "target_device": "NVGPU"}}
    rows, paths = {}, {"float": case.model}
    for label, kw in settings.items():
        path = work / f"{label.split()[0].replace('=', '_')}.onnx"
        start = time.perf_counter()
        result = lowbit.quantize(case.model, path, data=calib, progress=False, **kw)
        rows[label] = {"seconds": time.perf_counter() - start, "bytes": run.model_bytes(path),
                       **held_out(path, case, reference), "warnings": result.warnings}
        paths[label] = path
        print(f"   {label}: {rows[label]['error']:.3g}", flush=True)
    run.quantize_in_child("ort-qdq-per-channel", case.model, calib, work / "ort.onnx")
    paths["onnxruntime quantize_static"] = work / "ort.onnx"
    rows["onnxruntime quantize_static"] = {"bytes": run.model_bytes(work / "ort.onnx"),
                                           **held_out(work / "ort.onnx", case, reference)}
    rows["float"] = {"bytes": run.model_bytes(case.model), "error": 0.0}
    for label, by_batch in latency(paths, case).items():
        rows[label]["latency_ms"] = by_batch
    return {"name": case.name, "calibration": len(case.calib), "evaluation": len(case.evaluation), "rows": rows}


# -- 2. node by node, from the analysis --------------------------------------------------

def from_analysis(case: run.Case, work: Path, goal: str, threshold: float) -> dict:
    import lowbit

    calib = run.write_calibration(case, work)
    reference = run.outputs(case.model, case)
    base = lowbit.quantize(case.model, work / "int8.onnx", data=calib, progress=False)
    start = time.perf_counter()
    analysis = lowbit.analyze(case.model, work / "int8.onnx", data=calib, samples=32, report=work / "report.html")
    analysis_s = time.perf_counter() - start
    ranking = [n["name"] for n in json.loads((work / "report.json").read_text())["nodes"]
               if n["op_type"] != "(output rounding)"]
    steps = [{"k": 0, "nodes": [], **held_out(work / "int8.onnx", case, reference), **weighted_int8_share(base)}]
    print(f"   int8: {goal} {steps[0][goal]:.4f} (analysis {analysis_s:.0f} s, {len(ranking)} nodes ranked)",
          flush=True)
    k, met = 1, steps[0][goal] >= threshold
    while not met and k <= len(ranking):
        nodes = ranking[:k]
        config = work / f"quant_config_{k}.json"
        config.write_text(json.dumps({"node_config": {name: {"qtype": "int16"} for name in nodes}}, indent=1))
        path = work / f"int16_{k}.onnx"
        result = lowbit.quantize(case.model, path, config=config, data=calib, progress=False)
        steps.append({"k": k, "nodes": nodes, **held_out(path, case, reference), **weighted_int8_share(result)})
        met = steps[-1][goal] >= threshold
        print(f"   first {k} int16: {goal} {steps[-1][goal]:.4f}, weighted int8 {steps[-1]['share']:.2f}", flush=True)
        k *= 2
    final = work / f"int16_{steps[-1]['k']}.onnx" if steps[-1]["k"] else work / "int8.onnx"
    timing = latency({"float": case.model, "int8": work / "int8.onnx", "mixed": final}, case, batches=(1,))
    return {"name": case.name, "goal": f"{goal} >= {threshold}", "met": met, "analysis_s": analysis_s,
            "suggestion": analysis.suggestion.nodes, "steps": steps, "latency_ms": timing,
            "config": (work / f"quant_config_{steps[-1]['k']}.json").read_text() if steps[-1]["k"] else ""}


# -- 3. error compensation on one layer ---------------------------------------------------

def layer_outputs(path: Path, tensor: str, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    model = onnx.load(path)
    if tensor not in {o.name for o in model.graph.output}:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    session = run.quiet_session_from_proto(model)
    return np.stack([session.run([tensor], feed)[0] for feed in feeds])


def compensation(case: run.Case, work: Path, node: str, index: int, tensor: str, target: str | None = None) -> dict:
    """The layer output ``tensor`` of ``node`` in int8 and with ec on input ``index``, against float."""
    import lowbit

    calib = run.write_calibration(case, work)
    feeds = [{case.input_name: x[np.newaxis]} for x in case.evaluation]
    reference = layer_outputs(case.model, tensor, feeds)
    out = {"case": case.name, "node": node, "input": index, "target": target or "CPU"}
    for label, node_config in (("int8", None), ("ec", {node: {f"input{index}": "ec"}})):
        path = work / f"{node.replace('/', '_')}_{label}.onnx"
        lowbit.quantize(case.model, path, data=calib, progress=False, node_config=node_config, target_device=target,
                        weight_rounding="NEAREST")
        name = tensor if label == "int8" else f"{tensor}_compensated"
        got = layer_outputs(path, name, feeds)
        diff = got - reference
        out[label] = {"error": float(1 - np.mean([zoo.cosine(a, b) for a, b in zip(reference, got)])),
                      "relative_mse": float((diff ** 2).mean() / (reference ** 2).mean())}
    out["removed"] = 1 - out["ec"]["relative_mse"] / out["int8"]["relative_mse"]
    print(f"   ec {case.name} {node} input{index}: relative MSE {out['int8']['relative_mse']:.3g} -> "
          f"{out['ec']['relative_mse']:.3g} ({100 * out['removed']:.0f}% removed)", flush=True)
    return out
