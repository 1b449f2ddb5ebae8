"""Two YOLO detectors with SiLU activations, beside onnxruntime.quantization: what their scores keep.

    pip install --no-deps nudenet ddddocr   # only their ONNX files are read
    python bench/detectors.py               # writes bench/DETECTORS.md (about 5 minutes)

Models: nudenet's ``320n.onnx`` (YOLOv8n, 18 classes, one output of 4 box rows and 18 class
scores over 2100 anchors) and ddddocr's ``common_det.onnx`` (a YOLOX character detector at
416 x 416, output rows of box, objectness and class score per anchor; converted to opset 13,
which onnxruntime's quantizer needs for per-channel weights). Data: for nudenet, 128
calibration crops of opencv-doc's video frames and other images and 120 held-out crops of
natural photos, padded to a square, 320 x 320, / 255 (nudenet's own preprocessing); for
ddddocr, 64 calibration and 60 held-out scenes of text drawn on photos (``zoo.text_on_photos``),
letterboxed into 416 x 416 on grey 114, BGR, 0-255 (ddddocr's).

Figures against the float model on the held-out inputs: the cosine of the whole output, of the
scores alone (nudenet: the class rows; ddddocr: objectness x class), the score error (the mean
absolute change of an anchor's best score over the anchors whose best float score is above 0.1:
the candidate detections), the mean absolute error of the boxes in pixels, and per anchor whose
best float score passes 0.25, the share that still passes (recall) and, of those passing in the
quantized model, the share that passed in float (precision; both move with small shifts of
scores near the threshold, so read them beside the score error). The whole output's cosine is
what lowbit's range search compares by default: the box coordinates (tens to hundreds of
pixels) outweigh the scores (0 to 1) in it.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import run, zoo
from bench.job import run_onnxruntime

HERE = Path(__file__).resolve().parent


def nudenet_model() -> Path:
    import nudenet

    return Path(nudenet.__file__).parent / "320n.onnx"


def ddddocr_detector(folder: Path) -> Path:
    import importlib.util

    source = Path(importlib.util.find_spec("ddddocr").submodule_search_locations[0]) / "common_det.onnx"
    path = folder / "common_det_opset13.onnx"
    onnx.save(onnx.version_converter.convert_version(onnx.load(str(source)), 13), str(path))
    return path


def nudenet_input(image: np.ndarray, side: int = 320) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    square = np.zeros((max(h, w), max(h, w), 3), np.uint8)
    square[:h, :w] = image
    x = np.asarray(Image.fromarray(square).resize((side, side), Image.BILINEAR), np.float32) / 255.0
    return x.transpose(2, 0, 1)[np.newaxis].copy()


def ddddocr_input(image: np.ndarray, side: int = 416) -> np.ndarray:
    import cv2

    bgr = np.ascontiguousarray(image[:, :, ::-1])
    ratio = min(side / bgr.shape[0], side / bgr.shape[1])
    resized = cv2.resize(bgr, (int(bgr.shape[1] * ratio), int(bgr.shape[0] * ratio)), interpolation=cv2.INTER_LINEAR)
    canvas = np.full((side, side, 3), 114, np.uint8)
    canvas[:resized.shape[0], :resized.shape[1]] = resized
    return canvas.transpose(2, 0, 1)[np.newaxis].astype(np.float32)


def scores_and_boxes(output: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, anchors, classes) scores and (inputs, anchors, 4) boxes of either detector's output."""
    if output.shape[1] == 22:  # YOLOv8: (N, 4 + 18, anchors)
        return output[:, 4:].transpose(0, 2, 1), output[:, :4].transpose(0, 2, 1)
    return output[..., 4:5] * output[..., 5:], output[..., :4]  # YOLOX: (N, anchors, box + objectness + class)


def figures(path: Path, inputs: list[np.ndarray], reference: np.ndarray) -> dict[str, float]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = np.concatenate([session.run(None, {name: x})[0] for x in inputs])
    ref_scores, ref_boxes = scores_and_boxes(reference)
    scores, boxes = scores_and_boxes(got)
    found, kept = ref_scores.max(-1) > 0.25, scores.max(-1) > 0.25
    candidates = ref_scores.max(-1) > 0.1
    return {"cosine": float(np.mean([zoo.cosine(a, b) for a, b in zip(reference, got)])),
            "score cosine": zoo.cosine(ref_scores, scores), "box error px": float(np.abs(ref_boxes - boxes).mean()),
            "score error": float(np.abs(ref_scores.max(-1) - scores.max(-1))[candidates].mean()),
            "recall": float((found & kept).sum() / max(found.sum(), 1)),
            "precision": float((found & kept).sum() / max(kept.sum(), 1)), "anchors": int(found.sum())}


def lowbit_rows(model: Path, folder: Path, work: Path) -> list[tuple[str, Path, float]]:
    import lowbit
    import lowbit.calibration.dead_zones as dead_zones

    rows = []
    for label, settings, silu in (("lowbit default", {}, True),
                                  ("lowbit default, no SiLU dead zone", {}, False),
                                  ("lowbit MAX_MIN", {"activation_quant_method": "MAX_MIN"}, True)):
        out = work / f"{label.replace(' ', '_').replace(',', '')}.onnx"
        original = dead_zones.read_as_silu
        if not silu:
            dead_zones.read_as_silu = lambda value: False  # the ranges as before the SiLU dead zone
        try:
            start = time.perf_counter()
            lowbit.quantize(model, out, data=folder, progress=False, **settings)
        finally:
            dead_zones.read_as_silu = original
        rows.append((label, out, time.perf_counter() - start))
    return rows


def case(title: str, model: Path, calib: list[np.ndarray], held: list[np.ndarray], work: Path) -> list[str]:
    folder = work / "calib"
    folder.mkdir()
    for i, x in enumerate(calib):
        np.save(folder / f"{i:03d}.npy", x)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    reference = np.concatenate([session.run(None, {name: x})[0] for x in held])
    rows = lowbit_rows(model, folder, work)
    start = time.perf_counter()
    run_onnxruntime("minmax", model, folder, work / "ort.onnx", None)
    rows.append(("onnxruntime MinMax", work / "ort.onnx", time.perf_counter() - start))
    lines = [f"## {title}", "", f"{len(calib)} calibration inputs, {len(held)} held-out inputs; "
             f"{int(scores_and_boxes(reference)[0].max(-1).__gt__(0.25).sum())} held-out anchors with a float "
             "score above 0.25.", "",
             "| tool | cosine | score cosine | score error | box error (px) | recall > 0.25 | precision > 0.25 "
             "| quantize s |", "|---|---|---|---|---|---|---|---|"]
    for label, path, seconds in rows:
        f = figures(path, held, reference)
        print(title, label, f, flush=True)
        lines.append(f"| {label} | {f['cosine']:.5f} | {f['score cosine']:.4f} | {f['score error']:.4f} | "
                     f"{f['box error px']:.3f} | "
                     f"{f['recall']:.3f} | {f['precision']:.3f} | {seconds:.0f} |")
    return lines + [""]


def main() -> None:
    calibration, natural = list(zoo.calibration_images().values()), list(zoo.natural_photos().values())
    lines = ["# YOLO detectors with SiLU", "",
             f"Machine: {run.describe_machine()}. onnxruntime {ort.__version__}. `python bench/detectors.py` "
             "(see its docstring for the models, data and figures).", ""]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "nudenet").mkdir()
        lines += case("nudenet YOLOv8n (320)", nudenet_model(),
                      [nudenet_input(c) for image in calibration for c in zoo.crops(image, 2, 0)][:128],
                      [nudenet_input(c) for i, image in enumerate(natural) for c in zoo.crops(image, 6, 100 + i)],
                      work / "nudenet")
        (work / "ddddocr").mkdir()
        lines += case("ddddocr YOLOX character detector (416)", ddddocr_detector(work),
                      [ddddocr_input(s) for s in zoo.text_on_photos(calibration, 64, 0, False)],
                      [ddddocr_input(s) for s in zoo.text_on_photos(natural, 60, 1, True)], work / "ddddocr")
    (HERE / "DETECTORS.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
