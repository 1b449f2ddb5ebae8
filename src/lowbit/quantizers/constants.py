"""Integer constants in the graph: their parameters, their initializers, their DequantizeLinear.

Shared by every rewrite (QDQ, weight-only, dynamic, error compensation), so that a constant
is stored the same way whichever mode writes it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..calibration.observers import MinMaxObserver
from ..graph.passes import unique_name
from .qparams import QParams, QuantScheme, compute_qparams


def weight_qparams(array: np.ndarray, scheme: QuantScheme) -> QParams:
    """Parameters of a constant: its own min/max (per channel along ``scheme.axis``), no clipping."""
    observer = MinMaxObserver(scheme.axis)
    observer.update(array)
    return compute_qparams(*observer.range(), scheme)


def add_initializer(graph: ir.Graph, base: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    """Register ``array`` as a new initializer named after ``base`` (made unique).

    ``dtype`` stores it as another ONNX type than its numpy one (int4 values held in int8).
    """
    array = np.asarray(array, order="C")
    dtype = dtype or ir.DataType.from_numpy(array.dtype)
    value = ir.Value(name=unique_name(graph, base), const_value=ir.tensor(array, dtype=dtype))
    value.type = ir.TensorType(dtype)
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def dequantize_node(graph: ir.Graph, q: ir.Value, scale: ir.Value, zero_point: ir.Value | None,
                    axis: int | None, name: str, shape: ir.Shape | None = None) -> ir.Value:
    """A new DequantizeLinear node (not yet inserted in the graph); returns its float output."""
    attributes = {"axis": axis} if axis is not None else {}
    inputs = [q, scale] if zero_point is None else [q, scale, zero_point]
    node = ir.node("DequantizeLinear", inputs, attributes, name=unique_name(graph, f"{name}_DequantizeLinear"))
    out = node.outputs[0]
    out.name = unique_name(graph, name)
    out.type = ir.TensorType(ir.DataType.FLOAT)
    out.shape = shape
    return out
