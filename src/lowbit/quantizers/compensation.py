"""Error compensation (Horizon's ``ec``): a second int8 pass over what the first rounding lost.

For an input ``x`` of a node that is linear in it, ``x ~ x8 + r8``: ``x8`` is x after its
int8 Q/DQ pair and ``r8`` the residual ``x - x8`` quantized again with a scale of its own.
The node is duplicated: the original reads ``x8``, the copy reads ``r8`` (every other input
the same, a Conv's bias left out), and an Add sums their outputs, so that two int8 ops
approximate one with a ~16-bit input:

* a weight (Conv / ConvTranspose input 1, a constant MatMul input): the residual is
  computed offline and stored as int8 per channel, like the weight;
* an activation (MatMul input, Resize / GridSample input 0): ``Sub(x, x8)`` at run time, then
  a Q/DQ pair over plus or minus half a step of x's scale, where the residual of every
  value inside x's range lies (values that x's range clips keep their clipping error).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..graph.passes import unique_name
from ..graph.query import constant_array
from .constants import add_initializer, dequantize_node, weight_qparams
from .qparams import QParams, QuantScheme, compute_qparams


def compensate_errors(graph: ir.Graph, compensated: list[tuple[ir.Node, int]],
                      weights: dict[tuple[int, int], tuple[np.ndarray, QParams]],
                      activation_scheme: QuantScheme) -> None:
    """Add the residual branch of every (node, input index) in ``compensated``, in place.

    ``weights``: the float weight and its parameters per (id(node), index), for constant inputs.
    """
    for node, index in compensated:
        if (id(node), index) in weights:
            residual = _weight_residual(graph, node, index, *weights[(id(node), index)])
        else:
            residual = _activation_residual(graph, node, index, activation_scheme)
        _add_duplicate(graph, node, index, residual)


def _weight_residual(graph: ir.Graph, node: ir.Node, index: int, weight: np.ndarray, qparams: QParams) -> ir.Value:
    residual = weight - qparams.dequantize(qparams.quantize(weight))
    residual_qparams = weight_qparams(residual, qparams.scheme)
    base = f"{node.name}_ec_weight"
    q = add_initializer(graph, f"{base}_quantized", residual_qparams.quantize(residual))
    scale = add_initializer(graph, f"{base}_scale", residual_qparams.scale)
    zero_point = add_initializer(graph, f"{base}_zero_point", residual_qparams.zero_point)
    out = dequantize_node(graph, q, scale, zero_point, qparams.scheme.axis, base, node.inputs[index].shape)
    graph.insert_before(graph.node(0), out.producer())
    return out


def _activation_residual(graph: ir.Graph, node: ir.Node, index: int, scheme: QuantScheme) -> ir.Value:
    rounded = node.inputs[index]
    dq = rounded.producer()
    quantize = dq.inputs[0].producer()
    assert dq.op_type == "DequantizeLinear" and quantize.op_type == "QuantizeLinear", "ec needs a Q/DQ input"
    source = quantize.inputs[0]
    step = float(constant_array(dq.inputs[1]))
    qparams = compute_qparams(-step / 2, step / 2, scheme)
    base = f"{node.name}_ec_input{index}"
    sub = ir.node("Sub", [source, rounded], name=unique_name(graph, f"{base}_Sub"))
    residual = sub.outputs[0]
    residual.name, residual.type, residual.shape = unique_name(graph, f"{base}_residual"), rounded.type, rounded.shape
    scale = add_initializer(graph, f"{base}_scale", qparams.scale)
    zero_point = add_initializer(graph, f"{base}_zero_point", qparams.zero_point)
    q_node = ir.node("QuantizeLinear", [residual, scale, zero_point], name=unique_name(graph, f"{base}_QuantizeLinear"))
    q = q_node.outputs[0]
    q.name, q.shape = unique_name(graph, f"{base}_quantized"), rounded.shape
    q.type = ir.TensorType(scheme.qtype.onnx_type)
    out = dequantize_node(graph, q, scale, zero_point, None, f"{base}_dequantized", rounded.shape)
    graph.insert_before(node, [sub, q_node, out.producer()])
    return out


def _add_duplicate(graph: ir.Graph, node: ir.Node, index: int, residual: ir.Value) -> None:
    """node(..., residual, ...) beside node, and Add of both where node's output was read."""
    inputs = list(node.inputs)
    inputs[index] = residual
    if node.op_type in ("Conv", "ConvTranspose"):
        inputs = inputs[:2]  # the bias is added once, by the original
    duplicate = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
                        name=unique_name(graph, f"{node.name}_ec"))
    original = node.outputs[0]
    part = duplicate.outputs[0]
    part.name, part.type, part.shape = unique_name(graph, f"{original.name}_ec"), original.type, original.shape
    uses = list(original.uses())
    add = ir.node("Add", [original, part], name=unique_name(graph, f"{node.name}_ec_Add"))
    total = add.outputs[0]
    total.type, total.shape = original.type, original.shape
    if original.is_graph_output():
        position = list(graph.outputs).index(original)
        name = original.name
        original.name = unique_name(graph, f"{name}_main")
        total.name = name
        graph.outputs[position] = total
    else:
        total.name = unique_name(graph, f"{original.name}_compensated")
    for use in uses:
        use.node.replace_input_with(use.idx, total)
    graph.insert_after(node, [duplicate, add])
