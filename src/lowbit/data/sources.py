"""Calibration samples from files: folders per input, .npz folders, or a data-list file.

The ways to point at the files:

* ``calibrate_path=folder`` (``--data``). For a single-input model the folder holds one file
  per sample (.npy, .bin, or an image). For any model it may hold ``.npz`` files, each one
  sample with one array per input name;
* ``calibrate_path=input_name:folder,input_name:folder``: one folder per model input, paired
  by sorted file name;
* ``data_list=list.txt`` (``--data-list``, as tpu-mlir's ``--data_list``): one sample per
  line, with comma-separated paths for multi-input models in the order of the model's
  inputs. Relative paths are relative to the list file's folder.

File kinds: ``.npy`` is one tensor and is never unpickled; ``.npz`` is one sample; ``.bin``
is a raw buffer in the model input's dtype, and 4-D buffers are NHWC unless
``input_data_format`` says NCHW; images (jpg, png, bmp, webp, ...) go through
:mod:`lowbit.data.images`. ``input_type`` restricts a folder to one kind. Files load one at
a time, in sorted order, so the same samples come every run and memory stays flat.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config.model import CalibrationSource
from ..errors import LowbitError
from .feeds import InputSpec, check_sample, too_few_samples
from .images import IMAGE_SUFFIXES, BadSampleError, ImagePreprocess, decode, preprocess

KIND_SUFFIXES = {"NPY": {".npy"}, "NPZ": {".npz"}, "BIN": {".bin"}, "IMAGE": set(IMAGE_SUFFIXES)}


@dataclass(frozen=True)
class DataOptions:
    input_type: str | None = None
    images: ImagePreprocess = ImagePreprocess()
    input_layout: str | None = None  # layout of the model's 4-D inputs; None: from their shape
    bin_layout: str = "NHWC"  # layout of 4-D .bin buffers (MindSpore's inputDataFormat)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    skip_bad_samples: bool = False


def kind_of(path: Path, input_type: str | None) -> str:
    if input_type is not None:
        return input_type
    suffix = path.suffix.lower()
    for kind, suffixes in KIND_SUFFIXES.items():
        if suffix in suffixes:
            return kind
    raise LowbitError(f"{path}: unknown calibration file type '{suffix}'; use .npy, .npz, .bin or an image")


@dataclass
class FileSamples:
    """Checked feed dicts, one per sample; ``len()`` is known before anything is read."""

    rows: list[dict[str | None, Path]]  # per sample: input name -> file (None: an .npz holding all inputs)
    specs: list[InputSpec]
    options: DataOptions
    warn: Callable[[str], None] = print

    def __len__(self) -> int:
        return len(self.rows)

    def kinds(self) -> set[str]:
        """The kinds of the files (IMAGE, BIN, NPY, NPZ)."""
        return {kind_of(path, self.options.input_type) for row in self.rows for path in row.values()}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        specs = {s.name: s for s in self.specs}
        for row in self.rows:
            try:
                feed: dict[str, np.ndarray] = {}
                for name, path in row.items():
                    if name is None:
                        feed.update(read_npz(path))
                    else:
                        feed[name] = read_file(path, specs[name], self.options)
            except BadSampleError as exc:
                if not self.options.skip_bad_samples:
                    raise
                self.warn(f"skipping a bad calibration sample: {exc}")
                continue
            yield check_sample(feed, self.specs, ", ".join(str(p) for p in row.values()))


def folder_samples(sources: tuple[CalibrationSource, ...], specs: list[InputSpec], size: int | None,
                   options: DataOptions) -> FileSamples:
    names = [s.name for s in specs]
    if len(sources) == 1 and sources[0].input_name is None:
        files = _list(sources[0].folder, options.input_type)
        kinds = {kind_of(f, options.input_type) for f in files}
        if len(kinds) > 1:
            raise LowbitError(f"calibration folder {sources[0].folder} mixes file kinds ({', '.join(sorted(kinds))}); "
                              "keep one kind per folder, or set input_type")
        if kinds == {"NPZ"}:
            rows = [{None: f} for f in files]
        elif len(specs) != 1:
            raise LowbitError(
                f"calibration folder {sources[0].folder} holds one file per sample, but the model has {len(specs)} "
                f"inputs ({', '.join(names)}); use input_name:folder pairs, .npz files or a data list")
        else:
            rows = [{names[0]: f} for f in files]
    else:
        columns: dict[str, list[Path]] = {}
        for source in sources:
            name = source.input_name if source.input_name is not None else (names[0] if len(specs) == 1 else None)
            if name not in names:
                raise LowbitError(f"calibrate_path names input '{name}', which the model does not have; "
                                  f"model inputs: {', '.join(names)}")
            columns[name] = _list(source.folder, options.input_type)
        missing = [n for n in names if n not in columns]
        if missing:
            raise LowbitError(f"calibrate_path gives no folder for model input '{missing[0]}'; "
                              f"model inputs: {', '.join(names)}")
        counts = {name: len(files) for name, files in columns.items()}
        if len(set(counts.values())) > 1:
            raise LowbitError("calibration folders hold different numbers of samples: "
                              + ", ".join(f"{n}: {c}" for n, c in counts.items()))
        rows = [dict(zip(columns, files)) for files in zip(*columns.values())]
    where = ", ".join(str(s.folder) for s in sources)
    return FileSamples(_take(rows, size, where), specs, options)


def list_samples(list_file: Path, specs: list[InputSpec], size: int | None, options: DataOptions) -> FileSamples:
    if not list_file.is_file():
        raise LowbitError(f"data list not found: {list_file}")
    names = [s.name for s in specs]
    rows = []
    for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        paths = [(list_file.parent / p.strip()) for p in line.split(",")]
        where = f"{list_file}, line {number}"
        if len(paths) == 1 and kind_of(paths[0], options.input_type) == "NPZ":
            row = {None: paths[0]}
        elif len(paths) != len(names):
            raise LowbitError(f"{where}: {len(paths)} paths, the model has {len(names)} inputs ({', '.join(names)})")
        else:
            row = dict(zip(names, paths))
        for path in row.values():
            if not path.is_file():
                raise LowbitError(f"{where}: file not found: {path}")
        rows.append(row)
    if not rows:
        raise LowbitError(f"data list {list_file} lists no samples")
    return FileSamples(_take(rows, size, str(list_file)), specs, options)


def _take(rows: list, size: int | None, where: str) -> list:
    if size is not None and size > len(rows):
        raise too_few_samples(size, len(rows), where)
    return rows[:size] if size is not None else rows


def _list(folder: Path, input_type: str | None) -> list[Path]:
    if not folder.exists():
        raise LowbitError(f"calibration folder not found: {folder}")
    if not folder.is_dir():
        raise LowbitError(f"calibration path is not a folder: {folder}")
    suffixes = KIND_SUFFIXES[input_type] if input_type else set().union(*KIND_SUFFIXES.values())
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file())
    if not files:
        wanted = input_type or "calibration"
        raise LowbitError(f"calibration folder {folder} has no {wanted} files ({', '.join(sorted(suffixes))})")
    return files


# -- readers ---------------------------------------------------------------------------

def read_file(path: Path, spec: InputSpec, options: DataOptions) -> np.ndarray:
    kind = kind_of(path, options.input_type)
    if kind == "NPY":
        return read_npy(path)
    if kind == "BIN":
        return read_bin(path, spec, options)
    if kind == "IMAGE":
        return read_image(path, spec, options)
    raise LowbitError(f"{path}: an .npz file holds a whole sample; it cannot stand for input '{spec.name}' alone")


NUMPY_MAGICS = (b"\x93NUMPY", b"PK\x03\x04")  # .npy, and .npz (a zip archive)
PICKLE_PROTOCOL = b"\x80"  # the first byte of a pickle of protocol 2 or later (pickle.dump writes 4 or 5)


def _unpickle_guard(path: Path, exc: Exception, what: str) -> LowbitError:
    """numpy's refusal to unpickle (``allow_pickle=False``) says "pickle" for any file without a NumPy header,
    garbage included: only an object array in a NumPy file, or a pickle, holds Python objects."""
    if "pickle" in str(exc):
        with open(path, "rb") as file:
            head = file.read(6)
        if head.startswith(NUMPY_MAGICS) or head.startswith(PICKLE_PROTOCOL):
            return LowbitError(f"{path}: holds Python objects; lowbit never unpickles data, save plain numeric "
                               "arrays")
        return BadSampleError(f"{path}: not a readable {what} file (no NumPy header: corrupt, or another format)")
    return BadSampleError(f"{path}: not a readable {what} file ({exc})")


def read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise _unpickle_guard(path, exc, ".npy") from None


def read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise _unpickle_guard(path, exc, ".npz") from None


def model_layout(spec: InputSpec, options: DataOptions) -> str | None:
    """NCHW or NHWC for a 4-D input (from input_layout, else its shape), None otherwise."""
    if spec.shape is None or len(spec.shape) != 4:
        return None
    if options.input_layout is not None:
        return options.input_layout
    channel_like = (1, 3, 4)
    if spec.shape[3] in channel_like and spec.shape[1] not in channel_like:
        return "NHWC"
    return "NCHW"  # ONNX's convention, also when the shape does not tell


def resolved_shape(spec: InputSpec, options: DataOptions, path: Path) -> tuple[int, ...]:
    """The input's shape with free dims filled from input_shape (a free batch dim defaults to 1)."""
    if spec.name in options.shapes:
        shape = options.shapes[spec.name]
        if spec.shape is not None and len(shape) != len(spec.shape):
            raise LowbitError(f"input_shape gives '{spec.name}' {len(shape)} dimensions "
                              f"({','.join(map(str, shape))}), the model's input has {len(spec.shape)} "
                              f"({spec.dims()})")
        if spec.shape is not None and any(want is not None and want != got for want, got in zip(spec.shape, shape)):
            raise LowbitError(f"input_shape gives '{spec.name}' the shape {','.join(map(str, shape))}, which "
                              f"contradicts the model's {spec.dims()}")
        return shape
    if spec.shape is None:
        raise LowbitError(f"{path}: input '{spec.name}' has no known shape; give input_shape {spec.name}:d0,d1,...")
    dims = [1 if (d is None and i == 0) else d for i, d in enumerate(spec.shape)]
    if any(d is None for d in dims):
        raise LowbitError(f"{path}: input '{spec.name}' has free dimensions {spec.describe()}; "
                          f"give input_shape {spec.name}:d0,d1,... to read raw buffers")
    return tuple(dims)


def read_bin(path: Path, spec: InputSpec, options: DataOptions) -> np.ndarray:
    shape = resolved_shape(spec, options, path)
    layout = model_layout(spec, options)
    stored = shape
    if layout is not None and options.bin_layout != layout:
        stored = _to_layout(shape, layout, options.bin_layout)
    expected = math.prod(stored) * spec.dtype.itemsize
    try:
        actual = path.stat().st_size
    except OSError as exc:
        raise BadSampleError(f"{path}: cannot read ({exc.strerror})") from None
    if actual != expected:
        raise LowbitError(f"{path}: {actual} bytes, but input '{spec.name}' needs {expected} bytes "
                          f"({spec.dtype}, {options.bin_layout if layout else 'shape'} "
                          f"{'x'.join(map(str, stored))})")
    array = np.fromfile(path, dtype=spec.dtype).reshape(stored)
    if stored != shape:
        array = np.ascontiguousarray(array.transpose((0, 3, 1, 2) if layout == "NCHW" else (0, 2, 3, 1)))
    return array


def _to_layout(shape: tuple[int, ...], model: str, stored: str) -> tuple[int, ...]:
    n, a, b, c = shape
    if model == "NCHW" and stored == "NHWC":  # model NCHW (n, c, h, w) -> buffer (n, h, w, c)
        return (n, b, c, a)
    return (n, c, a, b)  # model NHWC (n, h, w, c) -> buffer (n, c, h, w)


def read_image(path: Path, spec: InputSpec, options: DataOptions) -> np.ndarray:
    x = preprocess(decode(path), options.images, path)  # H x W x C float32
    layout = model_layout(spec, options)
    if layout is None:
        raise LowbitError(f"{path}: input '{spec.name}' is not 4-D ({spec.describe()}); images need NCHW or NHWC")
    if layout == "NCHW":
        x = x.transpose(2, 0, 1)
    x = x[np.newaxis]
    if spec.dtype.kind == "f":
        return np.ascontiguousarray(x, dtype=spec.dtype)
    if options.images.mean is not None or options.images.std is not None:
        raise LowbitError(f"input '{spec.name}' is {spec.dtype}: normalize_mean/normalize_std need a float input")
    info = np.iinfo(spec.dtype)
    return np.clip(np.rint(x), info.min, info.max).astype(spec.dtype)
