"""Calibration tables: activation ranges in files that other tools (and lowbit itself) read.

Three formats, told apart by their content when read:

* ``json`` (lowbit's own): per tensor the range quantized, the scale, the zero point, the
  bits and the integer type. Floats are written exactly (shortest repr), so reading a table
  back gives the same scales, bit for bit (a graph input's scale that lowbit widened off its
  rounding ties too: the recorded scale says so);
* ``tpu-mlir``: a comment header, then a line per tensor ``name threshold min max``, as
  tpu-mlir's ``run_calibration.py`` writes it. tpu-mlir quantizes symmetric tensors with
  ``[-threshold, threshold]`` and asymmetric ones with ``[min, max]``, and so does lowbit
  when it reads one;
* ``tensorrt``: TensorRT's calibration cache, a header line naming the calibrator, then
  ``name: scale`` with the scale as the hex of a big-endian float32. TensorRT reads it for
  the float model in implicit quantization (tensor names are the ONNX value names); its
  scales are symmetric (``threshold / 127``), so an asymmetric (CPU, DSP) range read from
  it becomes ``[-127 scale, 127 scale]``.

A table names tensors of the float model (before any Q/DQ is inserted).
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import LowbitError
from ..quantizers.qparams import QParams

FORMATS = ("json", "tpu-mlir", "tensorrt")
TENSORRT_HEADER = "TRT-8601-EntropyCalibration2"  # TensorRT 8.6's entropy calibrator; any TRT-* header is read


@dataclass(frozen=True)
class TableEntry:
    """One tensor's range, and the symmetric threshold where the table gives one of its own.

    ``scale``: the scale lowbit's own table recorded beside the range. It matters where
    lowbit widened a graph input's scale off its rounding ties (:mod:`lowbit.quantizers.ties`),
    which the range alone does not say.
    """

    min: float
    max: float
    threshold: float | None = None
    scale: float | None = None

    def range(self, symmetric: bool) -> tuple[float, float]:
        """The range to quantize with a symmetric or an asymmetric scheme (tpu-mlir's rule)."""
        if symmetric and self.threshold is not None:
            return -self.threshold, self.threshold
        return self.min, self.max


def write_table(path: Path, table_format: str, ranges: Mapping[str, tuple[float, float]],
                qparams: Mapping[str, QParams], about: Mapping[str, object]) -> None:
    """Write the table atomically (a temporary file beside it, then a rename)."""
    text = {"json": _json, "tpu-mlir": _tpu_mlir, "tensorrt": _tensorrt}[table_format](ranges, qparams, about)
    handle, staged = tempfile.mkstemp(prefix=".lowbit-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(staged, path)
    finally:
        if os.path.exists(staged):
            os.unlink(staged)


@dataclass(frozen=True)
class Table:
    """A table's entries, and whether a lowbit table says it was measured with cross-layer equalization (None:
    another format, or a lowbit table from before its header said so)."""

    entries: dict[str, TableEntry]
    equalized: bool | None = None


def read_table(path: Path) -> Table:
    """The table in any of the three formats."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LowbitError(f"calibration table not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LowbitError(f"{path}: not a readable calibration table ({exc})") from None
    stripped = text.lstrip()
    if stripped.startswith("{"):
        return _read_json(path, text)
    if stripped.startswith("TRT-"):
        return Table(_read_tensorrt(path, text))
    return Table(_read_tpu_mlir(path, text))


# -- writers ----------------------------------------------------------------------------

def _json(ranges, qparams, about) -> str:
    tensors = {}
    for name, (lo, hi) in ranges.items():
        q = qparams[name]
        tensors[name] = {"min": float(lo), "max": float(hi), "scale": float(q.scale),
                         "zero_point": int(q.zero_point), "bits": q.scheme.qtype.bits, "dtype": q.scheme.qtype.name}
    table = {"format": "lowbit-calibration-table", "version": 1, **about, "tensors": tensors}
    return json.dumps(table, indent=1) + "\n"


def _tpu_mlir(ranges, qparams, about) -> str:
    lines = [f"# genetated time: {time.strftime('%Y-%m-%d %H:%M:%S')}",  # tpu-mlir's own spelling
             f"# histogram number: {about.get('histogram_bins', 0)}",
             f"# sample number: {about.get('samples', 0)}",
             f"# tune number: {about.get('tune_num', 0)}",
             "###",
             "# op_name    threshold    min    max"]
    for name, (lo, hi) in ranges.items():
        if not name or any(c.isspace() for c in name):
            raise LowbitError(f"tensor name {name!r} has white space, which a tpu-mlir table cannot hold; "
                              "write table_format=json")
        lines.append(f"{name} {max(abs(lo), abs(hi))!r} {float(lo)!r} {float(hi)!r}")
    return "\n".join(lines) + "\n"


def _tensorrt(ranges, qparams, about) -> str:
    lines = [TENSORRT_HEADER]
    for name, (lo, hi) in ranges.items():
        scale = max(abs(lo), abs(hi)) / 127.0
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    return "\n".join(lines) + "\n"


# -- readers ----------------------------------------------------------------------------

def _read_json(path: Path, text: str) -> Table:
    try:
        data = json.loads(text)
        tensors = data["tensors"]
        entries = {name: TableEntry(_finite(path, name, entry["min"]), _finite(path, name, entry["max"]),
                                    scale=_finite(path, name, entry["scale"]) if "scale" in entry else None)
                   for name, entry in tensors.items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise LowbitError(f"{path}: not a lowbit calibration table ({type(exc).__name__}: {exc})") from None
    equalized = data.get("cross_layer_equalization")
    return Table(_not_empty(path, entries), equalized if isinstance(equalized, bool) else None)


def _read_tpu_mlir(path: Path, text: str) -> dict[str, TableEntry]:
    entries = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 4:
            raise LowbitError(f"{path}, line {number}: expected 'name threshold min max', got {line!r}")
        name = fields[0]
        try:
            threshold, lo, hi = (_finite(path, name, v) for v in fields[1:4])
        except ValueError:
            raise LowbitError(f"{path}, line {number}: threshold, min and max must be numbers: {line!r}") from None
        entries[name] = TableEntry(lo, hi, threshold)
    return _not_empty(path, entries)


def _read_tensorrt(path: Path, text: str) -> dict[str, TableEntry]:
    entries = {}
    lines = text.splitlines()
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, sep, value = line.rpartition(":")
        try:
            scale = struct.unpack(">f", bytes.fromhex(value.strip()))[0]
        except (ValueError, struct.error):
            raise LowbitError(f"{path}, line {number}: expected 'tensor: <hex float32 scale>', got {line!r}") from None
        if not sep or not name.strip():
            raise LowbitError(f"{path}, line {number}: expected 'tensor: <hex float32 scale>', got {line!r}")
        threshold = _finite(path, name, float(scale) * 127.0)
        entries[name.strip()] = TableEntry(-threshold, threshold, threshold)
    return _not_empty(path, entries)


def _finite(path: Path, name: str, value) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise LowbitError(f"{path}: the range of tensor '{name}' is not finite ({value})")
    return value


def _not_empty(path: Path, entries: dict[str, TableEntry]) -> dict[str, TableEntry]:
    if not entries:
        raise LowbitError(f"{path}: the calibration table names no tensor")
    return entries
