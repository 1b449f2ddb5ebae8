"""Weight-only quantization rows of the bench: file size and fidelity per bit width, mixed bit, MatMulNBits.

EfficientNet-Lite0: the image case of bench/run.py (calibration = crops of opencv-doc video
frames and images, used only by bias correction and the mixed-bit search; evaluation = crops of
natural photos). MiniLM: calibration = every
7th stdlib sentence, evaluation = the others. The reference is onnxruntime's own weight-only
tool, MatMulNBitsQuantizer (4-bit blocks of 32, symmetric), on MiniLM's MatMuls. Everything runs
in this process: times are wall times, no peak memory.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench import zoo

LOWBIT_MODES = {  # label: settings (WEIGHT_QUANT), "data" = with calibration data
    **{f"{b} bits": {"bit_num": b} for b in (1, 2, 3, 4, 6, 8, 16)},
    "8 bits + bias correction (data)": {"bit_num": 8, "data": True},
    "mixed, init_scale=0.02": {"bit_num": 0},
    "mixed, init_scale=0.02 (data)": {"bit_num": 0, "data": True},
    "mixed, auto_tune (data)": {"bit_num": 0, "auto_tune": True, "data": True},
}
QUICK_MODES = ("8 bits", "8 bits + bias correction (data)", "4 bits", "mixed, init_scale=0.02 (data)",
               "4 bits, MatMulNBits block 32")  # --quick


def _quantize(model: Path, output: Path, calib, settings: dict) -> tuple[float, object]:
    import lowbit

    settings = dict(settings)
    data = calib if settings.pop("data", False) else None
    start = time.perf_counter()
    result = lowbit.quantize(model, output, data=data, quant_type="WEIGHT_QUANT", progress=False, **settings)
    return time.perf_counter() - start, result


def _row(label: str, seconds: float | None, size_ratio: float, cosines: np.ndarray, result=None,
         agreement: float | None = None) -> dict:
    mixed = getattr(result, "mixed_bits", None)
    weights = getattr(result, "weights", None) or []
    elements = sum(w.elements for w in weights)
    return {"tool": label, "error": None, "seconds": seconds, "size_ratio": size_ratio,
            "average_bits": sum(w.bits * w.elements for w in weights) / elements if elements else None,
            "init_scale": mixed.init_scale if mixed is not None else None,
            "cosine_mean": float(cosines.mean()), "cosine_min": float(cosines.min()), "agreement": agreement}


def _file_name(prefix: str, label: str) -> str:
    return f"{prefix}-{label.split(' (')[0].replace(' ', '_').replace(',', '').replace('=', '')}.onnx"


def _add_latency(rows: list[dict], paths: dict[str, Path], batch1: dict, batch8: dict, runs: int) -> None:
    """ORT CPU latency of each model at batch 1 and 8, the models taking turns (bench.run.compare_latency):
    in ONNX Runtime's default session, and lowbit's models also as documented (lowbit.inference_session)."""
    from bench.run import compare_latency

    documented = {f"{name} (documented)": path for name, path in paths.items() if name.startswith("lowbit")}
    every = {**paths, **documented}
    b1 = compare_latency(every, batch1, runs, as_documented=frozenset(documented))
    b8 = compare_latency(every, batch8, max(3, runs // 4), as_documented=frozenset(documented))
    for row in rows:
        row["latency_b1_ms"], row["latency_b8_ms"] = b1.get(row["tool"]), b8.get(row["tool"])
        name = f"{row['tool']} (documented)"
        row["latency_documented_b1_ms"], row["latency_documented_b8_ms"] = b1.get(name), b8.get(name)


def efficientnet(case, work: Path, quick: bool) -> dict:
    from bench.run import model_bytes, quiet_session

    calib = [{"input": x[None]} for x in case.calib]

    def logits(path: Path) -> np.ndarray:
        session = quiet_session(path)
        return np.concatenate([session.run(None, {"input": x[None]})[0] for x in case.evaluation])

    reference = logits(case.model)
    rows = [_row("float32", None, 1.0, np.ones(1), agreement=1.0)]
    paths = {"float32": case.model}
    for label, settings in LOWBIT_MODES.items():
        if quick and label not in QUICK_MODES:
            continue
        output = work / _file_name("weights", label)
        paths[f"lowbit {label}"] = output
        seconds, result = _quantize(case.model, output, calib, settings)
        got = logits(output)
        cosines = np.array([zoo.cosine(a, b) for a, b in zip(got, reference)])
        rows.append(_row(f"lowbit {label}", seconds, model_bytes(output) / model_bytes(case.model), cosines, result,
                         float(np.mean(got.argmax(1) == reference.argmax(1)))))
        print(f"   {rows[-1]['tool']}: size {rows[-1]['size_ratio']:.3f}, cosine {rows[-1]['cosine_mean']:.4f}",
              flush=True)
    sample = case.evaluation[:1]
    _add_latency(rows, paths, {"input": sample}, {"input": np.repeat(sample, 8, axis=0)}, 10)
    return {"name": "EfficientNet-Lite0, weight-only", "calibration": len(calib),
            "evaluation": len(case.evaluation), "rows": rows}


def minilm(work: Path, quick: bool) -> dict:
    from bench import minilm as text
    from bench.run import model_bytes, quiet_session

    model = zoo.minilm_encoder("torchscript")
    tokenize = text.WordPiece()
    sentences = zoo.stdlib_sentences()
    calib = [tokenize([s], 128) for s in sentences[::7][:64]]
    evaluation = [s for i, s in enumerate(sentences) if i % 7][: 128 if quick else 512]
    batches = [tokenize(evaluation[i:i + 32], 128) for i in range(0, len(evaluation), 32)]

    def embed(path: Path) -> np.ndarray:
        session = quiet_session(path)
        vectors = np.concatenate([text.mean_pool(session.run(None, b)[0], b["attention_mask"]) for b in batches])
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    reference = embed(model)
    rows = [_row("float32", None, 1.0, np.ones(1))]
    paths = {"float32": model}
    modes = {**LOWBIT_MODES, "4 bits, MatMulNBits block 32": {"bit_num": 4, "matmul_nbits": True, "block_size": 32}}
    for label, settings in modes.items():
        if quick and label not in QUICK_MODES:
            continue
        output = work / _file_name("minilm", label)
        paths[f"lowbit {label}"] = output
        seconds, result = _quantize(model, output, calib, settings)
        rows.append(_row(f"lowbit {label}", seconds, model_bytes(output) / model_bytes(model),
                         (embed(output) * reference).sum(1), result))
        print(f"   {rows[-1]['tool']}: size {rows[-1]['size_ratio']:.3f}, cosine {rows[-1]['cosine_mean']:.5f}",
              flush=True)
    output = work / "minilm-ort-nbits.onnx"
    seconds = _ort_matmul_nbits(model, output)
    rows.append(_row("onnxruntime MatMulNBitsQuantizer, 4 bits, block 32", seconds,
                     model_bytes(output) / model_bytes(model), (embed(output) * reference).sum(1)))
    paths[rows[-1]["tool"]] = output
    _add_latency(rows, paths, tokenize(evaluation[:1], 128), tokenize(evaluation[:8], 128), 10)
    return {"name": "MiniLM-L6 sentence encoder, weight-only", "calibration": len(calib),
            "evaluation": len(evaluation), "rows": rows}


def _ort_matmul_nbits(model: Path, output: Path) -> float:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    start = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(onnx.load(str(model)), block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(output), use_external_data_format=False)
    return time.perf_counter() - start


def section(image_case, work: Path, quick: bool) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    print("== weight-only: EfficientNet-Lite0", flush=True)
    cases = [efficientnet(image_case, work, quick)]
    print("== weight-only: MiniLM-L6", flush=True)
    cases.append(minilm(work, quick))
    return cases


COLUMNS = [("size ratio", "size_ratio", 3), ("avg bits", "average_bits", 2), ("init_scale", "init_scale", 4),
           ("cosine mean", "cosine_mean", 5), ("cosine min", "cosine_min", 4), ("top-1 agreement", "agreement", 3),
           ("quantize s", "seconds", 1), ("latency b1 ms", "latency_b1_ms", 2), ("latency b8 ms", "latency_b8_ms", 2),
           ("lowbit.inference_session b1 ms", "latency_documented_b1_ms", 2),
           ("lowbit.inference_session b8 ms", "latency_documented_b8_ms", 2)]


def markdown(cases: list[dict], table) -> list[str]:
    lines = ["## Weight-only quantization (quant_type=WEIGHT_QUANT)", "",
             ("Data-free unless marked (data): then the calibration samples drive bias correction and the "
              "mixed-bit search. Latency in ONNX Runtime's default session, and as documented "
              "(lowbit.inference_session: the weights are dequantized once, at load). Times are in-process wall "
              "times; latency as in the tables above (models taking turns, best of 5 per-round medians)."), ""]
    for case in cases:
        lines += [f"### {case['name']}", "",
                  f"{case['calibration']} calibration samples; {case['evaluation']} held-out inputs.", "",
                  *table(case["rows"], COLUMNS), ""]
    return lines


def main() -> None:
    """``python -m bench.weights [--quick]``: this section alone, into bench/WEIGHT_RESULTS.md and .json."""
    import argparse
    import json

    from bench import run

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    cases = section(run.efficientnet_case(64, 8) if args.quick else run.efficientnet_case(256, 32), zoo.cache_dir("bench", "weights"), args.quick)
    header = [f"# lowbit bench: weight-only section ({time.strftime('%Y-%m-%d')})", "",
              f"Machine: {run.describe_machine()}. Versions: "
              + ", ".join(f"{k} {v}" for k, v in run.versions().items()) + ".",
              f"Command: `python -m bench.weights{' --quick' if args.quick else ''}` (also part of `python bench/run.py`).",
              ""]
    text = "\n".join(header + markdown(cases, run._table))
    here = Path(__file__).resolve().parent
    (here / "WEIGHT_RESULTS.md").write_text(text)
    (here / "weight_results.json").write_text(json.dumps(cases, indent=2))
    print(text)


if __name__ == "__main__":
    main()
