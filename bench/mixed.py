"""Mixed precision on real models: int16, float16 and float32 per node, and error compensation, in one run.

    python bench/mixed.py      # writes bench/MIXED.md and bench/mixed.json

With the calibration and held-out data of bench/run.py:

1. EfficientNet-Lite0, whole model: int8 (the defaults) against ``all_node_type=int16`` (CPU) and
   ``all_node_type=float16`` (the NVGPU preset, run here in ONNX Runtime CPU): held-out output
   error (1 - cosine), top-1 agreement, file size, and latency at batch 1 and 8 beside the
   float model and onnxruntime's quantize_static (QDQ, MinMax, per channel).
2. PP-OCRv4 rec and magika, node by node: ``lowbit analyze`` ranks the nodes of the int8 model
   on calibration samples; the first k of its ranking (k = 1, 2, 4, ...) get int16 through a
   Horizon quant_config JSON (``node_config``), passing over the weighted nodes (Conv, Gemm,
   MatMul) beyond a fifth of them, until the held-out goal is met (PP-OCR rec: mean cosine
   >= 0.995; magika, on the files magika feeds its model: the least cosine >= 0.9); the
   share of weighted nodes still int8, and the latency. PP-OCR rec also by op type.
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


def latency(paths: dict[str, Path], case: run.Case, batches=(1, 8)) -> dict[str, dict[str, float]]:
    """ms per run of each model at each batch size (keys "1", "8": as the JSON file holds them)."""
    out: dict[str, dict[str, float]] = {name: {} for name in paths}
    for batch in batches:
        feed = {case.input_name: case.evaluation[:batch]}
        for name, ms in run.compare_latency(paths, feed, runs=20 if batch == 1 else 8).items():
            out[name][str(batch)] = ms
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
    run.quantize_in_child("ort-minmax", case.model, calib, work / "ort.onnx")
    paths["onnxruntime quantize_static (MinMax)"] = work / "ort.onnx"
    rows["onnxruntime quantize_static (MinMax)"] = {"bytes": run.model_bytes(work / "ort.onnx"),
                                                    **held_out(work / "ort.onnx", case, reference)}
    rows["float"] = {"bytes": run.model_bytes(case.model), "error": 0.0}
    for label, by_batch in latency(paths, case).items():
        rows[label]["latency_ms"] = by_batch
    return {"name": case.name, "calibration": len(case.calib), "evaluation": len(case.evaluation), "rows": rows}


# -- 2. node by node, from the analysis --------------------------------------------------

def int16_order(nodes: list[dict], weighted: int, keep_int8: float = 0.8) -> list[str]:
    """The analysis ranking, without the weighted nodes beyond the share that may leave int8."""
    budget = int(weighted * (1 - keep_int8))
    order = []
    for node in nodes:
        if node["op_type"] == "(output rounding)":
            continue
        if node["op_type"] in WEIGHTED:
            if budget == 0:
                continue
            budget -= 1
        order.append(node["name"])
    return order


def weighted_nodes(path: Path) -> list[str]:
    """The Conv / ConvTranspose / Gemm / MatMul nodes with a constant weight, as lowbit names them."""
    from lowbit.graph.loading import load_model
    from lowbit.graph.passes import prepare
    from lowbit.graph.query import constant_array

    return [node.name for node in prepare(load_model(path)[0]).graph
            if node.op_type in WEIGHTED and constant_array(node.inputs[1]) is not None]


def whole_op_types(case: run.Case) -> dict[str, dict]:
    """Precisions by op type rather than by ranking, for comparison (lowbit keys)."""
    weights_int8 = {name: {"input1": "int8"} for name in weighted_nodes(case.model)}
    return {
        "every node int16 but the weighted ones (op_config Conv, MatMul: int8)":
            {"all_node_type": "int16", "op_config": {"Conv": "int8", "MatMul": "int8"}},
        "every Conv int16 (op_config)": {"op_config": {"Conv": "int16"}},
        "int16 activations everywhere, every weight int8 (node_config input1: int8)":
            {"all_node_type": "int16", "node_config": weights_int8},
        "all_node_type=int16": {"all_node_type": "int16"},
    }


def from_analysis(case: run.Case, work: Path, goal: str, threshold: float, settings: dict | None = None,
                  compare: dict[str, dict] | None = None) -> dict:
    """int16 on the first k nodes of the analysis ranking (k = 1, 2, 4 ...) until ``goal`` >= ``threshold``.

    At least 80% of the weighted nodes stay int8: the ranking's weighted nodes beyond
    that share are passed over. ``settings`` apply to every model (lowbit keys);
    ``compare``: other precision settings measured beside the ranking's.
    """
    import lowbit

    settings = dict(settings or {})
    calib = run.write_calibration(case, work)
    reference = run.outputs(case.model, case)
    base = lowbit.quantize(case.model, work / "int8.onnx", data=calib, progress=False, **settings)
    start = time.perf_counter()
    analysis = lowbit.analyze(case.model, work / "int8.onnx", data=calib, samples=32, report=work / "report.html")
    analysis_s = time.perf_counter() - start
    share = weighted_int8_share(base)
    ranking = int16_order(json.loads((work / "report.json").read_text())["nodes"], share["weighted"])
    steps = [{"k": 0, "nodes": [], **held_out(work / "int8.onnx", case, reference), **share}]
    print(f"   int8: {goal} {steps[0][goal]:.4f} (analysis {analysis_s:.0f} s, {len(ranking)} nodes in the order)",
          flush=True)
    k, met = 1, steps[0][goal] >= threshold
    while not met and k < 2 * len(ranking):
        nodes = ranking[:k]  # the last step takes the whole order
        config = work / f"quant_config_{k}.json"
        written = {"node_config": {name: {"qtype": "int16"} for name in nodes}}
        config.write_text(json.dumps({**written, "lowbit": settings} if settings else written, indent=1))
        path = work / f"int16_{k}.onnx"
        result = lowbit.quantize(case.model, path, config=config, data=calib, progress=False)
        steps.append({"k": k, "nodes": nodes, **held_out(path, case, reference), **weighted_int8_share(result)})
        met = steps[-1][goal] >= threshold
        print(f"   first {k} int16: {goal} {steps[-1][goal]:.4f}, weighted int8 {steps[-1]['share']:.2f}", flush=True)
        k *= 2
    others = {}
    for i, (label, extra) in enumerate((compare or {}).items()):
        path = work / f"compare_{i}.onnx"
        result = lowbit.quantize(case.model, path, data=calib, progress=False, **settings, **extra)
        others[label] = {**held_out(path, case, reference), **weighted_int8_share(result)}
        print(f"   {label}: {goal} {others[label][goal]:.4f}, weighted int8 {others[label]['share']:.2f}", flush=True)
    final = work / f"int16_{steps[-1]['k']}.onnx" if steps[-1]["k"] else work / "int8.onnx"
    timing = latency({"float": case.model, "int8": work / "int8.onnx", "mixed": final,
                      **{label: work / f"compare_{i}.onnx" for i, label in enumerate(others)}}, case, batches=(1,))
    return {"name": case.name, "settings": settings, "goal": f"{goal} >= {threshold}", "met": met,
            "analysis_s": analysis_s,
            "suggestion": analysis.suggestion.nodes, "steps": steps, "latency_ms": timing, "compare": others,
            "config": (work / f"quant_config_{steps[-1]['k']}.json").read_text() if steps[-1]["k"] else ""}


# -- 3. error compensation on one layer ---------------------------------------------------

def layer_outputs(path: Path, tensor: str, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """``tensor`` of the model at ``path`` on each feed (made a graph output in a copy)."""
    model = onnx.load(path)
    if tensor not in {o.name for o in model.graph.output}:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    copy = path.with_name(path.stem + "_probe.onnx")
    onnx.save(model, copy)
    session = run.quiet_session(copy)
    return np.stack([session.run([tensor], feed)[0] for feed in feeds])


def prepared_op_types(path: Path) -> set[str]:
    """The op types of the model as lowbit plans it (Constants folded, BatchNormalization folded ...)."""
    from lowbit.graph.loading import load_model
    from lowbit.graph.passes import prepare

    return {node.op_type for node in prepare(load_model(path)[0]).graph}


def compensation(case: run.Case, work: Path, node: str, index: int, tensor: str, also: tuple[str, ...] = ()) -> dict:
    """The layer output ``tensor`` of ``node`` in int8 and with ec on input ``index``, against float.

    Every other node is float32 (op_config), except those in ``also`` (int8: a data-movement
    op quantizes only after a quantized producer), so that the error is the layer's own.
    """
    import lowbit

    calib = run.write_calibration(case, work)
    feeds = [{case.input_name: x[np.newaxis]} for x in case.evaluation]
    reference = layer_outputs(case.model, tensor, feeds)
    out = {"case": case.name, "node": node, "input": index, "others": list(also)}
    op_config = {op: "float32" for op in prepared_op_types(case.model)}
    for label, precision in (("int8", {"qtype": "int8"}), ("ec", {"qtype": "int8", f"input{index}": "ec"})):
        path = work / f"{node.replace('/', '_')}_{label}.onnx"
        node_config = {node: precision, **{name: "int8" for name in also}}
        lowbit.quantize(case.model, path, data=calib, progress=False, op_config=op_config, node_config=node_config,
                        weight_rounding="NEAREST", bias_correction=False)
        name = tensor if label == "int8" else f"{tensor}_compensated"
        got = layer_outputs(path, name, feeds)
        diff = got - reference
        out[label] = {"error": float(1 - np.mean([zoo.cosine(a, b) for a, b in zip(reference, got)])),
                      "relative_mse": float((diff ** 2).mean() / (reference ** 2).mean())}
    out["removed"] = 1 - out["ec"]["relative_mse"] / out["int8"]["relative_mse"]
    print(f"   ec {case.name} {node} input{index}: relative MSE {out['int8']['relative_mse']:.3g} -> "
          f"{out['ec']['relative_mse']:.3g} ({100 * out['removed']:.0f}% removed)", flush=True)
    return out


def magika_case() -> run.Case:
    """bench/run.py's magika case, less the files magika types without its model.

    magika sends a file to its model only when at least 8 bytes remain after stripping
    (``min_file_size_for_dl`` in its config); smaller ones are typed by rule. On those
    inputs, nearly all padding, the model's layer norms divide by a near-zero deviation.
    """
    case = run.magika_case(256, 300)
    modelled = [x for x in case.calib if x[7] != 256]
    evaluation = case.evaluation[case.evaluation[:, 7] != 256]
    return run.Case(case.name, case.model, case.input_name, modelled, evaluation, task=case.task,
                    data=case.data + " Files under magika's min_file_size_for_dl (8 bytes) left out.")


def ppocr_det_case(n_calib: int) -> run.Case:
    """PP-OCRv4 det on 320x320 crops of opencv-doc's text pictures (ImageNet mean/std, as PP-OCR does)."""
    from PIL import Image

    def crops(names, seed, count):
        out = []
        for k, name in enumerate(names):
            image = np.asarray(Image.open(zoo.opencv_doc_data() / name).convert("RGB"))
            for crop in zoo.crops(image, count, seed + k):
                x = np.asarray(Image.fromarray(crop).resize((320, 320), Image.BILINEAR), np.float32) / 255.0
                x = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
                out.append(x.transpose(2, 0, 1).astype(np.float32))
        return out

    calib = crops(["imageTextN.png", "notes.png", "sudoku.png", "pic1.png"], 0, 16)[:n_calib]
    evaluation = np.stack(crops(["text_defocus.jpg", "licenseplate_motion.jpg", "imageTextR.png"], 1, 4))
    return run.Case("PP-OCRv4 det", zoo.ppocr_models()["det"], "x", calib, evaluation, task="dense")


def markdown(results: dict) -> str:
    whole = results["whole_model"]
    lines = ["# Mixed precision on real models", "",
             f"`{results['command']}` on {results['date']}: {results['machine']}.", "",
             f"## {whole['name']}: the whole model in one precision", "",
             f"Calibration {whole['calibration']} samples, held-out {whole['evaluation']} crops; latency in "
             "ONNX Runtime CPU (ms, best of 5 rounds' medians, the models taking turns).", "",
             "| model | 1 - cosine | agreement | MB | batch 1 | batch 8 |", "|---|---|---|---|---|---|"]
    for label, row in whole["rows"].items():
        agreement = f"{row['agreement']:.3f}" if "agreement" in row else "1"
        ms = row.get("latency_ms", {})
        lines.append(f"| {label} | {row['error']:.3g} | {agreement} | {row['bytes'] / 1e6:.2f} | "
                     f"{ms.get('1', float('nan')):.1f} | {ms.get('8', float('nan')):.1f} |")
    int8, int16 = whole["rows"]["int8"]["error"], whole["rows"]["all_node_type=int16"]["error"]
    lines += ["", f"int16 / int8 output error: {int16 / int8:.2g}. The float16 model computes in float16 on "
                  "TensorRT; ONNX Runtime's CPU provider has no float16 Conv kernel, so here it inserts Casts "
                  "and computes in float32 (its latency is not TensorRT's).", ""]
    for case in results["from_analysis"]:
        settings = "".join(f", {k}={v}" for k, v in case["settings"].items())
        lines += [f"## {case['name']}{settings}: int16 where the analysis ranks first ({case['goal']})", "",
                  f"`lowbit analyze` on the int8 model: {case['analysis_s']:.0f} s; its suggestion: "
                  + (", ".join(f"`{n}`" for n in case["suggestion"]) or "none") + ".", "",
                  "| nodes int16 (the first of the ranking) | mean cosine | least cosine | weighted nodes int8 |",
                  "|---|---|---|---|"]
        for step in case["steps"]:
            lines.append(f"| {len(step['nodes'])} | {step['cosine_mean']:.4f} | {step['cosine_min']:.4f} | "
                         f"{step['weighted_int8']}/{step['weighted']} ({step['share']:.0%}) |")
        ms = {k: v["1"] for k, v in case["latency_ms"].items()}
        lines += ["", f"Goal met: {case['met']}. Latency at batch 1 in ONNX Runtime CPU (ms): float {ms['float']:.1f}, "
                      f"int8 {ms['int8']:.1f}, the last step {ms['mixed']:.1f}.", ""]
        if case.get("compare"):
            lines += ["By op type instead of by ranking:", "",
                      "| precisions | mean cosine | least cosine | weighted nodes int8 | batch 1 (ms) |",
                      "|---|---|---|---|---|"]
            for label, row in case["compare"].items():
                lines.append(f"| {label} | {row['cosine_mean']:.4f} | {row['cosine_min']:.4f} | "
                             f"{row['weighted_int8']}/{row['weighted']} ({row['share']:.0%}) | {ms[label]:.1f} |")
            lines.append("")
        last = case["steps"][-1]["nodes"]
        if case["config"] and len(last) <= 16:
            lines += ["The quant_config JSON of the last step:", "", "```json",
                      json.dumps(json.loads(case["config"]), indent=None).replace("}, ", "},\n  "), "```", ""]
    lines += ["## Error compensation (ec) on one layer", "",
              "The layer's own output against the float layer's on held-out inputs, every other node float32 "
              "(op_config; the Resize also needs its producer int8), weights rounded to nearest, no bias "
              "correction, so that only ec differs.", "",
              "| model | node | input | int8: relative MSE | ec: relative MSE | error removed |",
              "|---|---|---|---|---|---|"]
    for row in results["compensation"]:
        lines.append(f"| {row['case']} | `{row['node']}` | {row['input']} | "
                     f"{row['int8']['relative_mse']:.3g} | {row['ec']['relative_mse']:.3g} | "
                     f"{100 * row['removed']:.0f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    work = zoo.cache_dir("bench", "mixed")
    results = {"date": time.strftime("%Y-%m-%d"), "machine": run.describe_machine(), "versions": run.versions(),
               "command": "python bench/mixed.py"}
    print("== whole model", flush=True)
    results["whole_model"] = whole_model(work / "efficientnet")
    print("== from the analysis", flush=True)
    results["from_analysis"] = [
        from_analysis(rec_case := run.ppocr_rec_case(128), work / "ppocr-rec", "cosine_mean", 0.995,
                      compare=whole_op_types(rec_case)),
        from_analysis(magika_case(), work / "magika", "cosine_min", 0.9),
        from_analysis(magika_case(), work / "magika-mse", "cosine_min", 0.9, {"activation_quant_method": "MSE"}),
    ]
    print("== error compensation", flush=True)
    efficientnet, rec, det = run.efficientnet_case(128, 4), run.ppocr_rec_case(64), ppocr_det_case(32)
    results["compensation"] = [
        compensation(efficientnet, work / "ec", "/_conv_stem/Conv", 1, "/_conv_stem/Conv_output_0"),
        compensation(efficientnet, work / "ec", "/_blocks.0/_depthwise_conv/Conv", 1,
                     "/_blocks.0/_depthwise_conv/Conv_output_0"),
        compensation(rec, work / "ec", "p2o.MatMul.0", 1, "p2o.MatMul.1"),
        compensation(rec, work / "ec", "p2o.MatMul.4", 0, "p2o.MatMul.5"),
        compensation(det, work / "ec", "p2o.Resize.0", 0, "nearest_interp_v2_0.tmp_0",
                     also=("p2o.Add.228", "p2o.Add.248")),
    ]
    (HERE / "mixed.json").write_text(json.dumps(results, indent=1))
    (HERE / "MIXED.md").write_text(markdown(results))
    print(f"wrote {HERE / 'MIXED.md'}")


if __name__ == "__main__":
    main()
