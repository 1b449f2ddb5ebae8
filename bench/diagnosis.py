"""lowbit's diagnosis on real models: debug CSVs, the analysis report, calibration tables, and whether
the ranking is right, beside onnxruntime's qdq_loss_debug, in one run.

    python bench/diagnosis.py      # writes bench/DIAGNOSIS.md and bench/diagnosis.json

For EfficientNet-Lite0, the digit CNN and PP-OCRv4 rec (the calibration and held-out data of
bench/run.py), each case:

1. quantizes with the defaults, then again with ``debug_info_save_path``, ``report`` and
   ``calibration_table_out`` (json): the time each report adds, and the files it wrote
   (under ``.cache/bench/diagnosis/<case>/``);
2. writes the tpu-mlir and TensorRT tables from the json table (``calibration_table``: no
   calibration run) and checks that the model made from each table is the one calibrated;
3. times ``lowbit analyze`` (32 samples, HTML + JSON) on lowbit's model, and on
   onnxruntime's (quantize_static, MinMax) beside onnxruntime's ``qdq_loss_debug`` (every
   tensor's SQNR on the same pair and samples; it matches tensors by onnxruntime's Q/DQ
   names, so it reads onnxruntime's models only), each in a child process under GNU time;
4. checks the ranking on held-out data: the model quantized again with the 3 first-ranked
   nodes in ``skip_quant_node`` against 3 nodes drawn at random (3 draws), and the
   suggestion itself.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import run, zoo

HERE = Path(__file__).resolve().parent
DRAWS = 3


def held_out_error(path: Path, case: run.Case, reference: np.ndarray) -> dict[str, float]:
    got = run.outputs(path, case)
    errors = [1 - zoo.cosine(a, b) for a, b in zip(reference, got)]
    out = {"error": float(np.mean(errors))}
    if case.task == "classification":
        out["agreement"] = float(np.mean(reference.argmax(-1) == got.argmax(-1)))
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def diagnose(case: run.Case, work: Path) -> dict:
    import lowbit

    work.mkdir(parents=True, exist_ok=True)
    calib = run.write_calibration(case, work)
    reference = run.outputs(case.model, case)
    print(f"== {case.name}: {len(case.calib)} calibration samples, {len(case.evaluation)} held-out", flush=True)
    result: dict = {"name": case.name, "calibration": len(case.calib), "evaluation": len(case.evaluation)}

    plain = run.quantize_in_child("lowbit", case.model, calib, work / "q.onnx")
    result["quantize_s"] = plain.seconds

    start = time.perf_counter()
    reported = lowbit.quantize(case.model, work / "q_reports.onnx", data=calib, progress=False,
                               debug_info_save_path=str(work / "debug"), report=str(work / "report.html"),
                               calibration_table_out=str(work / "table.json"))
    result["quantize_with_reports_s"] = time.perf_counter() - start
    sections = {s.name: s.seconds for s in reported.passes}
    result["debug_reports_s"] = sections.get("debug_reports")
    result["analysis_report_s"] = sections.get("analysis_report")
    result["files"] = {p.name: p.stat().st_size for p in sorted(work.glob("report.*"))}
    rounds = sorted((work / "debug").glob("round_*.csv"))
    result["debug_files"] = {"round files": len(rounds), "bytes": sum(p.stat().st_size for p in
                                                                        (work / "debug").iterdir())}
    print(f"   quantize {plain.seconds:.1f} s; with debug CSVs + report + table {result['quantize_with_reports_s']:.1f} s",
          flush=True)

    # each table read back gives the model it was written with; TensorRT's cache holds symmetric scales,
    # so it is written and read for the NVGPU target (calibrated for it: its plan quantizes other tensors)
    tables = {"json": {"lines": len((work / "table.json").read_text().splitlines())}}
    lowbit.quantize(case.model, work / "q_tpu-mlir.onnx", data=calib, progress=False,
                    calibration_table=str(work / "table.json"), calibration_table_out=str(work / "table.tpu-mlir.txt"),
                    table_format="tpu-mlir")
    lowbit.quantize(case.model, work / "q_nvgpu.onnx", data=calib, progress=False, target_device="NVGPU",
                    calibration_table_out=str(work / "table.tensorrt.cache"), table_format="tensorrt")
    for table_format, name, written, target in (("tpu-mlir", "table.tpu-mlir.txt", "q_reports.onnx", "CPU"),
                                                ("tensorrt", "table.tensorrt.cache", "q_nvgpu.onnx", "NVGPU")):
        again = work / f"q_from_{table_format}.onnx"
        lowbit.quantize(case.model, again, data=calib, progress=False, calibration_table=str(work / name),
                        target_device=target)
        tables[table_format] = {"lines": len((work / name).read_text().splitlines()), "target": target,
                                "same model from the table": digest(again) == digest(work / written)}
    result["tables"] = tables

    analyze = run.quantize_in_child("lowbit-analyze", case.model, calib, work / "analyze.html", 32, work / "q.onnx")
    # onnxruntime's tool matches tensors by onnxruntime's own Q/DQ names: both tools read its model
    run.quantize_in_child("ort-minmax", case.model, calib, work / "ort.onnx")
    analyze_ort = run.quantize_in_child("lowbit-analyze", case.model, calib, work / "analyze_ort.html", 32,
                                        work / "ort.onnx")
    ort_debug = run.quantize_in_child("ort-qdq-loss-debug", case.model, calib, work / "ort_debug.json", 32,
                                      work / "ort.onnx")
    result["analyze"] = {name: {"seconds": row.seconds, "peak_rss_mb": row.peak_rss_mb, "error": row.error}
                         for name, row in (("lowbit analyze", analyze), ("lowbit analyze, onnxruntime's model",
                                                                          analyze_ort),
                                           ("ort qdq_loss_debug, onnxruntime's model", ort_debug))}
    print("   " + "; ".join(f"{k} {v['seconds']} s / {v['peak_rss_mb']} MB {v['error'] or ''}"
                            for k, v in result["analyze"].items()), flush=True)

    figures = json.loads((work / "analyze.json").read_text())
    ranked = [n["name"] for n in figures["nodes"]]
    result["nodes"] = len(ranked)
    result["first_ranked"] = figures["nodes"][:5]
    result["suggestion"] = figures["suggestion"]

    def leaving_float(nodes: list[str], tag: str) -> dict:
        path = work / f"skip_{tag}.onnx"
        lowbit.quantize(case.model, path, data=calib, progress=False, skip_quant_node=",".join(nodes))
        return {"nodes": nodes, **held_out_error(path, case, reference)}

    checks = {"all quantized": held_out_error(work / "q.onnx", case, reference),
              "first 3 of the ranking": leaving_float(ranked[:3], "top3"),
              "suggestion": leaving_float(figures["suggestion"]["nodes"], "suggestion")}
    rng = np.random.default_rng(0)
    for draw in range(DRAWS):
        checks[f"random 3, draw {draw + 1}"] = leaving_float(list(rng.choice(ranked[3:], 3, replace=False)),
                                                             f"random{draw}")
    result["held_out"] = checks
    print("   held-out error: " + ", ".join(f"{k} {v['error']:.3g}" for k, v in checks.items()), flush=True)
    return result


def markdown(results: dict) -> str:
    lines = ["# Diagnosis on real models", "",
             f"`{results['command']}` on {results['date']}: {results['machine']}.", "",
             "Per case: the time the reports add to `lowbit quantize` (defaults), `lowbit analyze` (32 samples, "
             "HTML + JSON), and on onnxruntime's model beside onnxruntime's `qdq_loss_debug` (which does the "
             "per-tensor part only) on the same pair and samples, and on held-out data "
             "the output error (1 - cosine) of the model quantized again with 3 nodes left float: the first 3 of "
             "the ranking, the report's suggestion, and 3 drawn at random.", ""]
    for case in results["cases"]:
        a, b = case["analyze"]["lowbit analyze"], case["analyze"]["lowbit analyze, onnxruntime's model"]
        o = case["analyze"]["ort qdq_loss_debug, onnxruntime's model"]
        lines += [f"## {case['name']}", "",
                  f"- calibration {case['calibration']} samples, held-out {case['evaluation']}; "
                  f"{case['nodes']} quantized nodes ranked",
                  f"- quantize {case['quantize_s']:.1f} s; with `debug_info_save_path` + `report` + "
                  f"`calibration_table_out` {case['quantize_with_reports_s']:.1f} s (debug CSVs "
                  f"{case['debug_reports_s']:.1f} s: {case['debug_files']['round files']} round files, "
                  f"{case['debug_files']['bytes'] / 1e6:.1f} MB; report {case['analysis_report_s']:.1f} s)",
                  f"- `lowbit analyze` on lowbit's model: {_s(a)}",
                  f"- on onnxruntime's model (`quantize_static` MinMax): `lowbit analyze` {_s(b)}; onnxruntime "
                  f"`qdq_loss_debug` {_s(o)}"
                  + (f"; lowbit / onnxruntime: time {b['seconds'] / o['seconds']:.2f}x, memory "
                     f"{b['peak_rss_mb'] / o['peak_rss_mb']:.2f}x" if b["seconds"] and o["seconds"] else ""),
                  "- tables: " + "; ".join(f"{k} {v['lines']} lines" + (
                      f" ({v['target']}), read back: the same model: {v['same model from the table']}"
                      if "target" in v else "") for k, v in case["tables"].items()),
                  "", "| held-out check | nodes left float | 1 - cosine | agreement |", "|---|---|---|---|"]
        for name, check in case["held_out"].items():
            nodes = ", ".join(f"`{n}`" for n in check.get("nodes", [])) or "none"
            agreement = f"{check['agreement']:.3f}" if "agreement" in check else "-"
            lines.append(f"| {name} | {nodes} | {check['error']:.4g} | {agreement} |")
        lines.append("")
    return "\n".join(lines)


def _s(row: dict) -> str:
    if row["error"]:
        return f"failed ({row['error']})"
    return f"{row['seconds']:.1f} s, peak RSS {row['peak_rss_mb']:.0f} MB"


def main() -> None:
    work = zoo.cache_dir("bench", "diagnosis")
    cases = [run.efficientnet_case(256, 32), run.digits_case(256, 2000), run.ppocr_rec_case(128)]
    results = {"date": time.strftime("%Y-%m-%d"), "machine": run.describe_machine(), "versions": run.versions(),
               "command": "python bench/diagnosis.py", "cases": []}
    for case in cases:
        results["cases"].append(diagnose(case, work / case.name.split()[0].lower()))
    (HERE / "diagnosis.json").write_text(json.dumps(results, indent=1))
    (HERE / "DIAGNOSIS.md").write_text(markdown(results))
    print(f"wrote {HERE / 'DIAGNOSIS.md'}")


if __name__ == "__main__":
    main()
