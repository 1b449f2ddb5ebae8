"""Models with SiLU activations that lowbit was not tuned on, beside onnxruntime.quantization.

    pip install --no-deps nudenet ddddocr   # only their ONNX files are read
    python bench/silu.py                    # writes bench/SILU.md (about 6 minutes)

Models: nudenet's ``320n.onnx`` (YOLOv8n, 18 classes, one output of 4 box rows and 18 class
scores over 2100 anchors), ddddocr's ``common_det.onnx`` (a YOLOX character detector at
416 x 416, output rows of box, objectness and class score per anchor) and ddddocr's
``common.onnx`` (its text recognizer: convolutions with SiLU, an LSTM, 8210 characters per
time step, CTC); ddddocr's two converted to opset 13, which onnxruntime's quantizer needs for
per-channel weights. Data: for nudenet, 128 calibration crops of opencv-doc's video frames and
other images and 120 held-out crops of natural photos, padded to a square, 320 x 320, / 255
(nudenet's own preprocessing); for the detector, 64 calibration and 60 held-out scenes of text
drawn on photos (``zoo.text_on_photos``), letterboxed into 416 x 416 on grey 114, BGR, 0-255;
for the recognizer, 64 calibration and 60 held-out lines of text on photos (``zoo.text_lines``),
grey, 64 pixels high, / 255 (ddddocr's).

Detector figures against the float model on the held-out inputs: the cosine of the whole output,
of the scores alone (nudenet: the class rows; ddddocr: objectness x class), the score error (the
mean absolute change of an anchor's best score over the anchors whose best float score is above
0.1: the candidate detections), the mean absolute error of the boxes in pixels, and per anchor
whose best float score passes 0.25, the share that still passes (recall) and, of those passing
in the quantized model, the share that passed in float (precision; both move with small shifts
of scores near the threshold, so read them beside the score error). The whole output's cosine is
what lowbit's range search compares by default: the box coordinates (tens to hundreds of
pixels) outweigh the scores (0 to 1) in it. Recognizer figures: the output's cosine, the share
of time steps whose best character is the float model's, and the share of lines whose decoded
text (CTC: repeats merged, blanks dropped) is the float model's.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
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


def ddddocr_model(name: str, folder: Path) -> Path:
    """ddddocr's ``name``.onnx (``common_det``, ``common``) converted to opset 13, in ``folder``."""
    import importlib.util

    source = Path(importlib.util.find_spec("ddddocr").submodule_search_locations[0]) / f"{name}.onnx"
    path = folder / f"{name}_opset13.onnx"
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


def recognizer_input(line: np.ndarray, height: int = 64) -> np.ndarray:
    from PIL import Image

    grey = Image.fromarray(line).convert("L")
    width = max(16, int(grey.size[0] * height / grey.size[1]))
    return (np.asarray(grey.resize((width, height), Image.BILINEAR), np.float32) / 255.0)[np.newaxis, np.newaxis]


def scores_and_boxes(output: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, anchors, classes) scores and (inputs, anchors, 4) boxes of either detector's output."""
    if output.shape[1] == 22:  # YOLOv8: (N, 4 + 18, anchors)
        return output[:, 4:].transpose(0, 2, 1), output[:, :4].transpose(0, 2, 1)
    return output[..., 4:5] * output[..., 5:], output[..., :4]  # YOLOX: (N, anchors, box + objectness + class)


def score_error(reference_scores: np.ndarray, scores: np.ndarray) -> float:
    """The mean absolute change of each anchor's best score, over the anchors whose float best score is above 0.1
    (the candidate detections)."""
    best_reference, best = reference_scores.max(-1), scores.max(-1)
    return float(np.abs(best_reference - best)[best_reference > 0.1].mean())


def detection_figures(reference: list[np.ndarray], got: list[np.ndarray]) -> dict[str, str]:
    reference, got = np.concatenate(reference), np.concatenate(got)
    ref_scores, ref_boxes = scores_and_boxes(reference)
    scores, boxes = scores_and_boxes(got)
    found, kept = ref_scores.max(-1) > 0.25, scores.max(-1) > 0.25
    return {"cosine": f"{np.mean([zoo.cosine(a, b) for a, b in zip(reference, got)]):.5f}",
            "score cosine": f"{zoo.cosine(ref_scores, scores):.4f}",
            "score error": f"{score_error(ref_scores, scores):.4f}",
            "box error (px)": f"{np.abs(ref_boxes - boxes).mean():.3f}",
            "recall > 0.25": f"{(found & kept).sum() / max(found.sum(), 1):.3f}",
            "precision > 0.25": f"{(found & kept).sum() / max(kept.sum(), 1):.3f}"}


def recognition_figures(reference: list[np.ndarray], got: list[np.ndarray]) -> dict[str, str]:
    def text(logits: np.ndarray) -> tuple[int, ...]:
        best = logits.argmax(-1).reshape(-1)
        return tuple(int(c) for i, c in enumerate(best) if c != 0 and (i == 0 or c != best[i - 1]))

    same_steps = np.mean([(a.argmax(-1) == b.argmax(-1)).mean() for a, b in zip(reference, got)])
    return {"cosine": f"{np.mean([zoo.cosine(a, b) for a, b in zip(reference, got)]):.5f}",
            "time steps, same character": f"{same_steps:.4f}",
            "lines, same text": f"{np.mean([text(a) == text(b) for a, b in zip(reference, got)]):.3f}"}


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


def case(title: str, model: Path, calib: list[np.ndarray], held: list[np.ndarray], work: Path,
         figures: Callable[[list[np.ndarray], list[np.ndarray]], dict[str, str]]) -> list[str]:
    """One model's table: lowbit's rows and onnxruntime's MinMax, ``figures`` of each on the held-out inputs."""
    work.mkdir()
    folder = work / "calib"
    folder.mkdir()
    for i, x in enumerate(calib):
        np.save(folder / f"{i:03d}.npy", x)
    reference = outputs(model, held)
    rows = lowbit_rows(model, folder, work)
    start = time.perf_counter()
    run_onnxruntime("minmax", model, folder, work / "ort.onnx", None)
    rows.append(("onnxruntime MinMax", work / "ort.onnx", time.perf_counter() - start))
    table = []
    for label, path, seconds in rows:
        columns = figures(reference, outputs(path, held))
        print(title, label, columns, flush=True)
        table.append(f"| {label} | " + " | ".join(columns.values()) + f" | {seconds:.0f} |")
    header = ["tool", *columns, "quantize s"]
    return [f"## {title}", "", f"{len(calib)} calibration inputs, {len(held)} held-out inputs.", "",
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *table, ""]


def outputs(model: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [session.run(None, {name: x})[0] for x in inputs]


def main() -> None:
    calibration, natural = list(zoo.calibration_images().values()), list(zoo.natural_photos().values())
    lines = ["# Models with SiLU", "",
             f"Machine: {run.describe_machine()}. onnxruntime {ort.__version__}. `python bench/silu.py` "
             "(see its docstring for the models, data and figures).", ""]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lines += case("nudenet YOLOv8n (320)", nudenet_model(),
                      [nudenet_input(c) for image in calibration for c in zoo.crops(image, 2, 0)][:128],
                      [nudenet_input(c) for i, image in enumerate(natural) for c in zoo.crops(image, 6, 100 + i)],
                      work / "nudenet", detection_figures)
        lines += case("ddddocr YOLOX character detector (416)", ddddocr_model("common_det", work),
                      [ddddocr_input(s) for s in zoo.text_on_photos(calibration, 64, 0, False)],
                      [ddddocr_input(s) for s in zoo.text_on_photos(natural, 60, 1, True)], work / "detector",
                      detection_figures)
        lines += case("ddddocr text recognizer (CNN with SiLU, LSTM, CTC)", ddddocr_model("common", work),
                      [recognizer_input(line) for line in zoo.text_lines(calibration, 64, 0, False)[0]],
                      [recognizer_input(line) for line in zoo.text_lines(natural, 60, 1, True)[0]],
                      work / "recognizer", recognition_figures)
    (HERE / "SILU.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
