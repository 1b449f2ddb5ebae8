"""Loading an ONNX model safely into onnx_ir's in-memory graph.

Checks, each with an error that names the file: the path exists and is an ONNX
protobuf; external-data files stay inside the model's folder (a location such as
``../../etc/passwd`` is refused) and exist; the model passes ``onnx.checker``; the
opset is at least 14 (per-channel DequantizeLinear needs 13, HardSwish 14), converting
older models with onnx's version converter. External data is read into memory, so the model can be
rewritten and saved elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from google.protobuf.message import DecodeError

from ..errors import LowbitError
from .runtime import make_session

MIN_OPSET = 14


def load_model(path: str | Path) -> tuple[ir.Model, int]:
    """The model, and its size on disk in bytes (the .onnx file plus its external data files)."""
    path = Path(path)
    if not path.exists():
        raise LowbitError(f"model not found: {path}")
    if not path.is_file():
        raise LowbitError(f"model path is not a file: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise LowbitError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    if not proto.graph.node and not proto.graph.output:
        raise LowbitError(f"{path}: not an ONNX model (no graph found; is the file truncated or of another kind?)")
    data_files = _load_external_data(proto, path)
    size = path.stat().st_size + sum(f.stat().st_size for f in data_files)
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise LowbitError(f"{path}: invalid ONNX model: {_first_line(exc)}") from None
    broken = _text_not_utf8(proto)
    if broken:
        raise LowbitError(f"{path}: invalid ONNX model: a {broken} is not valid UTF-8 text (is the file corrupted?)")
    proto = _ensure_min_opset(proto, path)
    try:
        # what the checker lets through (a tensor of a type its op does not take, data that does not
        # fill its shape) ONNX Runtime refuses at load, and lowbit has to run the float model anyway
        make_session(proto)
        return ir.serde.deserialize_model(proto), size
    except LowbitError as exc:
        raise LowbitError(f"{path}: {exc}") from None
    except Exception as exc:  # onnx_ir's reader raises ValueError/SerdeError on data the checker did not read
        raise LowbitError(f"{path}: invalid ONNX model: {_first_line(exc)}") from None


def _text_not_utf8(message) -> str | None:
    """The name of the first string field whose bytes are not UTF-8 (protobuf then hands out bytes), or None.

    onnx.checker lets such names through, and they break every later step that writes the graph.
    """
    for field, value in message.ListFields():
        values = value if field.is_repeated else [value]
        if field.type == field.TYPE_STRING and any(isinstance(v, bytes) for v in values):
            return f"{message.DESCRIPTOR.name}.{field.name}"
        if field.type == field.TYPE_MESSAGE:
            for item in values:
                broken = _text_not_utf8(item)
                if broken:
                    return broken
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _external_tensors(proto: onnx.ModelProto):
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _load_external_data(proto: onnx.ModelProto, path: Path) -> set[Path]:
    """Read external tensors into the proto; returns the data files read."""
    base = path.parent.resolve()
    files = set()
    for tensor in _external_tensors(proto):
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(base):
            raise LowbitError(
                f"{path}: tensor '{tensor.name}' keeps its data at '{location}', outside the model's "
                "folder; lowbit refuses external data that escapes the model folder")
        if not target.is_file():
            raise LowbitError(f"{path}: external data file missing for tensor '{tensor.name}': {target}")
        files.add(target)
    try:
        onnx.load_external_data_for_model(proto, str(base))
    except (OSError, ValueError) as exc:
        raise LowbitError(f"{path}: cannot read external data ({_first_line(exc)})") from None
    return files


def _ensure_min_opset(proto: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset >= MIN_OPSET:
        return proto
    try:
        return onnx.version_converter.convert_version(proto, MIN_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors from C++
        raise LowbitError(
            f"{path}: opset {opset} is older than {MIN_OPSET}, which lowbit works in, "
            f"and onnx's version converter could not upgrade it ({_first_line(exc)})") from None


def copy_model(model: ir.Model) -> ir.Model:
    """An independent copy (through the protobuf form) that a rewrite can change while ``model`` stays."""
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def with_opset(model: ir.Model, version: int) -> ir.Model | None:
    """The model converted to at least ``version`` of the default opset, or None when onnx's converter fails.

    New integer types (int4 needs opset 21) come with newer opsets; the converter
    rewrites the ops whose definition changed on the way.
    """
    if model.opset_imports.get("", 0) >= version:
        return model
    proto = ir.serde.serialize_model(model)
    try:
        converted = onnx.version_converter.convert_version(proto, version)
        onnx.checker.check_model(converted)
    except Exception:  # the converter raises bare RuntimeErrors from C++
        return None
    converted.ir_version = max(converted.ir_version, 10)  # opset 21 needs IR version 10
    result = ir.serde.deserialize_model(converted)
    # the converter writes new operands (Reduce*'s axes, Split's sizes) as unnamed Constant nodes: initializers
    # and named nodes, as the prepared graph has them
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(result)
    common_passes.NameFixPass()(result)
    return result
