"""Small read-only questions about nodes and values of an onnx_ir graph."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

STANDARD_DOMAINS = ("", "ai.onnx")


def attribute(node: ir.Node, name: str, default: Any = None) -> Any:
    """The attribute's Python value, or default when the node does not set it."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's contents when it is a constant (initializer), else None."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def constant_scalar(value: ir.Value | None) -> float | None:
    """The number a constant holding one value holds (any shape of size 1), else None."""
    array = constant_array(value)
    return float(array.reshape(())) if array is not None and array.size == 1 else None


def is_float32(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


def is_activation(value: ir.Value | None) -> bool:
    """A float32 tensor computed at run time (a graph input or a node output, not a constant)."""
    return is_float32(value) and constant_array(value) is None
