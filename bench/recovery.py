"""Weights on the same grid, on more than one model: issue 18's figures for each validation model.

    python bench/recovery.py            # writes bench/RECOVERY.md and bench/recovery.json (about 10 minutes here)
    python bench/recovery.py --markdown # the tables again from recovery.json
    python bench/recovery.py --rows "W4A8, GPTQ + block reconstruction" [--models EfficientNet-Lite0]
                                        # only these rows (and models), merged into recovery.json

Models: EfficientNet-Lite0 and EfficientNet-Lite1 (300 held-out crops of natural photos each,
calibrated on 256 crops of other images), the digit CNN (1000 held-out opencv digits,
256 for calibration) and PP-OCR's text-direction classifier (a MobileNetV3 with HardSwish and
squeeze-and-excitation; 400 held-out lines of English on natural photos, half of them upside
down, 256 lines on other images for calibration). For each, in one run on the same data:
onnxruntime.quantization's MinMax (QDQ, per channel, U8S8, its recommended preprocessing), lowbit's default W8A8,
per-tensor weights (target_device=DSP) without and with cross-layer equalization, W4A8
(weight_bit_num=4, GPTQ), and 4-bit weight-only with GPTQ on the calibration data, each of the last two
also with block reconstruction (about 10 minutes a model each). Figures:
top-1 agreement with the float model, 1 - cosine of the outputs (mean over inputs), the
digits' accuracy against their labels, and the time to quantize.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import run, zoo
from bench.job import run_onnxruntime

HERE = Path(__file__).resolve().parent
SETTINGS = {
    "lowbit default (W8A8)": {},
    "per tensor (DSP)": {"target_device": "DSP"},
    "per tensor (DSP) + cross-layer equalization": {"target_device": "DSP", "cross_layer_equalization": True},
    "W4A8, GPTQ": {"weight_bit_num": 4},
    "W4A8, GPTQ + block reconstruction": {"weight_bit_num": 4, "block_reconstruction": True},
    "4-bit weight-only, GPTQ": {"quant_type": "WEIGHT_QUANT", "bit_num": 4, "weight_rounding": "GPTQ"},
    "4-bit weight-only, GPTQ + block reconstruction": {"quant_type": "WEIGHT_QUANT", "bit_num": 4,
                                                       "weight_rounding": "GPTQ", "block_reconstruction": True},
}


def cases() -> dict[str, run.Case]:
    found = {}
    for variant in (0, 1):
        case = run.efficientnet_case(256, 20, variant)
        case.evaluation = case.evaluation[np.random.default_rng(1).permutation(len(case.evaluation))[:300]]
        found[case.name] = case
    digits = run.digits_case(256, 1000)
    found[digits.name] = digits
    direction = run.ppocr_cls_case(256, 400)
    found[direction.name] = direction
    return found


def measure(case: run.Case, path: Path, reference: np.ndarray) -> dict:
    got = run.outputs(path, case)
    row = {"agreement": float(np.mean(reference.argmax(-1) == got.argmax(-1))),
           "error": float(1 - np.mean([zoo.cosine(a, b) for a, b in zip(reference, got)]))}
    if case.labels is not None:
        row["accuracy"] = float(np.mean(got.argmax(-1) == case.labels))
    return row


def bench_model(case: run.Case, work: Path, labels: list[str]) -> dict:
    import lowbit

    work.mkdir(parents=True, exist_ok=True)
    calib = run.write_calibration(case, work)
    reference = run.outputs(case.model, case)
    rows = {}
    if "onnxruntime MinMax" in labels:
        start = time.perf_counter()
        run_onnxruntime("minmax", case.model, calib, work / "ort-minmax.onnx", None)
        rows["onnxruntime MinMax"] = {**measure(case, work / "ort-minmax.onnx", reference),
                                      "seconds": time.perf_counter() - start}
    for label in labels[1:] if labels[0] == "onnxruntime MinMax" else labels:
        settings = SETTINGS[label]
        out = work / (label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "") + ".onnx")
        start = time.perf_counter()
        lowbit.quantize(case.model, out, data=calib, progress=False, **settings)
        rows[label] = {**measure(case, out, reference), "seconds": time.perf_counter() - start}
        print(f"  {label}: {rows[label]}", flush=True)
    float_row = {"agreement": 1.0, "error": 0.0}
    if case.labels is not None:
        float_row["accuracy"] = float(np.mean(reference.argmax(-1) == case.labels))
    return {"case": case.name, "inputs": len(case.evaluation), "data": case.data, "float": float_row, "rows": rows}


def markdown(models: list[dict]) -> str:
    lines = ["# Weights on the same grid: every figure on every validation model", "",
             f"Machine: {run.describe_machine()}. `python bench/recovery.py`; all figures on held-out inputs (never "
             "used for calibration), against the float model.", ""]
    for model in models:
        rows, ort = model["rows"], model["rows"]["onnxruntime MinMax"]
        has_accuracy = "accuracy" in model["float"]
        lines += [f"## {model['case']} ({model['inputs']} held-out inputs)", ""]
        if model.get("data"):
            lines += [model["data"], ""]
        head = "| settings | top-1 agreement | 1 - cosine | error / onnxruntime's |"
        lines += [head + (" accuracy |" if has_accuracy else "") + " seconds |",
                  "|---|---|---|---|" + ("---|" if has_accuracy else "") + "---|"]
        if has_accuracy:
            lines.append(f"| float | 1 | 0 | | {model['float']['accuracy']:.4f} | |")
        for label, row in rows.items():
            ratio = row["error"] / ort["error"] if ort["error"] > 0 else float("nan")
            cells = [label, f"{row['agreement']:.4f}", f"{row['error']:.5f}", f"{ratio:.2f}"]
            if has_accuracy:
                cells.append(f"{row['accuracy']:.4f}")
            cells.append(f"{row['seconds']:.0f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:] == ["--markdown"]:
        (HERE / "RECOVERY.md").write_text(markdown(json.loads((HERE / "recovery.json").read_text())))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=["onnxruntime MinMax", *SETTINGS],
                        help="run only these rows, merged into recovery.json")
    parser.add_argument("--models", nargs="+", help="run only these models (case names)")
    args = parser.parse_args()
    labels = args.rows or ["onnxruntime MinMax", *SETTINGS]
    earlier = {m["case"]: m for m in json.loads((HERE / "recovery.json").read_text())} if args.rows else {}
    work = zoo.cache_dir("bench", "recovery")
    models = []
    for name, case in cases().items():
        if args.models and name not in args.models:
            models += [earlier[name]] if name in earlier else []
            continue
        print(f"== {name}", flush=True)
        model = bench_model(case, work / name.split(" ")[0].lower(), labels)
        if name in earlier:  # the other rows as the earlier run measured them, in SETTINGS' order
            merged = {**earlier[name]["rows"], **model["rows"]}
            model["rows"] = {label: merged[label] for label in ["onnxruntime MinMax", *SETTINGS] if label in merged}
        models.append(model)
    (HERE / "recovery.json").write_text(json.dumps(models, indent=1) + "\n")
    (HERE / "RECOVERY.md").write_text(markdown(models))


if __name__ == "__main__":
    main()
