"""Nodes that compute in float16: Cast in, float16 constants, Cast out.

Which inputs and outputs change type comes from the op's schema: those that share the
type variable of output 0 (Conv's ``T``, Resize's ``T1`` but not its float ``scales``), so
ops that mix float data with float parameters stay valid. A chain of float16 nodes passes
float16 values from one to the next: the Cast back to float32 is read only by readers that
compute in float32 (exact either way, and no wasted work).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from ..graph.passes import unique_name
from ..graph.query import constant_array
from .constants import add_initializer

FLOAT16_MAX = float(np.finfo(np.float16).max)


def compute_in_float16(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    """Make each node in ``nodes`` (in graph order) read and write float16, in place."""
    if not nodes:
        return
    opset = graph.opset_imports.get("", 1)
    halves: dict[str, ir.Value] = {}  # float32 value name -> its float16 form
    for node in nodes:
        typed = _typed_positions(node, opset)
        for i, value in enumerate(node.inputs):
            if i in typed[0] and value is not None and value.dtype == ir.DataType.FLOAT:
                node.replace_input_with(i, _as_float16(graph, value, halves))
        for i, value in enumerate(node.outputs):
            if i in typed[1] and value.dtype == ir.DataType.FLOAT:
                name = value.name
                _cast_back(graph, node, value)
                halves[name] = value  # later float16 nodes read the float16 output directly


def has_float16_form(node: ir.Node, opset: int) -> bool:
    """Whether casting the node's inputs makes it compute in float16: its output takes its type from
    an input (not from an attribute, as Cast's ``to`` or ConstantOfShape's ``value`` do)."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return False
    type_var = schema.outputs[0].type_str
    return not type_var.startswith("tensor(") and any(formal.type_str == type_var for formal in schema.inputs)


def _typed_positions(node: ir.Node, opset: int) -> tuple[set[int], set[int]]:
    """(input indices, output indices) typed like output 0 in the op's schema."""
    schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    type_var = schema.outputs[0].type_str

    def positions(formals, count: int) -> set[int]:
        out = set()
        for i in range(count):
            formal = formals[min(i, len(formals) - 1)]  # a variadic last formal covers the rest
            if formal.type_str == type_var:
                out.add(i)
        return out
    return positions(schema.inputs, len(node.inputs)), positions(schema.outputs, len(node.outputs))


def _as_float16(graph: ir.Graph, value: ir.Value, halves: dict[str, ir.Value]) -> ir.Value:
    if value.name in halves:
        return halves[value.name]
    array = constant_array(value)
    if array is not None:  # beyond float16's range (an attention mask's -1e9) it saturates, not to inf
        saturated = np.clip(array, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)
        half = add_initializer(graph, f"{value.name}_float16", saturated)
    else:
        cast = ir.node("Cast", [value], {"to": ir.DataType.FLOAT16}, name=unique_name(graph, f"{value.name}_Cast"))
        half = cast.outputs[0]
        half.name, half.shape = unique_name(graph, f"{value.name}_float16"), value.shape
        half.type = ir.TensorType(ir.DataType.FLOAT16)
        producer = value.producer()
        if producer is None:
            graph.insert_before(graph.node(0), cast)
        else:
            graph.insert_after(producer, cast)
    halves[value.name] = half
    return half


def _cast_back(graph: ir.Graph, node: ir.Node, value: ir.Value) -> None:
    """Turn ``value`` into the node's float16 output; a Cast gives its readers the float32 value they had."""
    uses = list(value.uses())
    name = value.name
    value.name = unique_name(graph, f"{name}_float16")
    value.type = ir.TensorType(ir.DataType.FLOAT16)
    cast = ir.node("Cast", [value], {"to": ir.DataType.FLOAT}, name=unique_name(graph, f"{name}_Cast"))
    restored = cast.outputs[0]
    restored.name, restored.type, restored.shape = name, ir.TensorType(ir.DataType.FLOAT), value.shape
    for use in uses:
        use.node.replace_input_with(use.idx, restored)
    if value.is_graph_output():
        graph.outputs[list(graph.outputs).index(value)] = restored
    graph.insert_after(node, cast)
