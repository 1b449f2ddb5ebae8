"""Non-uniform weights (weight_levels): file, output error and latency against the uniform int8 model.

    python bench/levels.py              # writes bench/LEVELS.md and bench/levels.json
    python bench/levels.py --markdown   # the tables again from levels.json

EfficientNet-Lite0 and Lite1, FULL_QUANT (W8A8) with K = 256 (uniform), 64, 32 and 16 levels
per layer, on the data of bench/recovery.py (300 held-out crops): file bytes, 1 - cosine and
top-1 agreement against the float model, latency at batch 8 (the models take turns, same run),
session creation time. MiniLM, WEIGHT_QUANT bit_num=8 with data, uniform and K = 64 and 32:
sentence-embedding cosine on 256 held-out sentences and file bytes.
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
    latency = run.compare_latency(paths, {case.input_name: case.evaluation[:8]}, runs=8)
    for label, ms in latency.items():
        rows[label]["latency_b8_ms"] = ms
    return {"case": case.name, "inputs": len(case.evaluation), "rows": rows}


def minilm(work: Path) -> dict:
    import lowbit
    from bench import minilm as text
    from bench.accuracy import EmbeddingCosine

    work.mkdir(parents=True, exist_ok=True)
    model = zoo.minilm_encoder("torchscript")
    tokenize = text.WordPiece()
    sentences = zoo.stdlib_sentences()
    calib = [tokenize([s], 128) for s in sentences[::7][:64]]
    held = [s for i, s in enumerate(sentences) if i % 7][:256]
    cosine = EmbeddingCosine([tokenize(held[i:i + 32], 128) for i in range(0, len(held), 32)], 0.999)
    cosine.eval_model(str(model), None)
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
    return {"case": "MiniLM weight-only, 8 bits, GPTQ", "inputs": len(held), "rows": rows}


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
        else:
            lines += ["| weights | file | x uniform | embedding cosine | quantize |", "|---|---|---|---|---|"]
            for label, row in rows.items():
                lines.append(f"| {label} | {row['bytes'] / 1e6:.2f} MB | {row['bytes'] / uniform['bytes']:.3f} | "
                             f"{row['cosine']:.5f} | {row['seconds']:.0f} s |")
        lines.append("")
    return "\n".join(lines)


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
