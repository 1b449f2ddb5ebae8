"""Calibration samples from folders of .npy and .npz files.

* one folder, single-input model: each ``.npy`` file holds one sample of that input;
* one folder of ``.npz`` files: each file is one sample, one array per input name;
* ``input_name:folder`` pairs (calibrate_path): one folder of ``.npy`` files per input,
  paired by sorted file name.

Files are taken in sorted name order (the same samples every run), loaded one at a
time and never unpickled (``allow_pickle=False``).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config.model import CalibrationSource
from ..errors import LowbitError
from .feeds import InputSpec, check_sample

EXTENSIONS = {"NPY": ".npy", "NPZ": ".npz"}


@dataclass
class FileSamples:
    """An iterable of checked feed dicts, one per sample, with its length known up front."""

    columns: dict[str | None, list[Path]]
    specs: list[InputSpec]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            feed: dict[str, np.ndarray] = {}
            for input_name, files in self.columns.items():
                if input_name is None:
                    feed.update(_load_npz(files[i]))
                else:
                    feed[input_name] = _load_npy(files[i])
            origin = ", ".join(str(files[i]) for files in self.columns.values())
            yield check_sample(feed, self.specs, origin)


def file_samples(
    sources: tuple[CalibrationSource, ...],
    specs: list[InputSpec],
    size: int | None,
    input_type: str | None = None,
) -> FileSamples:
    """Find the sample files of calibrate_path, check their number, and pair them per input."""
    names = [s.name for s in specs]
    columns: dict[str | None, list[Path]] = {}
    if len(sources) == 1 and sources[0].input_name is None:
        folder = sources[0].folder
        files = _list(folder, input_type)
        kinds = {f.suffix for f in files}
        if len(kinds) > 1:
            raise LowbitError(f"calibration folder {folder} mixes .npy and .npz files; keep one kind")
        if kinds == {".npy"}:
            if len(specs) != 1:
                raise LowbitError(
                    f"calibration folder {folder} holds .npy files, but the model has {len(specs)} inputs "
                    f"({', '.join(names)}); use .npz files (one array per input name) or input_name:folder pairs")
            columns[names[0]] = files
        else:
            columns[None] = files
    else:
        for source in sources:
            name = source.input_name
            if name is None and len(specs) == 1:
                name = names[0]
            if name not in names:
                raise LowbitError(f"calibrate_path names input '{name}', which the model does not have; "
                                  f"model inputs: {', '.join(names)}")
            files = _list(source.folder, input_type or "NPY")
            columns[name] = files
        counts = {name: len(files) for name, files in columns.items()}
        if len(set(counts.values())) > 1:
            raise LowbitError("calibration folders hold different numbers of samples: "
                              + ", ".join(f"{n}: {c}" for n, c in counts.items()))
    available = len(next(iter(columns.values())))
    if size is not None:
        if size > available:
            raise LowbitError(f"calibrate_size={size}, but only {available} calibration samples were found in "
                              + ", ".join(str(s.folder) for s in sources))
        columns = {name: files[:size] for name, files in columns.items()}
    return FileSamples(columns, specs)


def _list(folder: Path, input_type: str | None) -> list[Path]:
    if not folder.exists():
        raise LowbitError(f"calibration folder not found: {folder}")
    if not folder.is_dir():
        raise LowbitError(f"calibration path is not a folder: {folder}")
    suffixes = {EXTENSIONS[input_type]} if input_type in EXTENSIONS else set(EXTENSIONS.values())
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file())
    if not files:
        raise LowbitError(f"calibration folder {folder} has no {' or '.join(sorted(suffixes))} files")
    return files


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise LowbitError(f"{path}: holds Python objects; lowbit never unpickles data, "
                              "save plain numeric arrays") from None
        raise LowbitError(f"{path}: not a readable .npy file ({exc})") from None
    except (OSError, EOFError) as exc:
        raise LowbitError(f"{path}: not a readable .npy file ({exc})") from None


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as exc:
        if "pickle" in str(exc):
            raise LowbitError(f"{path}: holds Python objects; lowbit never unpickles data, "
                              "save plain numeric arrays") from None
        raise LowbitError(f"{path}: not a readable .npz file ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise LowbitError(f"{path}: not a readable .npz file ({exc})") from None
