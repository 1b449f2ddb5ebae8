"""One model in which every quantized node can be switched between its quantized and float form.

Measuring each node's share of the error the obvious way builds and runs two models per
node (only it quantized; only it float). Instead, the quantized model is rewritten once:
every node that reads an input through a DequantizeLinear (an activation after its
QuantizeLinear/DequantizeLinear pair, an integer weight, an int32 bias) becomes

    If(switch_<node>) then: the node on its dequantized inputs
                      else: the node on its float inputs

where ``switch_<node>`` is a boolean graph input, the float input of an activation is the
tensor before its QuantizeLinear, and the float weight is the float model's constant. One
ONNX Runtime session then answers every question by its feeds: all switches on computes
the quantized model (as fake quantization in float), all off the float model, one on the
node quantized alone, all but one the node left float alone. Only the chosen branch runs,
and weights stay constants (dequantized once here), so a run costs about what the float
model costs plus the Q/DQ pairs; a ``Where`` between the two values cost six times the
float model on EfficientNet-Lite0, most of it in ``Where`` itself.

A node is "quantized" here when it reads quantized inputs: the rounding of an activation
counts at each node that reads it, as integer kernels see it (QLinearConv reads int8), and
a node left float reads the tensor before the rounding, as lowbit's ``skip_quant_node``
makes it do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..graph.passes import unique_name
from ..graph.query import constant_array, is_float32
from ..quantizers.qdq import add_initializer
from ..recovery.layers import dequantized_weight

SWITCH_PREFIX = "lowbit_switch_"


@dataclass
class SwitchedNode:
    """A quantized node of the model and the graph input that switches it."""

    name: str
    op_type: str
    switch: str  # the boolean graph input
    activations: list[str] = field(default_factory=list)  # float tensors it reads through a Q/DQ pair
    weights: list[str] = field(default_factory=list)  # constants it reads through a DequantizeLinear


@dataclass
class SwitchedModel:
    model: ir.Model
    nodes: list[SwitchedNode]

    def feeds(self, quantized: set[str] | frozenset[str]) -> dict[str, np.ndarray]:
        """The switch feeds that quantize exactly the named nodes."""
        return {n.switch: np.array(n.name in quantized) for n in self.nodes}


def switched_model(quantized: ir.Model, float_model: ir.Model) -> SwitchedModel:
    """Rewrite ``quantized`` (a typed QDQ model, changed in place) into its switched form.

    ``float_model`` gives the float constants, matched by node name and input position
    (lowbit keeps the names of the float model it prepared). A constant input whose float
    counterpart cannot be found reads its dequantized value in both forms.
    """
    float_nodes = {node.name: node for node in float_model.graph}
    graph = quantized.graph
    nodes = []
    for node in list(graph):
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or not any(is_float32(v) for v in node.outputs):
            continue  # the pairs themselves, and nodes that only read a shape
        entry = SwitchedNode(node.name, node.op_type, unique_name(graph, SWITCH_PREFIX + node.name))
        inputs = _both_inputs(graph, node, float_nodes.get(node.name), entry)
        if inputs is None:
            continue
        switch = ir.Value(name=entry.switch, type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
        graph.inputs.append(switch)
        _replace_with_if(graph, node, switch, *inputs)
        nodes.append(entry)
    ir.passes.common.RemoveUnusedNodesPass()(quantized)  # the weights' DequantizeLinear nodes, now constants
    return SwitchedModel(quantized, nodes)


def _both_inputs(graph: ir.Graph, node: ir.Node, float_node: ir.Node | None,
                 entry: SwitchedNode) -> tuple[list[ir.Value | None], list[ir.Value | None]] | None:
    """The node's inputs in its quantized and its float form (noted in ``entry``); None when none differs."""
    quantized, original = list(node.inputs), list(node.inputs)
    for index, value in enumerate(node.inputs):
        dq = value.producer() if value is not None else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        source = dq.inputs[0].producer()
        if source is not None and source.op_type == "QuantizeLinear":
            original[index] = source.inputs[0]
            entry.activations.append(source.inputs[0].name)
            continue
        if dq.inputs[0].const_value is None:
            continue  # an integer graph input: nothing float to switch to
        entry.weights.append(value.name)
        quantized[index] = add_initializer(graph, f"{value.name}_float", dequantized_weight(dq).astype(np.float32))
        if float_node is not None and index >= len(float_node.inputs):
            original[index] = None  # a bias that bias correction added: the float node has none
            continue
        float_constant = _float_constant(float_node, index, dq.inputs[0])
        original[index] = (quantized[index] if float_constant is None
                           else add_initializer(graph, f"{value.name}_original", float_constant))
    if not entry.activations and not entry.weights:
        return None
    return quantized, original


def _float_constant(float_node: ir.Node | None, index: int, integers: ir.Value) -> np.ndarray | None:
    """The float model's constant at this input, if it has the shape of the integers read in its place."""
    if float_node is None:
        return None
    array = constant_array(float_node.inputs[index])
    if array is None or array.dtype != np.float32 or tuple(integers.const_value.shape) != array.shape:
        return None
    return array


def _replace_with_if(graph: ir.Graph, node: ir.Node, switch: ir.Value, quantized: list, original: list) -> None:
    """Put an If in the node's place whose branches are the node on each set of inputs; outputs keep their names."""
    branches = {}
    for branch, inputs in (("then_branch", quantized), ("else_branch", original)):
        copy = ir.Node(node.domain, node.op_type, inputs, list(node.attributes.values()), overload=node.overload,
                       num_outputs=len(node.outputs), version=node.version, name=f"{node.name}_{branch}")
        for mine, theirs in zip(copy.outputs, node.outputs):
            mine.name = f"{theirs.name}_{branch}" if theirs is not None else ""
            if theirs is not None:
                mine.type, mine.shape = theirs.type, theirs.shape
        branches[branch] = ir.Graph([], copy.outputs, nodes=[copy], name=f"{node.name}_{branch}")
    choice = ir.node("If", [switch], {k: ir.AttrGraph(k, g) for k, g in branches.items()},
                     num_outputs=len(node.outputs), name=unique_name(graph, f"{node.name}_switch"))
    graph.insert_before(node, choice)
    for old, new in zip(node.outputs, choice.outputs):
        new.type, new.shape = old.type, old.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        name = old.name
        old.name = None
        new.name = name
    graph.remove(node, safe=True)
