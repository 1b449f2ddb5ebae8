"""Dynamic quantization (``quant_type=DYNAMIC_QUANT``): int8 weights offline, activations at run time.

No calibration data is needed: each activation's scale is computed by
``DynamicQuantizeLinear`` on every run. Rules:

* ``MatMul`` and ``Gemm`` whose weight is a float constant multiply int8 weights
  (symmetric, per output column; per tensor with ``per_channel=false``) with activations
  quantized on every run, in one of two forms, both built from standard operators:

  - per token: each row of the activation (each token) gets its own symmetric scale
    ``max|x_row| / 127``. The row is stored as uint8 around 128 so that
    ``MatMulInteger`` runs ONNX Runtime's fast U8S8 kernel, then
    ``Cast -> Mul(row scale x W_scale)``. One outlier token no longer coarsens the
    scale of all the others;
  - per tensor: ``DynamicQuantizeLinear(x) -> MatMulInteger -> Cast -> Mul``, one
    asymmetric uint8 scale for the whole tensor. This is ONNX Runtime's own
    quantize_dynamic form, which it fuses into DynamicQuantizeMatMul.

  ``dynamic_quant_granularity`` picks the form: ``TOKEN`` everywhere, ``TENSOR``
  everywhere, or ``AUTO`` (the default, :func:`token_scales`): per token for the
  feed-forward MatMuls, per tensor for the others. MatMuls that read the same activation
  (Q, K and V) share its run-time quantization;
* ``MatMul`` of two activations (attention scores) stays float unless
  ``dynamic_quant_activation_matmul=true``: then both inputs are quantized at run time;
* ``Gather`` from a float constant table (word embeddings) keeps the table as int8 and
  dequantizes only the gathered rows, which is most of a text encoder's file size;
* ``Conv`` stays float: ``ConvInteger`` has no kernel in many ONNX Runtime builds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..calibration.observers import MinMaxObserver
from ..graph.passes import unique_name
from ..graph.query import STANDARD_DOMAINS, attribute, constant_array, is_activation, is_float32
from .constants import add_initializer, dequantize_node
from .plan import SKIPPED, Decisions, NodeDecision
from .qparams import INT8, QuantScheme, compute_qparams
from .saturation import fit_weight, widen_for_pairs
from .selection import WeightSelection

DYNAMIC_OPS = ("MatMul", "Gemm", "Gather")


@dataclass(frozen=True)
class DynamicOptions(WeightSelection):
    granularity: str = "AUTO"  # activation scales per row (TOKEN), per tensor (TENSOR), or AUTO
    activation_matmul: bool = False
    saturation_safe: bool = True  # int8 weight pairs within 128 (:mod:`~lowbit.quantizers.saturation`)


def token_scales(weight_shape: tuple[int, int], granularity: str) -> bool:
    """Whether a MatMul with this [K, N] weight quantizes its activation per token.

    AUTO: the MatMuls that widen or narrow the hidden size by 2x or more (a transformer's
    feed-forward pair, around its GELU/ReLU), per tensor the others (attention projections).
    Measured on MiniLM-L6 (bench/RESULTS.md): per-token scales on the feed-forward pair alone
    keep all of the per-token mode's accuracy (mean cosine 0.9967 against 0.9966; per tensor
    everywhere: 0.9920), while the attention projections, per token, only cost time.
    """
    if granularity != "AUTO":
        return granularity == "TOKEN"
    k, n = weight_shape
    return max(k, n) >= 2 * min(k, n)


def plan_dynamic(model: ir.Model, options: DynamicOptions) -> Decisions:
    plan = Decisions()
    for node in model.graph:
        if not any(is_activation(v) for v in node.outputs):
            continue
        reason = _why_float(node, options)
        plan.decisions[node.name] = NodeDecision(node, reason is None, reason or "")
    return plan


def _why_float(node: ir.Node, options: DynamicOptions) -> str | None:
    op = node.op_type
    if node.name in options.skip_nodes:
        return SKIPPED
    if node.domain not in STANDARD_DOMAINS or op not in DYNAMIC_OPS:
        why = " (ConvInteger lacks kernels in ONNX Runtime)" if op == "Conv" else ""
        return f"{op} has no dynamic int8 rule{why}"
    weight_index = 0 if op == "Gather" else 1
    weight = constant_array(node.inputs[weight_index])
    if op == "Gather":
        if weight is None or weight.dtype != np.float32 or weight.ndim != 2:
            return "Gather from a tensor that is not a 2-D float constant table"
    elif weight is None:
        if op == "Gemm" or not options.activation_matmul:
            return "MatMul of two activations (set dynamic_quant_activation_matmul=true to quantize it)"
        if not (is_float32(node.inputs[0]) and is_float32(node.inputs[1])):
            return "input is not float32"
        return None
    elif weight.dtype != np.float32 or weight.ndim != 2:
        return "weight is not a 2-D float32 constant"
    elif op == "Gemm" and attribute(node, "transA", 0):
        return "Gemm with transA"
    elif not is_float32(node.inputs[0]):
        return "input is not float32"
    if op == "Gather":
        return options.too_small(weight.size, None)
    transposed = op == "MatMul" or (op == "Gemm" and not attribute(node, "transB", 0))
    return options.too_small(weight.size, weight.shape[1] if transposed else weight.shape[0])


def apply_dynamic(model: ir.Model, plan: Decisions, options: DynamicOptions) -> None:
    graph = model.graph
    quantized_inputs: dict[tuple[str, bool], tuple] = {}  # one run-time quantization per tensor and form
    for decision in plan.quantized_nodes:
        node = decision.node
        if node.op_type == "Gather":
            _quantize_gather(graph, node)
        else:
            _quantize_matmul(graph, node, options, model.opset_imports.get("", 14), quantized_inputs)
    ir.passes.Sequential(
        ir.passes.common.RemoveUnusedNodesPass(),
        ir.passes.common.TopologicalSortPass(),
    )(model)


def _weight_qparams(weight: np.ndarray, axis: int | None):
    scheme = QuantScheme(INT8, symmetric=True, axis=axis, narrow_range=True)
    observer = MinMaxObserver(axis)
    observer.update(weight)
    return compute_qparams(*observer.range(), scheme)


def _new_node(graph: ir.Graph, op: str, inputs, attributes=None, outputs: int = 1, name: str = "") -> ir.Node:
    node = ir.node(op, inputs, attributes or {}, num_outputs=outputs, name=unique_name(graph, f"{name}_{op}"))
    for i, out in enumerate(node.outputs):
        out.name = unique_name(graph, f"{name}_{op}_out{i}")
    return node


def _dynamic_input(graph: ir.Graph, value: ir.Value, name: str, new_nodes: list) -> tuple:
    quantize = _new_node(graph, "DynamicQuantizeLinear", [value], outputs=3, name=name)
    new_nodes.append(quantize)
    return tuple(quantize.outputs)


def _per_token_input(graph: ir.Graph, x: ir.Value, k: int, name: str, new: list, opset: int) -> tuple:
    """x -> (uint8 rows [M, K] around 128, row scales [M, 1], zero point 128): symmetric per row.

    One QuantizeLinear along axis 0 rounds, shifts and saturates every row with its own scale.
    (Quantizing ``x`` as it is, with opset 21's ``block_size``, would save the reshapes, but
    onnxruntime 1.32 then fuses MatMulInteger + Cast + Mul with the ``[B, T, 1]`` scales into
    MatMulIntegerToFloat and computes wrong results: MiniLM's cosine fell to 0.65.)
    """
    def op(op_type, inputs, attributes=None):
        node = _new_node(graph, op_type, inputs, attributes, name=name)
        new.append(node)
        return node.outputs[0]

    def const(tag, array):
        return add_initializer(graph, f"{name}_{tag}", np.asarray(array))

    rows = op("Reshape", [x, const("rows_shape", np.array([-1, k], np.int64))])
    if opset >= 18:
        absmax = op("ReduceMax", [op("Abs", [rows]), const("axes", np.array([1], np.int64))], {"keepdims": 0})
    else:
        absmax = op("ReduceMax", [op("Abs", [rows])], {"axes": [1], "keepdims": 0})
    scale = op("Div", [op("Max", [absmax, const("tiny", np.float32(1e-12))]), const("q127", np.float32(127))])
    zero_point = const("zero_point", np.uint8(128))
    row_zero_points = op("Expand", [zero_point, op("Shape", [scale])])
    q = op("QuantizeLinear", [rows, scale, row_zero_points], {"axis": 0})
    return q, op("Unsqueeze", [scale, const("column", np.array([1], np.int64))]), zero_point


def _quantize_matmul(graph: ir.Graph, node: ir.Node, options: DynamicOptions, opset: int,
                     quantized_inputs: dict[tuple[str, bool], tuple]) -> None:
    """Replace the node by its integer form; ``quantized_inputs`` shares the run-time quantization
    of one activation between the MatMuls that read it (a transformer's Q, K and V projections)."""
    name = node.name
    new: list[ir.Node] = []
    weight = constant_array(node.inputs[1])
    if weight is not None and node.op_type == "Gemm" and attribute(node, "transB", 0):
        weight = weight.T
    per_token = weight is not None and token_scales(weight.shape, options.granularity)
    key = (node.inputs[0].name, per_token)
    if key not in quantized_inputs:
        quantized_inputs[key] = (
            _per_token_input(graph, node.inputs[0], weight.shape[0], f"{name}_a", new, opset) if per_token
            else _dynamic_input(graph, node.inputs[0], f"{name}_a", new))
    x_q, x_scale, x_zero = quantized_inputs[key]
    if weight is None:  # activation x activation: quantize both at run time
        w_q, w_scale, w_zero = _dynamic_input(graph, node.inputs[1], f"{name}_b", new)
    else:
        qparams = _weight_qparams(np.ascontiguousarray(weight), 1 if options.per_channel else None)
        if options.saturation_safe:  # MatMulInteger reads the [K, N] integers as a MatMul does
            as_matmul = ir.node("MatMul", [])
            qparams = widen_for_pairs(as_matmul, weight, qparams)
            integers = fit_weight(as_matmul, qparams.quantize(weight))[0]
        else:
            integers = qparams.quantize(weight)
        w_q = add_initializer(graph, f"{name}_weight_quantized", integers)
        w_scale = add_initializer(graph, f"{name}_weight_scale", qparams.scale)
        w_zero = add_initializer(graph, f"{name}_weight_zero_point", qparams.zero_point)
    integer = _new_node(graph, "MatMulInteger", [x_q, w_q, x_zero, w_zero], name=name)
    as_float = _new_node(graph, "Cast", [integer.outputs[0]], {"to": ir.DataType.FLOAT}, name=name)
    scale_inputs = [x_scale, w_scale]
    scales = _new_node(graph, "Mul", scale_inputs, name=f"{name}_scales")
    new += [integer, as_float, scales]
    if node.op_type == "Gemm" and attribute(node, "alpha", 1.0) != 1.0:
        alpha = add_initializer(graph, f"{name}_alpha", np.array(attribute(node, "alpha"), np.float32))
        scaled = _new_node(graph, "Mul", [scales.outputs[0], alpha], name=f"{name}_alpha")
        new.append(scaled)
        scales = scaled
    result = _new_node(graph, "Mul", [as_float.outputs[0], scales.outputs[0]], name=name)
    new.append(result)
    out = result.outputs[0]
    if per_token:  # back from rows [M, N] to the input's leading dims
        lead = _leading_dims(graph, node.inputs[0], name, new, opset)
        columns = add_initializer(graph, f"{name}_columns", np.array([weight.shape[1]], np.int64))
        shape = _new_node(graph, "Concat", [lead, columns], {"axis": 0}, name=f"{name}_out")
        restored = _new_node(graph, "Reshape", [out, shape.outputs[0]], name=f"{name}_out")
        new += [shape, restored]
        out = restored.outputs[0]
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = node.inputs[2]
        beta = attribute(node, "beta", 1.0)
        if beta != 1.0:
            factor = add_initializer(graph, f"{name}_beta", np.array(beta, np.float32))
            scaled_bias = _new_node(graph, "Mul", [bias, factor], name=f"{name}_beta")
            new.append(scaled_bias)
            bias = scaled_bias.outputs[0]
        add = _new_node(graph, "Add", [out, bias], name=f"{name}_bias")
        new.append(add)
        out = add.outputs[0]
    _replace(graph, node, new, out)


def _leading_dims(graph: ir.Graph, x: ir.Value, name: str, new: list, opset: int) -> ir.Value:
    """The shape of ``x`` without its last axis: Shape's ``end`` from opset 15, a Slice of it before."""
    if opset >= 15:
        lead = _new_node(graph, "Shape", [x], {"end": -1}, name=f"{name}_lead")
        new.append(lead)
        return lead.outputs[0]
    shape = _new_node(graph, "Shape", [x], name=f"{name}_lead")
    bounds = [add_initializer(graph, f"{name}_lead_{tag}", np.array([value], np.int64))
              for tag, value in (("start", 0), ("end", -1))]
    lead = _new_node(graph, "Slice", [shape.outputs[0], *bounds], name=f"{name}_lead")
    new += [shape, lead]
    return lead.outputs[0]


def _quantize_gather(graph: ir.Graph, node: ir.Node) -> None:
    """Gather rows of an int8 table, then dequantize just those rows (one scale for the table)."""
    table = constant_array(node.inputs[0])
    qparams = _weight_qparams(table, None)
    q = add_initializer(graph, f"{node.name}_table_quantized", qparams.quantize(table))
    scale = add_initializer(graph, f"{node.name}_table_scale", qparams.scale)
    zero = add_initializer(graph, f"{node.name}_table_zero_point", qparams.zero_point)
    gather = _new_node(graph, "Gather", [q, node.inputs[1]], {"axis": attribute(node, "axis", 0)}, name=node.name)
    out = dequantize_node(graph, gather.outputs[0], scale, zero, None, f"{node.name}_dequantized",
                          node.outputs[0].shape)
    _replace(graph, node, [gather, out.producer()], out)


def _replace(graph: ir.Graph, node: ir.Node, new_nodes: list[ir.Node], out: ir.Value) -> None:
    old = node.outputs[0]
    graph.insert_before(node, new_nodes)
    out.type, out.shape = old.type, old.shape
    was_output = old.is_graph_output()
    old.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    if was_output:  # the graph output keeps its name
        name = old.name
        old.name = unique_name(graph, f"{name}_replaced")
        out.name = name
