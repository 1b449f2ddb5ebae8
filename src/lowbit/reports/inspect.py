"""``lowbit inspect MODEL``: how a quantized ONNX model is quantized, read from the file alone.

It reads what any tool writes in standard ONNX (QuantizeLinear / DequantizeLinear pairs,
integer initializers read through DequantizeLinear, MatMulInteger with
DynamicQuantizeLinear) and ONNX Runtime's MatMulNBits, so it also explains models that
other tools quantized. Per quantized tensor: the node that reads it, the kind (weight,
activation, dynamic activation), the integer type, the bits really used, the scheme, and
the scale's shape. Bits are read from the stored integers: a 5-bit weight kept in int8
shows 5 bits.

Size: the file (with its external data) against the same model with every integer
weight stored as float32 again (its scales and zero points dropped), an estimate of the
float model's size that needs no float model at hand.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from ..errors import LowbitError
from ..graph.loading import load_model
from ..inference import is_weight_only
from ..quantizers.levels import unpack_model


@dataclass(frozen=True)
class QuantizedTensor:
    tensor: str
    readers: tuple[str, ...]  # "name (OpType)" of the nodes that read the dequantized value
    kind: str  # weight, activation, dynamic activation
    dtype: str  # int4, int8, uint8, int16, int32 ...
    bits: int | None  # levels really used (weights); None for activations (known at run time)
    scheme: str  # symmetric / asymmetric, and granularity
    scale_shape: tuple[int, ...]
    elements: int


@dataclass
class Inspection:
    path: Path
    file_bytes: int
    float_bytes: int  # estimate: integer weights back to float32, their scales and zero points dropped
    tensors: list[QuantizedTensor]
    weight_only: bool = False  # integers over constants only: lowbit.inference_session runs it at float speed

    @property
    def ratio(self) -> float:
        return self.file_bytes / self.float_bytes if self.float_bytes else float("nan")


def inspect_model(path: str | Path) -> Inspection:
    path = Path(path)
    model, file_bytes = load_model(path)  # checks the file and measures it with its external data
    proto = ir.serde.serialize_model(model) if unpack_model(model) else onnx.load(str(path))  # packed levels
    graph = proto.graph
    constants = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def who(name: str) -> tuple[str, ...]:
        return tuple(f"{n.name} ({n.op_type})" for n in readers.get(name, []))

    found: list[QuantizedTensor] = []
    dropped = 0  # bytes of integer weights and their parameters, replaced by float32 in the estimate
    added = 0
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in constants:
            q = constants[node.input[0]]
            values = numpy_helper.to_array(q)
            scale = numpy_helper.to_array(constants[node.input[1]]) if node.input[1] in constants else None
            zero = (numpy_helper.to_array(constants[node.input[2]])
                    if len(node.input) > 2 and node.input[2] in constants else None)
            consumers = who(node.output[0])
            kind = "bias" if q.data_type == onnx.TensorProto.INT32 else "weight"
            found.append(QuantizedTensor(q.name, consumers, kind, _type_name(q.data_type), _bits_used(values, zero),
                                         _scheme(node, values, scale, zero), tuple(scale.shape) if scale is not None
                                         else (), int(values.size)))
            dropped += sum(_nbytes(constants[name]) for name in node.input if name in constants)
            added += 4 * int(values.size)
        elif node.op_type == "QuantizeLinear" and node.input[0] not in constants:
            scale = numpy_helper.to_array(constants[node.input[1]]) if node.input[1] in constants else None
            dtype = _quantized_output_type(node, constants)
            consumers = tuple(c for dq in readers.get(node.output[0], []) for c in who(dq.output[0]))
            found.append(QuantizedTensor(node.input[0], consumers, "activation", dtype, None,
                                         "per tensor, calibrated" if scale is not None and scale.size == 1
                                         else "per channel, calibrated", tuple(scale.shape) if scale is not None
                                         else (), 0))
        elif node.op_type == "DynamicQuantizeLinear":
            found.append(QuantizedTensor(node.input[0], who(node.output[0]), "dynamic activation", "uint8", None,
                                         "asymmetric per tensor, at run time", (), 0))
        elif node.op_type == "MatMulNBits":
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            k, n = attributes["K"], attributes["N"]
            scale = constants.get(node.input[2])
            found.append(QuantizedTensor(node.input[1], (f"{node.name} (MatMulNBits)",), "weight",
                                         f"uint{attributes.get('bits', 4)} packed", attributes.get("bits", 4),
                                         f"blocks of {attributes['block_size']} along K",
                                         tuple(scale.dims) if scale is not None else (), k * n))
            dropped += sum(_nbytes(constants[name]) for name in node.input[1:] if name in constants)
            added += 4 * k * n
    return Inspection(path, file_bytes, file_bytes - dropped + added, found, is_weight_only(proto))


def _nbytes(tensor: onnx.TensorProto) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    return numpy_helper.to_array(tensor).nbytes


def _type_name(data_type: int) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(data_type).name if data_type not in (
        onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else ("int4" if data_type == onnx.TensorProto.INT4 else "uint4")


def _quantized_output_type(node: onnx.NodeProto, constants: dict) -> str:
    if len(node.input) > 2 and node.input[2] in constants:
        return _type_name(constants[node.input[2]].data_type)
    return "uint8"


def _bits_used(values: np.ndarray, zero: np.ndarray | None) -> int | None:
    """Bits needed for the levels the integers really take.

    Symmetric (no zero point, or zero): the grid is -m..m around 0 (0..m unsigned);
    asymmetric: the span from the smallest to the largest integer; {-1, +1} is 1 bit.
    """
    if values.size == 0:
        return None
    q = values.astype(np.int64)
    if np.isin(q, (-1, 1)).all():
        return 1
    if zero is None or not np.asarray(zero).astype(np.int64).any():
        largest = int(np.abs(q).max())
        span = 2 * largest + 1 if q.min() < 0 else largest + 1
    else:
        span = int(q.max() - q.min()) + 1
    return max(1, math.ceil(math.log2(span)))


def _scheme(node: onnx.NodeProto, values: np.ndarray, scale: np.ndarray | None, zero: np.ndarray | None) -> str:
    symmetric = zero is None or not np.asarray(zero).astype(np.int64).any() or (
        values.dtype.kind == "u" and np.all(np.asarray(zero).astype(np.int64) == 2 ** (8 * values.dtype.itemsize - 1)))
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if scale is None or scale.size == 1:
        granularity = "per tensor"
    elif attributes.get("block_size"):
        granularity = f"blocks of {attributes['block_size']} along axis {attributes.get('axis', 1)}"
    else:
        granularity = f"per channel (axis {attributes.get('axis', 1)})"
    return f"{'symmetric' if symmetric else 'asymmetric'}, {granularity}"


def format_inspection(report: Inspection) -> str:
    if not report.tensors:
        raise LowbitError(f"{report.path}: nothing in this model is quantized (no QuantizeLinear, "
                          "DequantizeLinear, DynamicQuantizeLinear or MatMulNBits)")
    lines = [(f"{report.path}: {report.file_bytes / 1e6:.2f} MB; as float32 about {report.float_bytes / 1e6:.2f} MB "
              f"({report.ratio:.3f}x)")]
    weights = [t for t in report.tensors if t.kind == "weight"]
    if weights:
        elements = sum(t.elements for t in weights)
        bits = Counter()
        for t in weights:
            bits[(t.bits, t.dtype)] += t.elements
        average = sum(t.bits * t.elements for t in weights if t.bits) / max(1, elements)
        lines.append(f"weights: {len(weights)} tensors, average {average:.2f} bits; "
                     + ", ".join(f"{b} bits in {d}: {100 * n / elements:.1f}%" for (b, d), n in sorted(bits.items())))
    kinds = Counter(t.kind for t in report.tensors)
    lines.append("quantized tensors: " + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()))
    if report.weight_only:
        lines.append("weight-only: run it with lowbit.inference_session(path) (session.disable_quant_qdq=1) to "
                     "dequantize the weights once at load and run at float speed")
    header = ("node", "kind", "type", "bits", "scheme", "scale shape", "tensor")
    rows = [(", ".join(t.readers) or "-", t.kind, t.dtype, str(t.bits) if t.bits else "-", t.scheme,
             "x".join(map(str, t.scale_shape)) or "scalar", t.tensor) for t in report.tensors]
    widths = [min(60, max(len(r[i]) for r in [header, *rows])) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell[:60].ljust(width) for cell, width in zip(row, widths)).rstrip())
    return "\n".join(lines)
