"""PP-OCRv4 det (rapidocr-onnxruntime's text detector) on text drawn on photos, beside onnxruntime.quantization.

    python bench/ppocr_det.py              # writes bench/PPOCR_DET.md (about 4 minutes)

Scenes: 320 x 320 crops of photos with 2 to 5 lines of real English (zoo.text_on_photos): 48
calibration scenes over opencv-doc's video frames and other images, 40 held-out scenes over
natural photos, with other sentences and typefaces. Figures against the float model, on the
held-out scenes: the mean cosine of the text-probability maps and the mean IoU of the text
masks (p > 0.3) that the detector's post-processing reads. onnxruntime runs `quantize_static`
(QDQ, per channel, U8S8, MinMax) after converting the model to opset 13: at the model's own
opset 12 it writes a DequantizeLinear with an axis, which its own runtime refuses.
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
LOWBIT = {"lowbit default": {}, "lowbit MSE": {"activation_quant_method": "MSE"},
          "lowbit MAX_MIN": {"activation_quant_method": "MAX_MIN"}, "lowbit KL": {"activation_quant_method": "KL"}}


def figures(path: Path, held: list[np.ndarray], reference: list[np.ndarray]) -> tuple[float, float]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = [session.run(None, {"x": x})[0] for x in held]
    cosine = float(np.mean([zoo.cosine(a.ravel(), b.ravel()) for a, b in zip(reference, got)]))
    ious = [((a > .3) & (b > .3)).sum() / ((a > .3) | (b > .3)).sum() for a, b in zip(reference, got)
            if (a > .3).mean() > 0.005]
    return cosine, float(np.mean(ious))


def main() -> None:
    import lowbit

    model = zoo.ppocr_models()["det"]
    calib = [zoo.ppocr_det_input(s) for s in zoo.text_on_photos(list(zoo.calibration_images().values()), 48, 0, False)]
    held = [zoo.ppocr_det_input(s) for s in zoo.text_on_photos(list(zoo.natural_photos().values()), 40, 1, True)]
    float_session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    reference = [float_session.run(None, {"x": x})[0] for x in held]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "calib"
        folder.mkdir()
        for i, x in enumerate(calib):
            np.save(folder / f"{i:03d}.npy", x)
        for tool, settings in LOWBIT.items():
            out = work / f"{tool.replace(' ', '_')}.onnx"
            start = time.perf_counter()
            lowbit.quantize(model, out, data=folder, progress=False, **settings)
            rows.append((tool, *figures(out, held, reference), time.perf_counter() - start))
            print(rows[-1], flush=True)
        opset13 = work / "det13.onnx"
        onnx.save(onnx.version_converter.convert_version(onnx.load(str(model)), 13), str(opset13))
        out = work / "ort.onnx"
        start = time.perf_counter()
        run_onnxruntime("minmax", opset13, folder, out, None)
        rows.append(("onnxruntime MinMax (opset 13)", *figures(out, held, reference), time.perf_counter() - start))
        print(rows[-1], flush=True)
    lines = ["# PP-OCRv4 det on text drawn on photos", "",
             f"Machine: {run.describe_machine()}. onnxruntime {ort.__version__}. `python bench/ppocr_det.py`; "
             f"{len(calib)} calibration scenes, {len(held)} held-out scenes (see the script's docstring).", "",
             "| tool | cosine of the probability maps | IoU of the text masks | quantize s |", "|---|---|---|---|"]
    lines += [f"| {tool} | {cosine:.3f} | {iou:.3f} | {seconds:.0f} |" for tool, cosine, iou, seconds in rows]
    (HERE / "PPOCR_DET.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
