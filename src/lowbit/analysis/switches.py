"""One model in which every quantized node can be switched between its float, int8 and int16 forms.

Measuring each node's share of the error the obvious way builds and runs two models per
node (only it quantized; only it float). Instead, the quantized model is rewritten once:
every node that reads an input through a DequantizeLinear (an activation after its
QuantizeLinear/DequantizeLinear pair, an integer weight, an int32 bias) becomes

    If(switch_<node>) then: If(wide_<node>) then: the node on 16-bit inputs
                                            else: the node on its dequantized inputs
                      else: the node on its float inputs

where the switches are boolean graph inputs, the float input of an activation is the
tensor before its QuantizeLinear, the float weight is the float model's constant, and the
16-bit form rounds the float values to 65536 levels over their own range (the weights'
per channel, the activations' as seen on the samples): an estimate of what int16 gives. One ONNX Runtime session then
answers every question by its feeds: all switches on computes the quantized model (as fake
quantization in float), all off the float model, one on the node quantized alone, all but
one the node left float alone. Only the chosen branch runs, and weights stay constants
(dequantized once here), so a run costs about what the float model costs plus the Q/DQ
pairs; a ``Where`` between the two values cost six times the float model on
EfficientNet-Lite0, most of it in ``Where`` itself.

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
from ..quantizers.constants import add_initializer
from ..recovery.layers import dequantized_weight
from ..reports.debug import grid_of

SWITCH_PREFIX = "lowbit_switch_"
OUTPUT_ROUNDING = "(output rounding)"  # the op type shown for a quantized graph output's rounding
WIDE_PREFIX = "lowbit_int16_"
WIDE_LEVELS = 65536


@dataclass
class SwitchedNode:
    """A quantized node of the model and the graph inputs that switch it."""

    name: str
    op_type: str
    switch: str  # boolean graph input: quantized (True) or float
    wide: str  # boolean graph input: when quantized, 16-bit (True) or as the model has it
    activations: list[str] = field(default_factory=list)  # float tensors it reads through a Q/DQ pair
    weights: list[str] = field(default_factory=list)  # constants it reads through a DequantizeLinear
    # of those, the ones without a float counterpart in the float model: dequantized in every form, so their
    # rounding error is in the "float" figures too
    unmatched: list[str] = field(default_factory=list)


@dataclass
class SwitchedModel:
    model: ir.Model
    nodes: list[SwitchedNode]

    def feeds(self, quantized: set[str] | frozenset[str], wide: set[str] | frozenset[str] = frozenset()
              ) -> dict[str, np.ndarray]:
        """The switch feeds that quantize exactly the named nodes, ``wide`` ones of them to 16 bits."""
        feeds = {}
        for n in self.nodes:
            feeds[n.switch] = np.array(n.name in quantized)
            feeds[n.wide] = np.array(n.name in wide)
        return feeds


@dataclass
class _Forms:
    """A node's inputs in each form; the wide form's activations are rounded inside its branch."""

    quantized: list[ir.Value | None]
    original: list[ir.Value | None]
    wide: list[ir.Value | None]
    wide_nodes: list[ir.Node] = field(default_factory=list)


def switched_model(quantized: ir.Model, float_model: ir.Model,
                   float_ranges: dict[str, tuple[float, float]] | None = None) -> SwitchedModel:
    """Rewrite ``quantized`` (a typed QDQ model, changed in place) into its switched form.

    ``float_model`` gives the float constants, matched by node name and input position
    (lowbit keeps the names of the float model it prepared). A constant input whose float
    counterpart cannot be found reads its dequantized value in every form. ``float_ranges``:
    the float values' (min, max) per activation, the range of its 16-bit form (with 65536
    levels there is no need to clip, as 8-bit ranges do); without it, the 8-bit range.
    """
    float_nodes = {node.name: node for node in float_model.graph}
    graph = quantized.graph
    restore = _AbsorbedActivations(graph, float_model)
    output_readers = _read_quantized_outputs(graph)
    nodes = []
    for node in list(graph):
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or not any(is_float32(v) for v in node.outputs):
            continue  # the pairs themselves, and nodes that only read a shape
        entry = SwitchedNode(node.name, OUTPUT_ROUNDING if node in output_readers else node.op_type,
                             unique_name(graph, SWITCH_PREFIX + node.name), unique_name(graph, WIDE_PREFIX + node.name))
        forms = _forms(graph, node, float_nodes.get(node.name), entry, float_ranges or {}, restore)
        if forms is None:
            continue
        switches = []
        for name in (entry.switch, entry.wide):
            value = ir.Value(name=name, type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
            graph.inputs.append(value)
            switches.append(value)
        _replace_with_if(graph, node, *switches, forms)
        nodes.append(entry)
    ir.passes.common.RemoveUnusedNodesPass()(quantized)  # the weights' DequantizeLinear nodes, now constants
    return SwitchedModel(quantized, nodes)


def _forms(graph: ir.Graph, node: ir.Node, float_node: ir.Node | None, entry: SwitchedNode,
           float_ranges: dict[str, tuple[float, float]], restore: _AbsorbedActivations) -> _Forms | None:
    """The node's inputs in each form (noted in ``entry``); None when no input is read through a DQ."""
    forms = _Forms(list(node.inputs), list(node.inputs), list(node.inputs))
    for index, value in enumerate(node.inputs):
        dq = value.producer() if value is not None else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        grid = grid_of(dq)
        source = dq.inputs[0].producer()
        if source is not None and source.op_type == "QuantizeLinear":
            original = restore(source.inputs[0])
            forms.original[index] = original
            if grid is not None and grid.axis is None:
                low, high = float_ranges.get(original.name, grid.bounds())
                forms.wide[index] = _round_wide(graph, original, float(low), float(high), forms.wide_nodes)
            entry.activations.append(original.name)
            continue
        if dq.inputs[0].const_value is None:
            continue  # an integer graph input: nothing float to switch to
        entry.weights.append(value.name)
        forms.quantized[index] = add_initializer(graph, f"{value.name}_float",
                                                 dequantized_weight(dq).astype(np.float32))
        forms.wide[index] = forms.quantized[index]
        if float_node is not None and index >= len(float_node.inputs):
            forms.original[index] = None  # a bias that bias correction added: the float node has none
            continue
        float_constant = _float_constant(float_node, index, dq.inputs[0])
        if float_constant is None:
            forms.original[index] = forms.quantized[index]
            entry.unmatched.append(value.name)
            continue
        forms.original[index] = add_initializer(graph, f"{value.name}_original", float_constant)
        if grid is not None and grid.bits <= 8:
            forms.wide[index] = add_initializer(graph, f"{value.name}_int16", _wide_constant(float_constant, grid.axis))
        elif grid is not None and grid.bits > 16:
            forms.wide[index] = forms.original[index]  # a bias: the float one (its correction was for 8-bit weights)
    if not entry.activations and not entry.weights:
        return None
    return forms


def _read_quantized_outputs(graph: ir.Graph) -> list[ir.Node]:
    """Give each graph output that a DequantizeLinear writes (onnxruntime quantizes outputs) a reader to switch.

    An Identity takes the output's place, named after it, so that the output's rounding can
    be switched like any node's inputs (op type :data:`OUTPUT_ROUNDING` in the ranking; no
    node of the model to list in skip_quant_node). Returns the Identity nodes.
    """
    readers = []
    for index, value in enumerate(list(graph.outputs)):
        dq = value.producer()
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        name = value.name
        value.name = unique_name(graph, f"{name}_dequantized")
        reader = ir.node("Identity", [value], name=unique_name(graph, f"{name} {OUTPUT_ROUNDING}"))
        reader.outputs[0].name, reader.outputs[0].type, reader.outputs[0].shape = name, value.type, value.shape
        graph.append(reader)
        graph.outputs[index] = reader.outputs[0]
        readers.append(reader)
    return readers


class _AbsorbedActivations:
    """The float value of a tensor whose Relu or Clip the quantized model left to its Q/DQ pair.

    onnxruntime's quantize_static drops a Relu (or Clip) after a Conv when the pair's range
    clips as it would, and the Conv's output takes the Relu's output name. The tensor
    before the QuantizeLinear is then not the float model's tensor: the float form gets the
    activation back, one node in the main graph per such tensor (lowbit keeps its Relus).
    """

    def __init__(self, graph: ir.Graph, float_model: ir.Model):
        self.graph = graph
        self.float_producers = {v.name: node for node in float_model.graph for v in node.outputs if v is not None}
        self.restored: dict[str, ir.Value] = {}

    def __call__(self, value: ir.Value) -> ir.Value:
        theirs, mine = self.float_producers.get(value.name), value.producer()
        if theirs is None or mine is None or theirs.name == mine.name or theirs.op_type not in ("Relu", "Clip"):
            return value
        if value.name not in self.restored:
            bounds = [constant_array(v) for v in theirs.inputs[1:]]
            if any(b is None for b, v in zip(bounds, theirs.inputs[1:]) if v is not None):
                return value  # a Clip whose bounds are computed: nothing to copy
            inputs = [value] + [None if b is None else add_initializer(self.graph, f"{value.name}_{theirs.op_type}", b)
                                for b in bounds]
            node = ir.Node("", theirs.op_type, inputs, list(theirs.attributes.values()), num_outputs=1,
                           name=unique_name(self.graph, f"{value.name}_restored_{theirs.op_type}"))
            node.outputs[0].name = unique_name(self.graph, f"{value.name}_float")
            node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            self.graph.insert_after(mine, node)
            self.restored[value.name] = node.outputs[0]
        return self.restored[value.name]


def _float_constant(float_node: ir.Node | None, index: int, integers: ir.Value) -> np.ndarray | None:
    """The float model's constant at this input, if it has the shape of the integers read in its place."""
    if float_node is None:
        return None
    array = constant_array(float_node.inputs[index])
    if array is None or array.dtype != np.float32 or tuple(integers.const_value.shape) != array.shape:
        return None
    return array


def _wide_step(low, high):
    return np.maximum((high - low) / (WIDE_LEVELS - 1), np.finfo(np.float32).tiny)


def _wide_constant(values: np.ndarray, axis: int | None) -> np.ndarray:
    """``values`` rounded to 65536 levels over their own range (per channel along ``axis``)."""
    others = tuple(i for i in range(values.ndim) if i != axis) if axis is not None else None
    low = np.minimum(values.min(axis=others, keepdims=axis is not None), 0.0).astype(np.float64)
    high = np.maximum(values.max(axis=others, keepdims=axis is not None), 0.0).astype(np.float64)
    step = _wide_step(low, high)
    return (np.clip(np.round((values - low) / step), 0, WIDE_LEVELS - 1) * step + low).astype(np.float32)


def _round_wide(graph: ir.Graph, value: ir.Value, low: float, high: float, nodes: list[ir.Node]) -> ir.Value:
    """Nodes that round an activation to 65536 levels over [low, high] (added to ``nodes``); returns the result."""
    low, high = min(low, 0.0), max(high, 0.0)
    step = float(_wide_step(low, high))
    constants = {name: add_initializer(graph, f"{value.name}_int16_{name}", np.array(number, np.float32))
                 for name, number in (("low", low), ("step", step), ("top", WIDE_LEVELS - 1), ("zero", 0.0))}
    steps = [ir.node("Sub", [value, constants["low"]])]
    steps.append(ir.node("Div", [steps[-1].outputs[0], constants["step"]]))
    steps.append(ir.node("Round", [steps[-1].outputs[0]]))
    steps.append(ir.node("Clip", [steps[-1].outputs[0], constants["zero"], constants["top"]]))
    steps.append(ir.node("Mul", [steps[-1].outputs[0], constants["step"]]))
    steps.append(ir.node("Add", [steps[-1].outputs[0], constants["low"]]))
    for step_node in steps:
        step_node.name = unique_name(graph, f"{value.name}_int16_{step_node.op_type}")
        step_node.outputs[0].name = step_node.name
        step_node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        nodes.append(step_node)
    return steps[-1].outputs[0]


def _branch(node: ir.Node, name: str, inputs: list, before: list[ir.Node] = ()) -> ir.Graph:
    """A subgraph computing the node on ``inputs`` (after ``before``), its outputs named after the node's."""
    copy = ir.Node(node.domain, node.op_type, inputs, list(node.attributes.values()), overload=node.overload,
                   num_outputs=len(node.outputs), version=node.version, name=f"{node.name}_{name}")
    for mine, theirs in zip(copy.outputs, node.outputs):
        mine.name = f"{theirs.name}_{name}"
        mine.type, mine.shape = theirs.type, theirs.shape
    return ir.Graph([], copy.outputs, nodes=[*before, copy], name=f"{node.name}_{name}")


def _choice(condition: ir.Value, then_branch: ir.Graph, else_branch: ir.Graph, node: ir.Node, name: str) -> ir.Node:
    choice = ir.node("If", [condition], {"then_branch": ir.AttrGraph("then_branch", then_branch),
                                         "else_branch": ir.AttrGraph("else_branch", else_branch)},
                     num_outputs=len(node.outputs), name=name)
    for new, old in zip(choice.outputs, node.outputs):
        new.type, new.shape = old.type, old.shape
    return choice


def _replace_with_if(graph: ir.Graph, node: ir.Node, switch: ir.Value, wide: ir.Value, forms: _Forms) -> None:
    """Put the nested Ifs in the node's place; their outputs take the node's outputs' names and readers."""
    inner = _choice(wide, _branch(node, "int16", forms.wide, forms.wide_nodes),
                    _branch(node, "quantized", forms.quantized), node, f"{node.name}_int16_switch")
    for value in inner.outputs:
        value.name = f"{node.name}_{value.index()}_chosen"
    quantized = ir.Graph([], list(inner.outputs), nodes=[inner], name=f"{node.name}_quantized_forms")
    outer = _choice(switch, quantized, _branch(node, "float", forms.original), node,
                    unique_name(graph, f"{node.name}_switch"))
    graph.insert_before(node, outer)
    for old, new in zip(node.outputs, outer.outputs):
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        name = old.name
        old.name = None
        new.name = name
    graph.remove(node, safe=True)
