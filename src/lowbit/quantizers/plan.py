"""Deciding what to quantize: per node, per tensor, before any data is seen.

The planner walks the prepared float graph in topological order and records

* a decision per node: quantized (int8), fused into the op before it, or kept float
  with the reason (skip_quant_node, no int8 rule on the target, weight below the
  size thresholds, input not float32 ...);
* the activation tensors that get a QuantizeLinear/DequantizeLinear pair, grouped
  where ops need equal input and output scales (a union-find over tensor names);
* the weights and biases to store as integers.

Calibration then observes exactly the activation tensors of the plan (statistics are
declared by the plan, then collected in one pass over the data), and the QDQ rewrite
applies it. A later mixed-precision search changes decisions here, not the rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from ..graph.query import STANDARD_DOMAINS, attribute, constant_array, is_activation, is_float32
from .qparams import QuantScheme
from .selection import WeightSelection
from .targets import FUSABLE_ACTIVATIONS, FUSION_PRODUCERS, SAME_SCALE_OPS, WEIGHTED_OPS, Target


SKIPPED = "listed in skip_quant_node"


@dataclass
class NodeDecision:
    node: ir.Node
    quantized: bool
    reason: str = ""
    fused_into: str | None = None


@dataclass(frozen=True)
class WeightSlot:
    """A constant input of a node stored as integers: a weight, or a constant operand of Add/Mul/Concat."""

    node: ir.Node
    index: int
    scheme: QuantScheme


@dataclass(frozen=True)
class BiasSlot:
    """A bias stored as int32 with scale = input scale x weight scale (zero point 0)."""

    node: ir.Node
    index: int
    input_value: ir.Value
    weight_index: int


@dataclass
class Decisions:
    """Per-node decisions of any quantization mode, in graph order."""

    decisions: dict[str, NodeDecision] = field(default_factory=dict)

    @property
    def quantized_nodes(self) -> list[NodeDecision]:
        return [d for d in self.decisions.values() if d.quantized]

    @property
    def float_nodes(self) -> list[NodeDecision]:
        return [d for d in self.decisions.values() if not d.quantized]


@dataclass
class QuantPlan(Decisions):
    target: Target | None = None
    activations: dict[str, ir.Value] = field(default_factory=dict)
    weights: list[WeightSlot] = field(default_factory=list)
    biases: list[BiasSlot] = field(default_factory=list)
    _parent: dict[str, str] = field(default_factory=dict)

    # Scale-sharing groups (union-find over activation names).
    def group_of(self, name: str) -> str:
        root = name
        while self._parent.get(root, root) != root:
            root = self._parent[root]
        self._parent[name] = root
        return root

    def share_scale(self, a: str, b: str) -> None:
        ra, rb = self.group_of(a), self.group_of(b)
        if ra != rb:
            self._parent[rb] = ra

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name in self.activations:
            out.setdefault(self.group_of(name), []).append(name)
        return out


@dataclass(frozen=True)
class PlanOptions(WeightSelection):
    """Full quantization's options: the shared weight selection (nothing of its own yet)."""


def plan_quantization(model: ir.Model, target: Target, options: PlanOptions) -> QuantPlan:
    """Decide nodes forward, demote dead ends backward, then place tensors (see the module docstring)."""
    planner = _Planner(model.graph, target, options)
    nodes = list(model.graph)
    for node in nodes:
        planner.decide(node)
    if target.quantize_outputs:
        for node in reversed(nodes):
            planner.demote_dead_end(node)
    for node in nodes:
        planner.place(node)
    return planner.plan


class _Planner:
    def __init__(self, graph: ir.Graph, target: Target, options: PlanOptions):
        self.graph = graph
        self.target = target
        self.options = options
        self.plan = QuantPlan(target=target)

    def decide(self, node: ir.Node) -> None:
        if node.name in self.plan.decisions:  # already decided as a fused activation
            return
        reason = self._why_float(node)
        if reason is not None:
            if self._touches_float(node):
                self.plan.decisions[node.name] = NodeDecision(node, False, reason)
            return
        self.plan.decisions[node.name] = NodeDecision(node, True)
        fused = self._fusable_activation(node)
        if fused is not None:
            self.plan.decisions[fused.name] = NodeDecision(fused, True, fused_into=node.name)

    def demote_dead_end(self, node: ir.Node) -> None:
        """An element-wise or data-movement op whose result only float ops read stays float.

        Its int8 form would add a rounding step and give no int8 kernel (ORT runs
        DQ -> op -> Q only when a quantized op reads the result). Walking the graph
        backwards lets a whole dead-end chain (Mul -> Add -> Softmax) fall back to float.
        """
        decision = self.plan.decisions.get(node.name)
        if decision is None or not decision.quantized or decision.fused_into or node.op_type in WEIGHTED_OPS:
            return
        if any(self._read_by_quantized(out) for out in self._results(node)):
            return
        reason = "only float ops read its output, so int8 would add rounding without an int8 kernel"
        self.plan.decisions[node.name] = NodeDecision(node, False, reason)
        fused = self._fusable_activation(node)
        if fused is not None:
            self.plan.decisions[fused.name] = NodeDecision(fused, False, f"follows {node.name}, which stays float")

    def place(self, node: ir.Node) -> None:
        """Record the tensors of a quantized node: inputs always, outputs on CPU/DSP targets."""
        decision = self.plan.decisions.get(node.name)
        if decision is None or not decision.quantized or decision.fused_into:
            return
        self._quantize_inputs(node)
        if not self.target.quantize_outputs:
            return
        if node.op_type in SAME_SCALE_OPS:
            self._quantize_same_scale_outputs(node)
            return
        out = self._results(node)[0]
        # QLinearConv needs a quantized output; MatMul/Gemm have int8 kernels with float outputs.
        keep = node.op_type in ("Conv", "ConvTranspose") or self._read_by_quantized(out)
        if keep and not out.is_graph_output():
            self._mark(out)

    def _results(self, node: ir.Node) -> list[ir.Value]:
        """The node's outputs, or its fused activation's output."""
        fused = self._fusable_activation(node)
        return [fused.outputs[0]] if fused is not None else [v for v in node.outputs if v is not None]

    def _read_by_quantized(self, value: ir.Value) -> bool:
        for use in value.uses():
            decision = self.plan.decisions.get(use.node.name)
            if decision is not None and decision.quantized:
                return True
        return False

    # -- decisions -------------------------------------------------------------------

    def _why_float(self, node: ir.Node) -> str | None:
        op = node.op_type
        if node.name in self.options.skip_nodes:
            return SKIPPED
        if node.domain not in STANDARD_DOMAINS:
            return f"custom domain '{node.domain}'"
        if op not in self.target.op_types:
            return f"{op} has no int8 kernel rule for target {self.target.name}"
        data = self.target.data_inputs(op, len(node.inputs))
        if not data or any(not is_float32(node.inputs[i]) for i in data if node.inputs[i] is not None):
            return "input is not float32"
        if not all(is_float32(out) for out in node.outputs if out is not None):
            return "output is not float32"
        if op in SAME_SCALE_OPS and self.target.quantize_outputs:
            producer = node.inputs[0].producer()
            decision = self.plan.decisions.get(producer.name) if producer is not None else None
            if decision is None or not decision.quantized:
                return "its input is not quantized (data-movement ops follow their input)"
            if op == "Pad" and not _pads_with_zero(node):
                return "pads with a non-zero constant"
        if op in WEIGHTED_OPS:
            return self._why_weight_float(node)
        return None

    def _why_weight_float(self, node: ir.Node) -> str | None:
        weight = constant_array(node.inputs[1])
        if weight is None:
            if node.op_type in ("Conv", "ConvTranspose"):
                return "weight is not a constant"
            return None  # MatMul/Gemm of two activations: both inputs are activations
        channels = weight.shape[self._weight_axis(node, weight.ndim)] if weight.ndim else 1
        return self.options.too_small(weight.size, channels)

    def _touches_float(self, node: ir.Node) -> bool:
        """Whether a node computes float tensors (shape arithmetic is not worth reporting)."""
        return any(is_activation(v) for v in node.outputs)

    # -- tensors ---------------------------------------------------------------------

    def _quantize_inputs(self, node: ir.Node) -> None:
        op = node.op_type
        weight_index = 1 if op in WEIGHTED_OPS and constant_array(node.inputs[1]) is not None else None
        indices = set(self.target.data_inputs(op, len(node.inputs)))
        if weight_index is not None:
            indices.add(weight_index)
        for i in sorted(indices):
            value = node.inputs[i]
            if value is None:
                continue
            if i == weight_index:
                self.plan.weights.append(WeightSlot(node, i, self._weight_scheme(node, value)))
            elif constant_array(value) is not None:
                self.plan.weights.append(WeightSlot(node, i, self.target.activation))
            else:
                self._mark(value)
        if weight_index is not None and op in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2:
            self._plan_bias(node)

    def _plan_bias(self, node: ir.Node) -> None:
        bias = constant_array(node.inputs[2])
        weight = constant_array(node.inputs[1])
        if bias is None or bias.dtype.kind != "f":
            return
        channels = weight.shape[self._weight_axis(node, weight.ndim)]
        if node.op_type == "ConvTranspose":
            channels *= attribute(node, "group", 1)
        if node.op_type == "Gemm" and (attribute(node, "alpha", 1.0) != 1.0 or attribute(node, "beta", 1.0) != 1.0):
            return
        if bias.shape != (channels,):
            return
        self.plan.biases.append(BiasSlot(node, 2, node.inputs[0], 1))

    def _weight_scheme(self, node: ir.Node, value: ir.Value) -> QuantScheme:
        scheme = self.target.weight
        weight = constant_array(value)
        per_channel = (
            self.options.per_channel
            and weight.ndim >= 2
            and not (node.op_type == "ConvTranspose" and attribute(node, "group", 1) != 1)
        )
        if not per_channel:
            return scheme.per_tensor()
        return QuantScheme(scheme.qtype, scheme.symmetric, self._weight_axis(node, weight.ndim), scheme.narrow_range)

    @staticmethod
    def _weight_axis(node: ir.Node, ndim: int) -> int:
        axis = WEIGHTED_OPS[node.op_type]
        if node.op_type == "Gemm":
            axis = 0 if attribute(node, "transB", 0) else 1
        return axis % ndim if ndim else 0

    def _quantize_same_scale_outputs(self, node: ir.Node) -> None:
        source = node.inputs[0].name
        for out in node.outputs:
            if out is not None and not out.is_graph_output() and self._read_by_quantized(out):
                self._mark(out)
                self.plan.share_scale(source, out.name)

    def _fusable_activation(self, node: ir.Node) -> ir.Node | None:
        """The Relu/Clip that is the only reader of this op's output, if a runtime would fuse it."""
        if node.op_type not in FUSION_PRODUCERS:
            return None
        out = node.outputs[0]
        uses = list(out.uses())
        if out.is_graph_output() or len(uses) != 1:
            return None
        consumer = uses[0].node
        if (
            consumer.op_type not in FUSABLE_ACTIVATIONS
            or consumer.domain not in STANDARD_DOMAINS
            or consumer.name in self.options.skip_nodes
            or any(constant_array(v) is None for v in consumer.inputs[1:] if v is not None)
        ):
            return None
        return consumer

    def _mark(self, value: ir.Value) -> None:
        self.plan.activations.setdefault(value.name, value)


def _pads_with_zero(node: ir.Node) -> bool:
    if attribute(node, "mode", "constant") != "constant":
        return True
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        value = constant_array(node.inputs[2])
        return value is not None and not value.any()
    return True
