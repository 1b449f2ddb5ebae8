"""MindSpore's quantization debug reports (``debug_info_save_path``), for lowbit's models.

Three kinds of CSV file, with the seed's column names and meanings:

* ``output_summary.csv``: Round, TensorName, CosineSimilarity: each model output of the
  quantized model against the float model's, per calibration round (one sample a round);
* ``round_<k>.csv``: for every tensor of every quantized node (its inputs and outputs),
  an ``Origin`` row (the float model's tensor) and a ``Dequant`` row (what the quantized
  model computes in its place: the dequantized value the node reads, or the dequantized
  output its consumers read): Min, Q1, Median, Q3, MAX, Mean, Var, Sparsity (share of
  zeros), Clip (share of the float values outside the range the integers can represent,
  by more than half a step) and CosineSimilarity (Dequant against Origin; 1 on Origin
  rows). Full quantization writes one file per round; weight quantization one in all,
  with the weights alone;
* ``quant_param.csv``: per quantized tensor (a row per channel for per-channel tensors):
  ElementsNum, Dims, Scale, ZeroPoint, Bits, and the bias correction applied to the
  channel (CorrectionMean: the output shift taken out of the bias; CorrectionVar: 1, as
  lowbit does not rescale the variance).

Rows are written as rounds go: a round's tensors are summarised and dropped before the
next sample is read, so memory does not grow with the number of rounds. Quartiles are
exact up to 16384 values and read from an even subset of a larger tensor; the other
columns read every value. Each file appears complete or not at all (written beside,
then renamed).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..graph.query import attribute, constant_array, is_float32
from ..recovery.layers import dequantize_source, dequantized_weight

ROUND_COLUMNS = ["NodeName", "NodeType", "TensorName", "InOutFlag", "DataTypeFlag", "TensorTypeFlag", "Min", "Q1",
                 "Median", "Q3", "MAX", "Mean", "Var", "Sparsity", "Clip", "CosineSimilarity"]
SUMMARY_COLUMNS = ["Round", "TensorName", "CosineSimilarity"]
PARAM_COLUMNS = ["NodeName", "NodeType", "TensorName", "ElementsNum", "Dims", "Scale", "ZeroPoint", "Bits",
                 "CorrectionVar", "CorrectionMean"]
QUARTILE_VALUES = 16384  # quartiles from at most this many values, spread evenly over the tensor
_INTEGER_RANGES = {ir.DataType.INT8: (-128, 127), ir.DataType.UINT8: (0, 255), ir.DataType.INT16: (-32768, 32767),
                   ir.DataType.UINT16: (0, 65535), ir.DataType.INT4: (-8, 7), ir.DataType.UINT4: (0, 15),
                   ir.DataType.INT32: (-2**31, 2**31 - 1)}


@dataclass(frozen=True)
class Grid:
    """What a DequantizeLinear can give: (q - zero_point) * scale for q in [qmin, qmax], per ``axis``."""

    scale: np.ndarray
    zero_point: np.ndarray
    qmin: int
    qmax: int
    axis: int | None  # None: per tensor

    @property
    def bits(self) -> int:
        return int(math.log2(self.qmax - self.qmin + 1))

    def bounds(self, ndim: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The lowest and highest value the grid represents (per channel, shaped to broadcast over ``ndim`` axes)."""
        scale, zero = self.scale.astype(np.float64), self.zero_point.astype(np.float64)
        if self.axis is not None and scale.size > 1:
            shape = [1] * ndim
            shape[self.axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return (self.qmin - zero) * scale, (self.qmax - zero) * scale

    def clip_rate(self, values: np.ndarray) -> float:
        """Share of ``values`` beyond the representable range by more than half a step.

        A value exactly half a step out (-1.0 for a uint8 grid over [-0.996, 1.004], whose
        zero point rounded) rounds to the end of the grid like any value inside; the margin
        of a thousandth of a step keeps float rounding from counting it as clipped.
        """
        low, high = self.bounds(values.ndim)
        margin = (0.5 + 1e-3) * (high - low) / (self.qmax - self.qmin)
        return float(np.mean((values < low - margin) | (values > high + margin)))


@dataclass(frozen=True)
class TracedTensor:
    """One tensor of a quantized node, named in the float model and in the quantized model."""

    node: str
    node_type: str
    tensor: str  # its name in the float model
    direction: str  # Input / Output
    dequant: str  # its counterpart in the quantized model (a DequantizeLinear output, or the tensor itself)
    grid: Grid | None  # None: the quantized model keeps it float
    shape: tuple = ()  # as the float model declares it (symbolic dimensions as names)
    weight: np.ndarray | None = None  # a constant: the float value (its dequantized value is ``dequantized``)
    dequantized: np.ndarray | None = None

    @property
    def kind(self) -> str:
        return "Weight" if self.weight is not None else "Activation"


def trace(float_model: ir.Model, quantized: ir.Model, node_names: Iterable[str]) -> list[TracedTensor]:
    """The tensors of each named node present in both models, matched by position."""
    floats = {node.name: node for node in float_model.graph}
    quants = {node.name: node for node in quantized.graph}
    traced = []
    for name in node_names:
        float_node, quant_node = floats.get(name), quants.get(name)
        if float_node is None or quant_node is None:
            continue
        for original, value in zip(float_node.inputs, quant_node.inputs):
            if original is not None and value is not None and is_float32(original):
                traced.append(_input(name, float_node.op_type, original, value))
        for original, value in zip(float_node.outputs, quant_node.outputs):
            if is_float32(original):
                traced.append(_output(name, float_node.op_type, original, value))
    return [t for t in traced if t is not None]


def _input(node: str, op: str, original: ir.Value, value: ir.Value) -> TracedTensor | None:
    dq = dequantize_source(value)
    weight = constant_array(original)
    if weight is not None:
        if dq is None or constant_array(dq.inputs[0]) is None or weight.dtype != np.float32:
            return None  # a constant the quantized model keeps as it was (shapes, axes)
        return TracedTensor(node, op, original.name, "Input", value.name, grid_of(dq), weight.shape, weight,
                            dequantized_weight(dq).astype(np.float32))
    return TracedTensor(node, op, original.name, "Input", value.name, grid_of(dq) if dq is not None else None,
                        _shape(original))


def _output(node: str, op: str, original: ir.Value, value: ir.Value) -> TracedTensor:
    """The output as consumers of the quantized model read it: after its QuantizeLinear/DequantizeLinear pair."""
    for use in value.uses():
        if use.node.op_type == "QuantizeLinear":
            for next_use in use.node.outputs[0].uses():
                dq = next_use.node
                if dq.op_type == "DequantizeLinear":
                    return TracedTensor(node, op, original.name, "Output", dq.outputs[0].name, grid_of(dq),
                                        _shape(original))
    return TracedTensor(node, op, original.name, "Output", value.name, None, _shape(original))


def _shape(value: ir.Value) -> tuple:
    return () if value.shape is None else tuple(d if isinstance(d, int) else str(d) for d in value.shape)


def grid_of(dq: ir.Node) -> Grid | None:
    """The grid of a DequantizeLinear whose scale (and zero point) are constants; None otherwise."""
    scale = constant_array(dq.inputs[1])
    if scale is None:
        return None
    zero_value = dq.inputs[2] if len(dq.inputs) > 2 else None
    zero = constant_array(zero_value)
    # a model read from a file may not type its intermediate tensors: the zero point's type is the integers'
    dtype = dq.inputs[0].dtype or (zero_value.dtype if zero_value is not None else ir.DataType.UINT8)
    if dtype not in _INTEGER_RANGES:
        return None
    qmin, qmax = _INTEGER_RANGES[dtype]
    zero = np.zeros_like(scale, dtype=np.int64) if zero is None else zero.astype(np.int64)
    return Grid(scale, zero, qmin, qmax, attribute(dq, "axis", 1) if scale.size > 1 else None)


# -- statistics


def summary(values: np.ndarray, reference: np.ndarray | None, clip: float = 0.0) -> list[float]:
    """Min, Q1, Median, Q3, MAX, Mean, Var, Sparsity, Clip, CosineSimilarity of ``values``.

    ``reference``: the Origin values, for the cosine (None: this is the Origin row);
    ``clip``: the tensor's clip rate (both of its rows show it).
    """
    flat = values.reshape(-1)
    if flat.size == 0:
        return [math.nan] * 10
    subset = flat if flat.size <= QUARTILE_VALUES else flat[::-(-flat.size // QUARTILE_VALUES)]
    q1, median, q3 = np.quantile(subset, [0.25, 0.5, 0.75])
    cosine = 1.0 if reference is None else _cosine(flat, reference.reshape(-1))
    return [float(flat.min()), float(q1), float(median), float(q3), float(flat.max()),
            float(flat.mean(dtype=np.float64)), float(flat.var(dtype=np.float64)),
            float(np.count_nonzero(flat == 0) / flat.size), clip, cosine]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if norms == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.dot(a, b) / norms)


def tensor_rows(traced: TracedTensor, origin: np.ndarray, dequant: np.ndarray) -> list[list]:
    """The Origin and Dequant rows of one tensor."""
    head = [traced.node, traced.node_type, traced.tensor, traced.direction]
    clip = traced.grid.clip_rate(origin) if traced.grid is not None else 0.0
    return [head + ["Origin", traced.kind] + summary(origin, None, clip),
            head + ["Dequant", traced.kind] + summary(dequant, origin, clip)]


def parameter_rows(traced: list[TracedTensor], bits: dict[str, int],
                   corrections: dict[str, np.ndarray]) -> Iterator[list]:
    """quant_param.csv's rows: per quantized tensor, a row per channel (one for a per-tensor grid)."""
    for t in traced:
        if t.grid is None:
            continue
        shape = list(t.shape)
        elements = int(np.prod(shape)) if shape and all(isinstance(d, int) for d in shape) else ""
        scales, zeros = t.grid.scale.reshape(-1), t.grid.zero_point.reshape(-1)
        shift = corrections.get(t.node) if t.kind == "Weight" and t.direction == "Input" else None
        for channel in range(scales.size):
            mean = float(shift[channel]) if shift is not None and shift.size == scales.size else 0.0
            yield [t.node, t.node_type, t.tensor, elements, str(shape) if shape else "", float(scales[channel]),
                   int(zeros[channel] if zeros.size > 1 else zeros[0]), bits.get(t.tensor, t.grid.bits), 1.0, mean]


# -- files


@contextmanager
def csv_file(path: Path, columns: list[str]) -> Iterator[csv.writer]:
    """A CSV writer whose file appears at ``path`` complete, once the block ends without error."""
    staged = path.with_name(f".{path.name}.partial")
    try:
        with staged.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            yield writer
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
