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
applies it. Mixed precision (op_config, node_config, all_node_type; see
:mod:`lowbit.quantizers.precision`) changes decisions here, not the rewrite: a precision per
node input, the activation tensors kept at 16 bits, the inputs with error compensation,
the nodes computed in float16.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import onnx_ir as ir

from ..config.precision import EC, FLOAT16, FLOAT32, INT4, INT8, INT16
from ..graph.query import STANDARD_DOMAINS, attribute, constant_array, is_activation, is_float32
from .float16 import has_float16_form
from .precision import FLOATS, WEIGHT_BIT_NUM, PrecisionRules, float16_kernels, has_constant_weight
from .qparams import INT4 as INT4_TYPE
from .qparams import QuantScheme
from .selection import WeightSelection
from .targets import FUSABLE_ACTIVATIONS, FUSION_PRODUCERS, SAME_SCALE_OPS, WEIGHTED_OPS, Target

SKIPPED = "listed in skip_quant_node"

# int4 weights (W4A8, opset 21): symmetric, levels -7..7, so that the grid is the same on both sides of zero.
INT4_WEIGHTS = QuantScheme(INT4_TYPE, symmetric=True, narrow_range=True)

# Ops whose float weight ONNX Runtime quantizes itself when their data input is dequantized.
WEIGHT_REQUANTIZED = frozenset({"Conv", "ConvTranspose", "Gemm"})


@dataclass
class NodeDecision:
    """``precision``: int8 / int16 / ec (the widest of its inputs') for a quantized node, float16 or
    float32 for a float one; ``inputs``: the precision of each input index it quantizes or reads float."""

    node: ir.Node
    quantized: bool
    reason: str = ""
    fused_into: str | None = None
    precision: str = ""
    inputs: dict[int, str] = field(default_factory=dict)

    def reads_float(self, index: int) -> bool:
        """Whether input ``index`` is read as the float tensor before any rounding."""
        return self.reason == SKIPPED or self.precision in FLOATS or self.inputs.get(index) in FLOATS


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
    # int16 nodes: the scale may exceed input scale x weight scale where the bias would not fit
    # in int32 (no integer kernel needs the product there; ONNX Runtime would otherwise quantize
    # a float bias itself, with the product, and saturate it)
    own_scale: bool = False


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

    @property
    def float16_nodes(self) -> list[ir.Node]:
        return [d.node for d in self.decisions.values() if d.precision == FLOAT16]


@dataclass
class QuantPlan(Decisions):
    target: Target | None = None
    activations: dict[str, ir.Value] = field(default_factory=dict)
    weights: list[WeightSlot] = field(default_factory=list)
    biases: list[BiasSlot] = field(default_factory=list)
    wide: set[str] = field(default_factory=set)  # activations at 16 bits (whole scale-sharing groups)
    compensated: list[tuple[ir.Node, int]] = field(default_factory=list)  # (node, input) with ec
    notes: list[str] = field(default_factory=list)  # precision requests the target or model changed
    saturation_safe: bool = False  # int8 weights read with int8 activations: pairs within 128
    _parent: dict[str, str] = field(default_factory=dict)

    def activation_scheme(self, name: str) -> QuantScheme:
        """The scheme of an activation: 16-bit when it is wide."""
        if self.target.activation16 is not None and name in self.wide:
            return self.target.activation16
        return self.target.activation

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
    """Full quantization's options: the shared weight selection and the precisions asked for."""

    precisions: PrecisionRules = field(default_factory=PrecisionRules, hash=False)
    saturation_safe: bool = True  # int8 weight pairs within 128 (:mod:`~lowbit.quantizers.saturation`)


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
    planner.quantize_outputs()
    planner.widen_groups()
    planner.say_float16_fallbacks()
    return planner.plan


class _Planner:
    def __init__(self, graph: ir.Graph, target: Target, options: PlanOptions):
        self.graph = graph
        self.target = target
        self.options = options
        self.rules = options.precisions
        self.plan = QuantPlan(target=target, saturation_safe=options.saturation_safe)
        self.float16_ops = None if target.all_float16 else float16_kernels(graph.opset_imports.get("", 1))
        self.no_float16_kernel: Counter[str] = Counter()

    def decide(self, node: ir.Node) -> None:
        if node.name in self.plan.decisions:  # already decided as a fused activation
            return
        reason = self._why_float(node)
        indices = self._planned_inputs(node) if reason is None else (0,)
        precision = self.rules.node_precision(node, indices)
        if reason is None and precision.qtype in FLOATS:
            reason = f"{precision.qtype} ({precision.source})"
        if reason is not None:
            if self._touches_float(node):
                self._decide_float(node, reason, precision.qtype, precision.source)
            return
        inputs = {i: self._input_precision(node, i) for i in indices}
        if node.op_type in WEIGHT_REQUANTIZED and inputs.get(1) in FLOATS and inputs.get(0) not in FLOATS:
            self.plan.notes.append(f"{node.name}: a float weight under a quantized input is quantized again by "
                                   f"ONNX Runtime (per tensor, int8), so the whole {node.op_type} stays float32")
            self._decide_float(node, f"float32 ({self.rules.input_precision(node, 1).source})", FLOAT32, "")
            return
        self.plan.decisions[node.name] = NodeDecision(node, True, precision=precision.qtype, inputs=inputs)
        for fused in self._fused_activations(node):
            self.plan.decisions[fused.name] = NodeDecision(fused, True, fused_into=node.name,
                                                           precision=INT16 if precision.qtype == INT16 else INT8)

    def _input_precision(self, node: ir.Node, index: int) -> str:
        """Input ``index``'s precision. A depthwise filter's few weights keep 8 bits under weight_bit_num=4 (each
        output channel has 9 or 25 weights: int4's grid costs too much there) unless a setting names it int4."""
        weight = index == self._weight_index(node)
        precision = self.rules.input_precision(node, index, weight)
        if precision.source == WEIGHT_BIT_NUM and _grouped(node):
            return INT8
        return precision.qtype

    def _decide_float(self, node: ir.Node, reason: str, asked: str, source: str) -> None:
        """A float node: float16 when asked and the target runs the op in float16.

        Asked float (float16/float32, or skip_quant_node), it reads its inputs before any
        rounding; float for want of an int8 rule, it reads them as quantized, so that its
        producer keeps an integer kernel (precision "").
        """
        precision = ""
        if reason == SKIPPED:
            pass
        elif asked == FLOAT16 and self._runs_in_float16(node):
            precision, reason = FLOAT16, f"float16 ({source})"
        elif asked in FLOATS:
            precision = FLOAT32
            if asked == FLOAT16:
                self.no_float16_kernel[node.op_type] += 1
                reason = (f"float32: float16 asked ({source}), no float16 {node.op_type} kernel or form on target "
                          f"{self.target.name}")
        elif self.rules.explicit(node):
            self.plan.notes.append(f"{node.name} ({node.op_type}): {asked} asked by {source}, but it stays "
                                   f"float32: {reason}")
        self.plan.decisions[node.name] = NodeDecision(node, False, reason, precision=precision)

    def _runs_in_float16(self, node: ir.Node) -> bool:
        return (node.domain in STANDARD_DOMAINS and has_float16_form(node, self.graph.opset_imports.get("", 1))
                and (self.float16_ops is None or node.op_type in self.float16_ops))

    def say_float16_fallbacks(self) -> None:
        if self.no_float16_kernel:
            ops = ", ".join(f"{op} ({n})" for op, n in self.no_float16_kernel.most_common())
            hint = "" if self.float16_ops is None else " (target_device=NVGPU runs every op in float16)"
            self.plan.notes.append(f"float16 asked, but there is no float16 kernel (ONNX Runtime's CPU provider) or no "
                                   f"float16 form (an output typed by an attribute, as Cast's) for {ops}: these nodes "
                                   f"compute in float32{hint}")

    def demote_dead_end(self, node: ir.Node) -> None:
        """An element-wise or data-movement op whose result only float ops read stays float.

        Its int8 form would add a rounding step and give no int8 kernel (ORT runs
        DQ -> op -> Q only when a quantized op reads the result). Walking the graph
        backwards lets a whole dead-end chain (Mul -> Add -> Softmax) fall back to float.
        A node whose precision op_config or node_config names keeps it.
        """
        decision = self.plan.decisions.get(node.name)
        if decision is None or not decision.quantized or decision.fused_into or node.op_type in WEIGHTED_OPS:
            return
        if self.rules.explicit(node):  # op_config / node_config asked for its precision: it keeps it
            return
        if any(self._read_by_quantized(out) for out in self._results(node)):
            return
        reason = "only float ops read its output, so int8 would add rounding without an int8 kernel"
        self.plan.decisions[node.name] = NodeDecision(node, False, reason)
        for fused in self._fused_activations(node):
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
            self._mark(out, wide=decision.precision == INT16)  # an int16 node's readers read int16 (context)

    def _results(self, node: ir.Node) -> list[ir.Value]:
        """The node's outputs, or its fused activation's output."""
        fused = self._fused_activations(node)
        return [fused[-1].outputs[0]] if fused else [v for v in node.outputs if v is not None]

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

    def _planned_inputs(self, node: ir.Node) -> tuple[int, ...]:
        """The inputs an int8 node quantizes: its data inputs and its constant weight."""
        indices = set(self.target.data_inputs(node.op_type, len(node.inputs)))
        if self._weight_index(node) is not None:
            indices.add(1)
        return tuple(sorted(i for i in indices if node.inputs[i] is not None))

    @staticmethod
    def _weight_index(node: ir.Node) -> int | None:
        return 1 if has_constant_weight(node) else None

    def _quantize_inputs(self, node: ir.Node) -> None:
        decision = self.plan.decisions[node.name]
        weight_index = self._weight_index(node)
        for i in self._planned_inputs(node):
            value, precision = node.inputs[i], decision.inputs.get(i, INT8)
            if precision in FLOATS:
                continue  # read float (the rewrite keeps the tensor before rounding for this reader)
            wide = precision == INT16
            if precision == EC:
                self.plan.compensated.append((node, i))
            if i == weight_index:
                self.plan.weights.append(WeightSlot(node, i, self._weight_scheme(node, value, precision)))
            elif constant_array(value) is not None:
                scheme = self.target.activation16 if wide else self.target.activation
                self.plan.weights.append(WeightSlot(node, i, scheme))
            else:
                self._mark(value, wide)
        if weight_index is not None and node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2:
            self._plan_bias(node, own_scale=any(decision.inputs.get(i) == INT16 for i in (0, 1)))

    def widen_groups(self) -> None:
        """One int16 member makes its whole scale-sharing group int16 (one scale, one type)."""
        wide_groups = {self.plan.group_of(name) for name in self.plan.wide}
        self.plan.wide = {name for name in self.plan.activations if self.plan.group_of(name) in wide_groups}

    def quantize_outputs(self) -> None:
        """model_output_type: a Q/DQ pair (int8 or int16) on every float graph output a node computes."""
        qtype = self.rules.output
        if qtype is None:
            return
        wide = qtype == INT16 and self.target.activation16 is not None
        if qtype == INT16 and not wide:
            self.plan.notes.append(f"model_output_type=int16: target {self.target.name} has no int16; the outputs "
                                   "are quantized to int8")
        for value in self.graph.outputs:
            if is_float32(value) and value.producer() is not None:
                self._mark(value, wide)

    def _plan_bias(self, node: ir.Node, own_scale: bool) -> None:
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
        self.plan.biases.append(BiasSlot(node, 2, node.inputs[0], 1, own_scale))

    def _weight_scheme(self, node: ir.Node, value: ir.Value, precision: str) -> QuantScheme:
        scheme = self.target.weight
        if precision == INT16 and self.target.weight16 is not None:
            scheme = self.target.weight16
        elif precision == INT4:
            scheme = INT4_WEIGHTS
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

    def _fused_activations(self, node: ir.Node) -> list[ir.Node]:
        """The activation a runtime would fuse into this op (the Relu/Clip that alone reads its output), and
        after a Relu the Min with a constant bound that alone reads it (a per-channel clip, as cross-layer
        equalization writes a scaled ReLU6); empty when there is none."""
        if node.op_type not in FUSION_PRODUCERS:
            return []
        chain = []
        for kinds in (FUSABLE_ACTIVATIONS, ("Min",)):
            consumer = self._only_reader(node if not chain else chain[-1])
            if consumer is None or consumer.op_type not in kinds or (chain and chain[-1].op_type != "Relu"):
                break
            chain.append(consumer)
        return chain

    def _only_reader(self, node: ir.Node) -> ir.Node | None:
        """The node that alone reads this node's output, if the plan may fuse it (no setting names it, its
        other inputs are constants)."""
        out = node.outputs[0]
        uses = list(out.uses())
        if out.is_graph_output() or len(uses) != 1:
            return None
        consumer = uses[0].node
        if (
            consumer.domain not in STANDARD_DOMAINS
            or consumer.name in self.options.skip_nodes
            or consumer.name in self.rules.nodes
            or self.rules.input_precision(consumer, 0).qtype in FLOATS
            or any(constant_array(v) is None for v in consumer.inputs[1:] if v is not None)
        ):
            return None
        return consumer

    def _mark(self, value: ir.Value, wide: bool = False) -> None:
        self.plan.activations.setdefault(value.name, value)
        if wide:
            self.plan.wide.add(value.name)


def _grouped(node: ir.Node) -> bool:
    """A grouped (depthwise) convolution: each output channel reads a few inputs' worth of weights."""
    return node.op_type in ("Conv", "ConvTranspose") and attribute(node, "group", 1) != 1


def _pads_with_zero(node: ir.Node) -> bool:
    if attribute(node, "mode", "constant") != "constant":
        return True
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        value = constant_array(node.inputs[2])
        return value is not None and not value.any()
    return True
