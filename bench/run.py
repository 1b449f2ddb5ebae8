"""lowbit beside onnxruntime.quantization, on real models and real data, in one run.

    python bench/run.py            # full run: writes bench/RESULTS.md and bench/results.json
    python bench/run.py --quick    # EfficientNet-Lite0 and the digit CNN, fewer samples

Every quantization runs in a child process, and its peak RSS is read from outside
(GNU time's maximum resident set size; Debian package ``time``). Calibration and evaluation data never overlap: the models calibrate on
Debian opencv-doc photos and evaluate on scikit-image photos, or calibrate and evaluate on
disjoint sets of the 5000 labelled digits.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import job, shapes, weights, zoo  # noqa: E402

HERE = Path(__file__).resolve().parent
MEMORY_LIMIT = 18 * 2**30  # a child that needs more fails alone instead of starving the machine


@dataclass
class Case:
    name: str
    model: Path
    input_name: str
    calib: list[np.ndarray]
    evaluation: np.ndarray  # N x ... (batch of held-out inputs)
    labels: np.ndarray | None = None
    task: str = "classification"  # or "dense": cosine of the whole output only
    data: str = ""  # where the calibration and evaluation inputs come from


@dataclass
class Row:
    tool: str
    seconds: float | None = None
    peak_rss_mb: float | None = None
    size_mb: float | None = None
    size_ratio: float | None = None
    agreement: float | None = None
    accuracy: float | None = None
    cosine_mean: float | None = None
    cosine_min: float | None = None
    latency_b1_ms: float | None = None
    latency_b8_ms: float | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


# -- data -------------------------------------------------------------------------------

def efficientnet_case(n_calib: int, crops_per_photo: int, variant: int = 0) -> Case:
    """EfficientNet-Lite0 (or Lite1 ... Lite4): calibrate on opencv-doc's video frames and other images; evaluate on natural
    photos."""
    size = zoo.EFFICIENTNET_LITE_SIZES[variant]
    images = zoo.calibration_images()
    per_image = max(1, -(-n_calib // len(images)))
    calib = [zoo.efficientnet_input(c, size)[0] for i, p in enumerate(images.values())
             for c in zoo.crops(p, per_image, seed=i)]
    calib = [calib[i] for i in np.random.default_rng(0).permutation(len(calib))[:n_calib]]
    held = zoo.natural_photos()
    evaluation = np.concatenate([zoo.efficientnet_input(c, size) for i, p in enumerate(held.values())
                                 for c in zoo.crops(p, crops_per_photo, seed=100 + i)])
    return Case(f"EfficientNet-Lite{variant}", zoo.efficientnet_lite(variant), "input", calib, evaluation,
                data=f"Calibration: random crops of {len(images)} opencv-doc video frames and images (chessboards, "
                     "renders, street scenes, a cartoon). Evaluation: random crops (40-100% of the short side) of "
                     f"{len(held)} natural photos of scikit-image, scikit-learn and opencv-doc, none used for "
                     "calibration.")


def digits_case(n_calib: int, n_eval: int) -> Case:
    cells, labels = zoo.opencv_digits()
    order = np.random.default_rng(0).permutation(len(cells))
    calib = [zoo.digit_input(cells[i])[0] for i in order[:n_calib]]
    held = order[n_calib:n_calib + n_eval]
    evaluation = np.concatenate([zoo.digit_input(cells[i]) for i in held])
    return Case("digit CNN (MNIST)", zoo.digit_cnn("torchscript"), "input", calib, evaluation, labels[held])


def magika_case(n_calib: int, n_eval: int) -> Case:
    """magika on the bytes of real files of many types (fortune cookies, sources, data, images, binaries)."""
    files = zoo.magika_files()
    order = np.random.default_rng(0).permutation(len(files))
    calib = [zoo.magika_input(files[i])[0] for i in order[:n_calib]]
    evaluation = np.concatenate([zoo.magika_input(files[i]) for i in order[n_calib:n_calib + n_eval]])
    return Case("magika", zoo.magika_model(), "bytes", calib, evaluation,
                data=f"{len(files)} real files (fortune cookies of Debian's fortunes; Python sources, JSON, HTML, "
                     "XML, Markdown, YAML, images, shared libraries, gzip ... of the Python standard library and "
                     "Debian's opencv-doc), shuffled: the first for calibration, "
                     "the next for evaluation; agreement = the same content type as the float model.")


def ppocr_rec_case(n_calib: int) -> Case:
    from PIL import Image

    def strips(names, seed, count):
        out = []
        for k, name in enumerate(names):
            image = np.asarray(Image.open(zoo.opencv_doc_data() / name).convert("RGB"))
            for crop in zoo.crops(image, count, seed + k):
                strip = crop[: max(8, crop.shape[0] // 6)]
                x = np.asarray(Image.fromarray(strip).resize((320, 48), Image.BILINEAR), np.float32) / 255.0
                out.append(((x - 0.5) / 0.5).transpose(2, 0, 1).astype(np.float32))
        return out

    calib_images = ["imageTextN.png", "notes.png", "sudoku.png", "pic1.png", "pic3.png"]
    eval_images = ["text_defocus.jpg", "licenseplate_motion.jpg", "imageTextR.png"]
    calib = strips([n for n in calib_images if (zoo.opencv_doc_data() / n).exists()], 0, 64)[:n_calib]
    evaluation = np.stack(strips([n for n in eval_images if (zoo.opencv_doc_data() / n).exists()], 1, 20))
    return Case("PP-OCRv4 rec", zoo.ppocr_models()["rec"], "x", calib, evaluation, task="dense")


def ppocr_cls_case(n_calib: int, n_eval: int) -> Case:
    """PP-OCR's text-direction classifier on lines of English drawn on photos, half of them upside down (labels:
    which were turned): calibrate on opencv-doc's other images, evaluate on natural photos."""
    calib, held, turned = zoo.ppocr_cls_data(n_calib, n_eval)
    return Case("PP-OCR cls (text direction)", zoo.ppocr_models()["cls"], "x", calib, held, labels=turned,
                data="Lines of real English (stdlib docstrings, DejaVu fonts) drawn on strips of photos, every "
                     "other one turned by 180 degrees; calibration on opencv-doc's other images with one half of "
                     "the sentences and typefaces, evaluation on natural photos with the other half; accuracy = "
                     "the direction the line was really drawn in.")


# -- measuring --------------------------------------------------------------------------

def time_with_fewer_samples(case: Case, work: Path, size: int = 128) -> dict[str, float]:
    """Quantize time of lowbit's default and onnxruntime MinMax on the first ``size`` samples.

    With fewer samples the parts of the default that read a fixed number of samples (GPTQ's
    and bias correction's 64) weigh more against onnxruntime's single pass.
    """
    times = {}
    for tool in ("ort-minmax", "lowbit"):
        row = quantize_in_child(tool, case.model, work / "calib", work / f"{tool}-{size}.onnx", size)
        times[tool] = row.seconds
    return {"samples": size, "seconds": times}


def quantize_in_child(tool: str, model: Path, calib_dir: Path, output: Path, size: int | None = None,
                      quantized: Path | None = None) -> Row:
    """Run bench/job.py under GNU time, which reports the job's own peak RSS.

    The job is forked from ``time`` (a small process), not from this one: a child forked
    from a large parent starts with the parent's resident pages in its accounting, which
    would inflate every reading by the size of the bench process.
    """
    command = ["/usr/bin/time", "-f", "MAXRSS_KB=%M", sys.executable, "-m", "bench.job", tool, str(model),
               str(calib_dir), str(output)]
    if size:
        command += ["--size", str(size)]
    if quantized is not None:
        command += ["--quantized", str(quantized)]

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    done = subprocess.run(command, cwd=HERE.parent, capture_output=True, text=True, preexec_fn=limit_memory,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    row = Row(tool)
    err_lines = done.stderr.strip().splitlines()
    rss = [line for line in err_lines if line.startswith("MAXRSS_KB=")]
    if done.returncode != 0 or not rss:
        errors = [line.strip() for line in err_lines
                  if line.strip() and not line.startswith(("MAXRSS_KB=", "Command exited"))]
        row.error = (errors or [f"exit code {done.returncode}"])[-1][:200]
        return row
    row.seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
    row.peak_rss_mb = int(rss[-1].split("=")[1]) / 1024
    return row


def model_bytes(path: Path) -> int:
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return total + (data.stat().st_size if data.exists() else 0)


def quiet_session(path: Path, as_documented: bool = False) -> ort.InferenceSession:
    """A session whose threads do not spin after a run, so that it cannot steal the cores
    from another session being timed (outputs and latencies both use these).

    ``as_documented``: with the options lowbit.session_options gives (weight-only models
    dequantize their weights at load); otherwise ONNX Runtime's defaults."""
    import lowbit

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if as_documented:
        options = lowbit.session_options(path, options)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare_latency(paths: dict[str, Path], feed: dict[str, np.ndarray], runs: int, rounds: int = 5,
                    as_documented: frozenset[str] = frozenset()) -> dict[str, float]:
    """Latency in ms of each model on ``feed``: models take turns, ``rounds`` times ``runs`` runs each.

    A shared VM's speed drifts over minutes; taking turns exposes every model to the same
    drift, and the best of the per-round medians discards rounds that a neighbour slowed down.
    The models named in ``as_documented`` run with lowbit.session_options.
    """
    gc.collect()
    sessions = {name: quiet_session(path, name in as_documented) for name, path in paths.items()}
    for session in sessions.values():
        session.run(None, feed)
    best = {name: float("inf") for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - start)
            best[name] = min(best[name], float(np.median(times) * 1000))
    return best


def outputs(path: Path, case: Case) -> np.ndarray:
    session = quiet_session(path)
    return np.concatenate([session.run(None, {case.input_name: x[np.newaxis]})[0] for x in case.evaluation])


def fidelity(row: Row, reference: np.ndarray, got: np.ndarray, case: Case) -> None:
    cosines = [zoo.cosine(a, b) for a, b in zip(reference, got)]
    row.cosine_mean, row.cosine_min = float(np.mean(cosines)), float(np.min(cosines))
    if case.task == "classification":
        row.agreement = float(np.mean(reference.argmax(-1) == got.argmax(-1)))
        if case.labels is not None:
            row.accuracy = float(np.mean(got.argmax(-1) == case.labels))


def write_calibration(case: Case, work: Path) -> Path:
    """The case's calibration samples as a folder of .npy files (what both tools read)."""
    calib_dir = work / "calib"
    calib_dir.mkdir(parents=True, exist_ok=True)
    for old in calib_dir.glob("*.npy"):
        old.unlink()
    for i, x in enumerate(case.calib):
        np.save(calib_dir / f"{i:05d}.npy", x[np.newaxis])
    return calib_dir


def bench_case(case: Case, tools: list[str], work: Path, runs: int) -> list[Row]:
    calib_dir = write_calibration(case, work)
    print(f"== {case.name}: {len(case.calib)} calibration samples, {len(case.evaluation)} held-out inputs",
          flush=True)
    reference = outputs(case.model, case)
    float_row = Row("float32", size_mb=model_bytes(case.model) / 1e6, size_ratio=1.0)
    fidelity(float_row, reference, reference, case)
    if case.labels is not None:
        float_row.accuracy = float(np.mean(reference.argmax(-1) == case.labels))
    rows = [float_row]
    for tool in tools:
        output = work / f"{tool}.onnx"
        row = quantize_in_child(tool, case.model, calib_dir, output)
        if row.error is None:
            row.size_mb = model_bytes(output) / 1e6
            row.size_ratio = row.size_mb / float_row.size_mb
            fidelity(row, reference, outputs(output, case), case)
        rows.append(row)
        print(f"   {tool}: {row.seconds and round(row.seconds, 1)} s, {row.peak_rss_mb and round(row.peak_rss_mb)} MB"
              + (f", error: {row.error}" if row.error else ""), flush=True)
    paths = {r.tool: case.model if r.tool == "float32" else work / f"{r.tool}.onnx" for r in rows if r.error is None}
    sample = case.evaluation[:1]
    b1 = compare_latency(paths, {case.input_name: sample}, max(5, runs // 5))
    b8 = compare_latency(paths, {case.input_name: np.repeat(sample, 8, axis=0)}, max(3, runs // 10))
    for row in rows:
        if row.error is None:
            row.latency_b1_ms, row.latency_b8_ms = b1[row.tool], b8[row.tool]
    return rows


def memory_scaling(case: Case, work: Path, sizes=(32, 256)) -> dict[int, float]:
    """Peak RSS of lowbit quantize for two calibration sizes (it streams: they should match)."""
    calib_dir = work / "calib"
    peaks = {}
    for size in sizes:
        if size <= len(case.calib):
            row = quantize_in_child("lowbit", case.model, calib_dir, work / f"mem{size}.onnx", size)
            peaks[size] = row.peak_rss_mb
    return peaks


def text_case(work: Path, count: int, runs: int) -> dict:
    """MiniLM sentence embeddings, float against dynamic int8 (lowbit and quantize_dynamic), same sentences."""
    from bench import minilm

    model = zoo.minilm_encoder("torchscript")
    tokenize = minilm.WordPiece()
    sentences = zoo.stdlib_sentences()[:count]
    batches = [tokenize(sentences[i:i + 32], 128) for i in range(0, len(sentences), 32)]

    def embed(path: Path) -> np.ndarray:
        session = quiet_session(path)
        return np.concatenate([minilm.mean_pool(session.run(None, b)[0], b["attention_mask"]) for b in batches])

    print(f"== MiniLM-L6 dynamic: {len(sentences)} sentences", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    reference = embed(model)
    b8, b1 = tokenize(sentences[:8], 128), tokenize(sentences[:1], 128)
    rows = [Row("float32", size_mb=model_bytes(model) / 1e6, size_ratio=1.0, cosine_mean=1.0, cosine_min=1.0)]
    for tool in ("lowbit-dynamic", "lowbit-dynamic-token", "lowbit-dynamic-tensor", "ort-dynamic",
                 "ort-dynamic-per-channel"):
        output = work / f"{tool}.onnx"
        row = quantize_in_child(tool, model, work, output)
        if row.error is None:
            cosines = (reference * embed(output)).sum(1)
            row.cosine_mean, row.cosine_min = float(cosines.mean()), float(cosines.min())
            row.size_mb = model_bytes(output) / 1e6
            row.size_ratio = row.size_mb / rows[0].size_mb
        print(f"   {tool}: cosine {row.cosine_mean}, {row.error or ''}", flush=True)
        rows.append(row)
    paths = {r.tool: model if r.tool == "float32" else work / f"{r.tool}.onnx" for r in rows if r.error is None}
    latency_b1 = compare_latency(paths, b1, max(5, runs // 5))
    latency_b8 = compare_latency(paths, b8, 3)
    for row in rows:
        if row.error is None:
            row.latency_b1_ms, row.latency_b8_ms = latency_b1[row.tool], latency_b8[row.tool]
    return {"name": "MiniLM-L6 sentence encoder, dynamic quantization", "sentences": len(sentences),
            "rows": [asdict(r) for r in rows]}


def image_pipeline_cost(work: Path, count: int) -> dict:
    """Share of EfficientNet-Lite0's calibration time spent reading, decoding and preprocessing JPEGs.

    ``count`` JPEG crops of the opencv-doc photos are calibrated from an INI with MindSpore's
    image preprocessing; the same files are then only read and preprocessed, without the model.
    """
    import lowbit
    from lowbit.data.calibration import data_options
    from lowbit.config import load_config
    from lowbit.config.model import CalibrationSource
    from lowbit.data.feeds import InputSpec
    from lowbit.data.sources import folder_samples
    from PIL import Image

    folder = work / "jpegs"
    folder.mkdir(parents=True, exist_ok=True)
    photos = list(zoo.opencv_photos().values())
    per_photo = -(-count // len(photos))
    if len(list(folder.glob("*.jpg"))) < count:
        crops = [c for i, p in enumerate(photos) for c in zoo.crops(p, per_photo, seed=200 + i)][:count]
        for i, crop in enumerate(crops):
            Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"{i:05d}.jpg", quality=90)
    cfg = work / "jpegs.cfg"
    cfg.write_text(f"""[common_quant_param]
quant_type=FULL_QUANT
[data_preprocess_param]
calibrate_path=input:{folder}
calibrate_size={count}
input_type=IMAGE
image_to_format=RGB
resize_width=224
resize_height=224
normalize_mean=[127.5, 127.5, 127.5]
normalize_std=[127.5, 127.5, 127.5]
[full_quant_param]
bias_correction=false
""")
    result = lowbit.quantize(zoo.efficientnet_lite0("torchscript"), work / "jpegs_int8.onnx", config=cfg,
                             progress=False)
    spec = InputSpec("input", np.dtype(np.float32), (None, 3, 224, 224))
    samples = folder_samples((CalibrationSource(folder, "input"),), [spec], count, data_options(load_config(cfg)))
    start = time.perf_counter()
    for _ in samples:
        pass
    reading = time.perf_counter() - start
    return {"images": count, "read_seconds": reading, "calibration_seconds": result.timings["calibrate"],
            "share": reading / result.timings["calibrate"]}


# -- report -----------------------------------------------------------------------------

def _fmt(value, digits=3, suffix=""):
    if value is None:
        return "-"
    return f"{value:.{digits}f}{suffix}" if isinstance(value, float) else str(value)


_COMMON = [("quantize s", "seconds", 1), ("peak RSS MB", "peak_rss_mb", 0), ("size MB", "size_mb", 2),
           ("size ratio", "size_ratio", 3)]
_LATENCY = [("latency b1 ms", "latency_b1_ms", 2), ("latency b8 ms", "latency_b8_ms", 2)]
IMAGE_COLUMNS = [*_COMMON, ("top-1 agreement", "agreement", 3), ("accuracy", "accuracy", 3),
                 ("cosine mean", "cosine_mean", 4), ("cosine min", "cosine_min", 4), *_LATENCY]
TEXT_COLUMNS = [*_COMMON, ("cosine mean", "cosine_mean", 4), ("cosine min", "cosine_min", 4), *_LATENCY,
                ("speed-up b8 (x)", "speedup_b8", 2)]


def _table(rows: list[dict], columns: list[tuple[str, str, int]]) -> list[str]:
    """Markdown rows: one per tool, a failed tool's error in its second cell."""
    lines = ["| tool | " + " | ".join(header for header, _, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    base = rows[0].get("latency_b8_ms")
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['tool']} | failed: {r['error']} |" + " |" * (len(columns) - 1))
            continue
        values = dict(r, speedup_b8=base / r["latency_b8_ms"] if base and r.get("latency_b8_ms") else None)
        lines.append("| " + " | ".join([r["tool"], *(_fmt(values.get(key), digits) for _, key, digits in columns)])
                     + " |")
    return lines


def markdown(results: dict) -> str:
    lines = ["# lowbit bench", "", f"Run {results['date']} on {results['machine']}.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".", "",
             f"Command: `{results['command']}`. Each quantization runs in its own process; peak RSS is "
             "that process's, read by GNU time. Latency: ONNX Runtime CPU (threads not spinning); the models take "
             "turns for 5 rounds and each reports the best of its per-round medians.", ""]
    for case in results["cases"]:
        rerun = f" This case was run again on {case['rerun']}, alone, after a change of its model." \
            if case.get("rerun") else ""
        lines += [f"## {case['name']}", "",
                  f"{case['calibration']} calibration samples; {case['evaluation']} held-out inputs. "
                  + case.get("data", "") + rerun, "",
                  "Tools: `lowbit` = default settings (search among MAX_MIN, REMOVAL_OUTLIER, KL, MSE on held-back "
                  "samples, then GPTQ weight rounding, then bias correction); `lowbit-nearest` = the same with "
                  "weights rounded to nearest; `lowbit-no-bc` = the search and GPTQ without bias correction; "
                  "`lowbit-METHOD` = one activation_quant_method, weights rounded to nearest, no bias correction "
                  "(what onnxruntime does); `ort-*` = onnxruntime.quantization.quantize_static, QDQ, per-channel, "
                  "U8S8.", "",
                  *_table(case["rows"], IMAGE_COLUMNS)]
        lines.append("")
        for line in case["ratios"]:
            lines.append(f"* {line}")
        lines.append("")
    if results.get("text"):
        t = results["text"]
        lines += [f"## {t['name']}", "",
                  f"{t['sentences']} sentences (stdlib docstrings), padded to 128 tokens; cosine of the mean-pooled "
                  "embedding against float32. Latency: batch 8 x 128 tokens and batch 1 x 128.", "",
                  *_table(t["rows"], TEXT_COLUMNS), ""]
        lines += [f"* {line}" for line in text_ratios(t["rows"])] + [""]
    if results.get("weights"):
        lines += weights.markdown(results["weights"], _table)
    if results.get("images"):
        m = results["images"]
        lines += ["## Image calibration data", "",
                  f"EfficientNet-Lite0 calibrated on {m['images']} JPEG files through MindSpore's image "
                  f"preprocessing (RGB, resize 224x224 LINEAR, normalize): calibration {m['calibration_seconds']:.1f} s, "
                  f"of which reading, decoding and preprocessing {m['read_seconds']:.1f} s "
                  f"({100 * m['share']:.0f}%).", ""]
    if results.get("shapes"):
        lines += shapes.markdown(results["shapes"])
    if results.get("fewer_samples"):
        f = results["fewer_samples"]
        lowbit, minmax = f["seconds"]["lowbit"], f["seconds"]["ort-minmax"]
        lines += [f"## Quantize time with {f['samples']} calibration samples", "",
                  f"{f['model']}, the first {f['samples']} samples: lowbit default {lowbit:.1f} s, onnxruntime MinMax "
                  f"{minmax:.1f} s: {lowbit / minmax:.2f}x.", ""]
    if results.get("memory"):
        m = results["memory"]
        sizes = sorted(m["peak_rss_mb"], key=int)
        lines += ["## Memory against the number of calibration samples", "",
                  f"`lowbit quantize` on {m['model']}: " + ", ".join(
                      f"{s} samples: {m['peak_rss_mb'][s]:.0f} MB" for s in sizes)
                  + (f" (ratio {m['ratio']:.3f})." if m.get("ratio") else "."), ""]
    return "\n".join(lines)


def ratios(rows: list[Row]) -> list[str]:
    by_tool = {r.tool: r for r in rows if r.error is None}
    lines = []
    lowbit, ort_minmax, float_row = by_tool.get("lowbit"), by_tool.get("ort-minmax"), by_tool.get("float32")
    plain, max_min, kl = by_tool.get("lowbit-no-bc"), by_tool.get("lowbit-MAX_MIN"), by_tool.get("lowbit-KL")
    if max_min and ort_minmax and max_min.agreement is not None:
        lines.append(f"same method (MAX_MIN, no bias correction): top-1 agreement lowbit {max_min.agreement:.3f} vs "
                     f"onnxruntime MinMax {ort_minmax.agreement:.3f}; mean cosine {max_min.cosine_mean:.4f} vs "
                     f"{ort_minmax.cosine_mean:.4f}")
    if lowbit and ort_minmax and lowbit.cosine_mean is not None:
        lines.append(f"output error (1 - cosine), lowbit default / onnxruntime MinMax: {1 - lowbit.cosine_mean:.3g} / "
                     f"{1 - ort_minmax.cosine_mean:.3g} = {(1 - lowbit.cosine_mean) / (1 - ort_minmax.cosine_mean):.2f}")
    if lowbit and plain and lowbit.cosine_mean is not None:
        lines.append(f"bias correction: output error (1 - cosine) {1 - plain.cosine_mean:.3g} -> "
                     f"{1 - lowbit.cosine_mean:.3g}" + (f", top-1 agreement {plain.agreement:.3f} -> "
                                                        f"{lowbit.agreement:.3f}" if lowbit.agreement else ""))
    nearest = by_tool.get("lowbit-nearest")
    if lowbit and nearest and lowbit.cosine_mean is not None:
        lines.append(f"GPTQ weight rounding: output error (1 - cosine) {1 - nearest.cosine_mean:.3g} -> "
                     f"{1 - lowbit.cosine_mean:.3g}" + (f", top-1 agreement {nearest.agreement:.3f} -> "
                                                        f"{lowbit.agreement:.3f}" if lowbit.agreement else "")
                     + f"; quantize time {nearest.seconds:.1f} -> {lowbit.seconds:.1f} s")
    if kl and max_min:
        lines.append(f"KL / MAX_MIN (lowbit, same data): quantize time {kl.seconds / max_min.seconds:.2f}x, "
                     f"peak RSS {kl.peak_rss_mb / max_min.peak_rss_mb:.2f}x ({kl.peak_rss_mb:.0f} MB)")
    if kl and by_tool.get("ort-entropy"):
        other = by_tool["ort-entropy"]
        lines.append(f"KL, lowbit / onnxruntime Entropy: quantize time {kl.seconds / other.seconds:.2f}x, "
                     f"peak RSS {kl.peak_rss_mb / other.peak_rss_mb:.3f}x")
    percentile = by_tool.get("lowbit-REMOVAL_OUTLIER")
    if percentile and by_tool.get("ort-percentile"):
        other = by_tool["ort-percentile"]
        lines.append(f"percentile, lowbit / onnxruntime Percentile: quantize time {percentile.seconds / other.seconds:.2f}x, "
                     f"peak RSS {percentile.peak_rss_mb / other.peak_rss_mb:.3f}x")
    if lowbit and ort_minmax:
        lines.append(f"lowbit default / onnxruntime MinMax: quantize time {lowbit.seconds / ort_minmax.seconds:.2f}x, "
                     f"peak RSS {lowbit.peak_rss_mb / ort_minmax.peak_rss_mb:.2f}x, "
                     f"size {lowbit.size_mb / ort_minmax.size_mb:.3f}x")
    if lowbit and float_row:
        lines.append(f"lowbit int8 speed-up over float32: {float_row.latency_b1_ms / lowbit.latency_b1_ms:.2f}x "
                     f"at batch 1, {float_row.latency_b8_ms / lowbit.latency_b8_ms:.2f}x at batch 8")
    if lowbit and ort_minmax:
        lines.append(f"int8 latency, lowbit / onnxruntime MinMax: {lowbit.latency_b1_ms / ort_minmax.latency_b1_ms:.2f}x "
                     f"at batch 1, {lowbit.latency_b8_ms / ort_minmax.latency_b8_ms:.2f}x at batch 8")
    return lines


def text_ratios(rows: list[dict]) -> list[str]:
    """Dynamic quantization against onnxruntime's quantize_dynamic (per-channel), same run."""
    by_tool = {r["tool"]: r for r in rows if r["error"] is None}
    ours, theirs, float_row = by_tool.get("lowbit-dynamic"), by_tool.get("ort-dynamic-per-channel"), \
        by_tool.get("float32")
    if not (ours and theirs and float_row):
        return []
    b1 = ours["latency_b1_ms"] / theirs["latency_b1_ms"]
    b8 = ours["latency_b8_ms"] / theirs["latency_b8_ms"]
    return [f"lowbit default / onnxruntime quantize_dynamic per-channel: latency {b1:.2f}x at batch 1, {b8:.2f}x at "
            f"batch 8; mean cosine {ours['cosine_mean']:.4f} vs {theirs['cosine_mean']:.4f}",
            f"speed-up over float32 at batch 8: lowbit default {float_row['latency_b8_ms'] / ours['latency_b8_ms']:.2f}x, "
            f"onnxruntime per-channel {float_row['latency_b8_ms'] / theirs['latency_b8_ms']:.2f}x"]


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_flags() -> list[str]:
    """The first CPU's feature flags as Linux lists them (``flags`` on x86, ``Features`` on ARM); empty elsewhere."""
    return next((line.split(":", 1)[1].split() for line in _cpuinfo() if line.startswith(("flags", "Features"))), [])


def describe_machine() -> str:
    """The CPU, its cores and the vector extensions that choose ONNX Runtime's int8 kernels (VNNI: exact and fast
    u8 x s8 products; without it, AVX2's saturating ones), the system and Python."""
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
               platform.processor() or "unknown CPU")
    flags = cpu_flags()
    shown = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
             "amx_int8": "AMX"}
    features = [label for flag, label in shown.items() if flag in flags]
    if flags and not any("vnni" in flag for flag in flags):
        features.append("no VNNI")
    extensions = f" ({', '.join(features)})" if features else ""
    return (f"{cpu}{extensions}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}")


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for package in ("lowbit", "onnxruntime", "onnx", "onnx-ir", "onnxscript", "numpy", "torch"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a subset in a few minutes")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for RESULTS.md and results.json")
    args = parser.parse_args()

    work = zoo.cache_dir("bench")
    if args.quick:
        cases = [efficientnet_case(64, 8), digits_case(64, 1000), magika_case(64, 300)]
        tools, runs = ["lowbit", "lowbit-nearest", "lowbit-no-bc", "lowbit-MAX_MIN", "lowbit-KL", "ort-minmax"], 20
    else:
        cases = [efficientnet_case(256, 32), digits_case(256, 2000), ppocr_rec_case(128), magika_case(256, 600)]
        tools, runs = ["lowbit", "lowbit-nearest", "lowbit-no-bc", *(f"lowbit-{m}" for m in job.METHODS),
                       "ort-minmax", "ort-entropy", "ort-percentile"], 50
    results = {"date": time.strftime("%Y-%m-%d"), "machine": describe_machine(), "versions": versions(),
               "command": "python bench/run.py" + (" --quick" if args.quick else ""), "cases": []}
    for case in cases:
        case_work = work / case.name.split()[0].lower()
        rows = bench_case(case, tools, case_work, runs)
        results["cases"].append({"name": case.name, "data": case.data, "calibration": len(case.calib),
                                 "evaluation": len(case.evaluation), "rows": [asdict(r) for r in rows],
                                 "ratios": ratios(rows)})
        if case is cases[0]:
            results["fewer_samples"] = {"model": case.name, **time_with_fewer_samples(case, case_work)}
            peaks = memory_scaling(case, case_work)
            if len(peaks) == 2:
                small, large = sorted(peaks)
                results["memory"] = {"model": case.name, "peak_rss_mb": {str(k): v for k, v in peaks.items()},
                                     "ratio": peaks[large] / peaks[small]}
            elif peaks:
                results["memory"] = {"model": case.name, "peak_rss_mb": {str(k): v for k, v in peaks.items()}}
    results["text"] = text_case(work / "minilm", 256 if args.quick else 844, runs)
    results["weights"] = weights.section(cases[0], work / "weights", args.quick)
    results["images"] = image_pipeline_cost(work / "images", 100 if args.quick else 500)
    results["shapes"] = shapes.section(work / "shapes", quantize_in_child, compare_latency, runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "RESULTS.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
