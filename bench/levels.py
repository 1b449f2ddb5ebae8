"""Non-uniform weights (weight_levels): file, output error and latency against the uniform int8 model.

    python bench/levels.py              # writes bench/LEVELS.md and bench/levels.json
    python bench/levels.py --markdown   # the tables again from levels.json

EfficientNet-Lite0 and Lite1, FULL_QUANT (W8A8) with K = 256 (uniform), 64, 32 and 16 levels
per layer, on the data of bench/recovery.py (300 held-out crops): file bytes, 1 - cosine and
top-1 agreement against the float model, latency at batch 8 (the models take turns, same run),
session creation time. MiniLM, WEIGHT_QUANT bit_num=8 with data, uniform and K = 64 and 32:
sentence-embedding cosine on 256 held-out sentences and file bytes. The automatic mode
(weight_levels=AUTO) on both, with an evaluator on the same held-out inputs: EfficientNet-Lite0
top-1 agreement >= 0.95 (the uniform model's is 0.97), MiniLM embedding cosine >= 0.998.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import recovery, run, zoo

HERE = Path(__file__).resolve().parent
COUNTS = (None, 64, 32, 16)


def session_seconds(path: Path) -> float:
    start = time.perf_counter()
    run.quiet_session(path)
    return time.perf_counter() - start


def image_model(case: run.Case, work: Path) -> dict:
    import lowbit

    work.mkdir(parents=True, exist_ok=True)
    calib = run.write_calibration(case, work)
    reference = run.outputs(case.model, case)
    rows, paths = {}, {}
    for count in COUNTS:
        label = "uniform (256)" if count is None else f"{count} levels"
        out = paths[label] = work / f"levels-{count or 256}.onnx"
        start = time.perf_counter()
        lowbit.quantize(case.model, out, data=calib, progress=False, weight_levels=count)
        rows[label] = {**recovery.measure(case, out, reference), "seconds": time.perf_counter() - start,
                       "bytes": run.model_bytes(out), "session_seconds": session_seconds(out)}
        print(f"  {label}: {rows[label]}", flush=True)
    if case.name == "EfficientNet-Lite0":
        from bench.accuracy import Agreement

        out = paths["AUTO, agreement >= 0.95"] = work / "levels-auto.onnx"
        start = time.perf_counter()
        result = lowbit.quantize(case.model, out, data=calib, progress=False, weight_levels="AUTO",
                                 evaluator=Agreement(case.evaluation, case.input_name, 0.95), max_evaluations=10)
        rows["AUTO, agreement >= 0.95"] = {**recovery.measure(case, out, reference),
                                           "seconds": time.perf_counter() - start, "bytes": run.model_bytes(out),
                                           "session_seconds": session_seconds(out),
                                           "auto": auto_summary(result)}
        print(f"  AUTO: {rows['AUTO, agreement >= 0.95']}", flush=True)
    latency = run.compare_latency(paths, {case.input_name: case.evaluation[:8]}, runs=8)
    for label, ms in latency.items():
        rows[label]["latency_b8_ms"] = ms
    return {"case": case.name, "inputs": len(case.evaluation), "rows": rows}


def auto_summary(result) -> dict:
    search = result.report("search_levels")
    counts = {}
    for count in search.counts.values():
        counts[str(count)] = counts.get(str(count), 0) + 1
    return {"evaluations": sum(not t.repeated for t in search.search.tries), "tries": len(search.search.tries),
            "layers": counts, "stopped": search.search.stopped}


def minilm_case():
    """MiniLM, its calibration sentences, and an evaluator of embedding cosine on the held-out ones (its float
    metric taken)."""
    from bench import minilm as text
    from bench.accuracy import EmbeddingCosine

    model = zoo.minilm_encoder("torchscript")
    calib, batches = text.sentence_data()
    cosine = EmbeddingCosine(batches, 0.999)
    cosine.eval_model(str(model), None)
    return model, calib, cosine


def minilm(work: Path) -> dict:
    import lowbit
    from bench.accuracy import EmbeddingCosine

    work.mkdir(parents=True, exist_ok=True)
    model, calib, cosine = minilm_case()
    rows = {}
    for count in (None, 64, 32):
        label = "uniform (256)" if count is None else f"{count} levels"
        out = work / f"minilm-levels-{count or 256}.onnx"
        start = time.perf_counter()
        lowbit.quantize(model, out, data=calib, progress=False, quant_type="WEIGHT_QUANT", bit_num=8,
                        weight_rounding="GPTQ", weight_levels=count)
        rows[label] = {"cosine": cosine.eval_model(str(out), None), "bytes": run.model_bytes(out),
                       "seconds": time.perf_counter() - start}
        print(f"  {label}: {rows[label]}", flush=True)
    out = work / "minilm-levels-auto.onnx"
    start = time.perf_counter()
    goal = EmbeddingCosine(cosine.batches, 0.998)
    result = lowbit.quantize(model, out, data=calib, progress=False, quant_type="WEIGHT_QUANT", bit_num=8,
                             weight_rounding="GPTQ", weight_levels="AUTO", evaluator=goal, max_evaluations=10)
    rows["AUTO, cosine >= 0.998"] = {"cosine": cosine.eval_model(str(out), None), "bytes": run.model_bytes(out),
                                     "seconds": time.perf_counter() - start, "auto": auto_summary(result)}
    print(f"  AUTO: {rows['AUTO, cosine >= 0.998']}", flush=True)
    return {"case": "MiniLM weight-only, 8 bits, GPTQ", "inputs": sum(len(b["input_ids"]) for b in cosine.batches),
            "rows": rows}


def markdown(models: list[dict]) -> str:
    lines = ["# Non-uniform weights: K levels per layer", "",
             f"Machine: {run.describe_machine()}. `python bench/levels.py`; held-out inputs only.", ""]
    for model in models:
        rows = model["rows"]
        uniform = rows["uniform (256)"]
        lines += [f"## {model['case']} ({model['inputs']} held-out inputs)", ""]
        if "agreement" in uniform:
            lines += ["| weights | file | x uniform | 1 - cosine | x uniform | top-1 agreement | latency b8 | "
                      "session creation | quantize |", "|---|---|---|---|---|---|---|---|---|"]
            for label, row in rows.items():
                lines.append(f"| {label} | {row['bytes'] / 1e6:.2f} MB | {row['bytes'] / uniform['bytes']:.3f} | "
                             f"{row['error']:.5f} | {row['error'] / uniform['error']:.1f} | {row['agreement']:.3f} | "
                             f"{row['latency_b8_ms']:.2f} ms | {row['session_seconds']:.2f} s | "
                             f"{row['seconds']:.0f} s |")
            lines += _auto_lines(rows)
        else:
            lines += ["| weights | file | x uniform | embedding cosine | quantize |", "|---|---|---|---|---|"]
            for label, row in rows.items():
                lines.append(f"| {label} | {row['bytes'] / 1e6:.2f} MB | {row['bytes'] / uniform['bytes']:.3f} | "
                             f"{row['cosine']:.5f} | {row['seconds']:.0f} s |")
            lines += _auto_lines(rows)
        lines.append("")
    return "\n".join(lines)


def _auto_lines(rows: dict) -> list[str]:
    return [f"\n{label}: {row['auto']['evaluations']} evaluations ({row['auto']['tries']} tries, "
            f"{row['auto']['stopped']}); layers per K: "
            + ", ".join(f"{n} at {k}" for k, n in sorted(row["auto"]["layers"].items(), key=lambda i: int(i[0])))
            for label, row in rows.items() if "auto" in row]


def main() -> None:
    if sys.argv[1:] == ["--markdown"]:
        (HERE / "LEVELS.md").write_text(markdown(json.loads((HERE / "levels.json").read_text())))
        return
    work = zoo.cache_dir("bench", "levels")
    models = []
    for name, case in recovery.cases().items():
        if not name.startswith("EfficientNet"):
            continue
        print(f"== {name}", flush=True)
        models.append(image_model(case, work / name.split(" ")[0].lower()))
    print("== MiniLM", flush=True)
    models.append(minilm(work / "minilm"))
    (HERE / "levels.json").write_text(json.dumps(models, indent=1) + "\n")
    (HERE / "LEVELS.md").write_text(markdown(models))


if __name__ == "__main__":
    main()
