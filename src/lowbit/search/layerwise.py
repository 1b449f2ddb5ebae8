"""Per-op scores of candidate activation ranges: the engine of AUTO_TUNE and the layer-wise search.

For a tensor T that an int8 op reads, and a list of candidate ranges for T, the question
is which range makes that op's output closest to the float output. The answer is
measured in one ONNX Runtime pass: the float model gets, for every (T, reading op,
candidate), a copy of the op whose input T goes through QuantizeLinear/DequantizeLinear
with the candidate's parameters and whose weight is the int8-rounded weight; the copy's
output is compared with the original op's float output inside the graph, and only the
sums a metric needs (:class:`~lowbit.search.metrics.PairStats`) leave the session. The
other inputs of the op stay float, so each candidate is judged on its own.

Rule for a tensor read by several ops (tpu-mlir): each op chooses its best candidate, and
the tensor takes the widest of those choices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from ..calibration.observers import MeanObserver, MinMaxObserver, Observer
from ..calibration.ranges import Range
from ..graph.query import constant_array
from ..quantizers.constants import weight_qparams
from ..quantizers.plan import QuantPlan
from ..quantizers.qparams import compute_qparams
from ..quantizers.targets import SAME_SCALE_OPS
from .metrics import METRICS, PairStats

# How each PairStats field is reduced from the graph: (ONNX reduction, what it reduces).
# a = the copy's output (int8 input), b = the float output, d = a - b.
_REDUCTIONS = {
    "sum_sq_diff": ("ReduceSumSquare", "d"),
    "sum_abs_diff": ("ReduceSum", "|d|"),
    "max_abs_diff": ("ReduceMax", "|d|"),
    "dot": ("ReduceSum", "ab"),
    "sum_sq_actual": ("ReduceSumSquare", "a"),
    "sum_sq_reference": ("ReduceSumSquare", "b"),
    "sum_abs_reference": ("ReduceSum", "|b|"),
    "count": ("Size", "b"),
}
_OF_REFERENCE = ("sum_sq_reference", "sum_abs_reference", "count")


@dataclass(frozen=True)
class OpScores:
    """Scores of one tensor's candidates at one op that reads it (index = candidate)."""

    tensor: str
    op: str
    scores: tuple[float, ...]
    best: int


def tuned_readers(plan: QuantPlan, tensor: str) -> list[ir.Node]:
    """The int8 ops whose error depends on T's range (data-movement ops only pass it on)."""
    readers = []
    for use in plan.activations[tensor].uses():
        decision = plan.decisions.get(use.node.name)
        if (decision is not None and decision.quantized and not decision.fused_into
                and use.node.op_type not in SAME_SCALE_OPS and use.node not in readers):
            readers.append(use.node)
    return readers


# Runs a model over the kept samples and feeds the observers of its outputs (the data engine's job).
Collect = Callable[[onnx.ModelProto, dict[str, Observer]], None]


def score_candidates(
    model: ir.Model,
    plan: QuantPlan,
    candidates: dict[str, Sequence[Range]],
    collect: Collect,
    metric: str,
) -> list[OpScores]:
    """Score every candidate range of every tensor at each int8 op that reads it."""
    measure = METRICS[metric]
    graph = _ScoringGraph(ir.serde.serialize_model(model), plan, measure.needs)
    layout = []  # (tensor, op, {field: output name}) per candidate, in candidate order
    for tensor, ranges in candidates.items():
        for node in tuned_readers(plan, tensor):
            for lo, hi in ranges:
                layout.append((tensor, node.name, graph.add_candidate(node, tensor, (lo, hi))))
    # each output is one number per sample: its sum over the samples (its largest for max_abs_diff)
    observers = {name: MinMaxObserver() if field == "max_abs_diff" else MeanObserver()
                 for _, _, fields in layout for field, name in fields.items()}
    collect(graph.finish(), observers)

    def total(field: str, name: str) -> float:
        observer = observers[name]
        return float(observer.max) if field == "max_abs_diff" else float(observer.total)

    stats = [PairStats(**{field: total(field, name) for field, name in fields.items()}) for _, _, fields in layout]
    grouped: dict[tuple[str, str], list[float]] = {}
    for (tensor, op, _), stat in zip(layout, stats):
        grouped.setdefault((tensor, op), []).append(measure.value(stat))
    return [OpScores(tensor, op, tuple(scores), measure.best(scores)) for (tensor, op), scores in grouped.items()]


def widest_choice(scores: list[OpScores], candidates: dict[str, Sequence[Range]]) -> dict[str, Range]:
    """Per tensor, the widest of the ranges its reading ops chose (tensors no op scored keep none)."""
    chosen: dict[str, Range] = {}
    for entry in scores:
        lo, hi = candidates[entry.tensor][entry.best]
        if entry.tensor in chosen:
            lo, hi = min(lo, chosen[entry.tensor][0]), max(hi, chosen[entry.tensor][1])
        chosen[entry.tensor] = (lo, hi)
    return chosen


class _ScoringGraph:
    """The float model plus, per candidate, Q/DQ -> op copy -> the metric's reductions as outputs."""

    def __init__(self, proto: onnx.ModelProto, plan: QuantPlan, needs: tuple[str, ...]):
        self.proto, self.plan, self.needs = proto, plan, needs
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.outputs: list[str] = []
        self.output_types: dict[str, int] = {}
        self.rounded_weights: dict[tuple[str, int], str] = {}
        self.reference_stats: dict[str, dict[str, str]] = {}
        self.doubles: dict[str, str] = {}
        self.slots = {(slot.node.name, slot.index): slot for slot in plan.weights}
        self.counter = 0

    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"lowbit_score_{self.counter}_{base}"

    def add_candidate(self, node: ir.Node, tensor: str, candidate: Range) -> dict[str, str]:
        qparams = compute_qparams(*candidate, self.plan.activation_scheme(tensor))
        scale, zero = self.fresh("scale"), self.fresh("zero_point")
        self.initializers += [numpy_helper.from_array(qparams.scale, scale),
                              numpy_helper.from_array(qparams.zero_point, zero)]
        quantized, dequantized = self.fresh("q"), self.fresh("dq")
        self.nodes.append(helper.make_node("QuantizeLinear", [tensor, scale, zero], [quantized]))
        self.nodes.append(helper.make_node("DequantizeLinear", [quantized, scale, zero], [dequantized]))
        inputs = []
        for index, value in enumerate(node.inputs):
            if value is None:
                inputs.append("")
            elif value.name == tensor:
                inputs.append(dequantized)
            elif (node.name, index) in self.slots:
                inputs.append(self._rounded_weight(node, index))
            else:
                inputs.append(value.name)
        actual = self.fresh("out")
        copy = helper.make_node(node.op_type, inputs, [actual], domain=node.domain)
        copy.attribute.extend(ir.serde.serialize_attribute(a) for a in node.attributes.values())
        self.nodes.append(copy)
        reference = node.outputs[0].name
        fields = dict(self._reference_stats(reference))
        sources = {"a": self._in_double(actual), "b": self._in_double(reference)}
        for field in self.needs:
            if field not in _OF_REFERENCE:
                op, what = _REDUCTIONS[field]
                fields[field] = self._reduce(op, self._source(what, sources))
        return fields

    def finish(self) -> onnx.ModelProto:
        self.proto.graph.initializer.extend(self.initializers)
        self.proto.graph.node.extend(self.nodes)
        del self.proto.graph.output[:]
        self.proto.graph.output.extend(helper.make_tensor_value_info(name, self.output_types[name], [])
                                       for name in self.outputs)
        return self.proto

    def _reference_stats(self, reference: str) -> dict[str, str]:
        if reference not in self.reference_stats:
            sources = {"b": self._in_double(reference)}
            self.reference_stats[reference] = {
                field: self._reduce(_REDUCTIONS[field][0], self._source(_REDUCTIONS[field][1], sources))
                for field in self.needs if field in _OF_REFERENCE}
        return self.reference_stats[reference]

    def _in_double(self, tensor: str) -> str:
        """The tensor cast to float64, once: the sums of squares of huge (finite) activations overflow float32."""
        if tensor not in self.doubles:
            self.doubles[tensor] = self.fresh("double")
            self.nodes.append(helper.make_node("Cast", [tensor], [self.doubles[tensor]], to=onnx.TensorProto.DOUBLE))
        return self.doubles[tensor]

    def _source(self, what: str, sources: dict[str, str]) -> str:
        """The tensor a reduction reads, built once per candidate: a, b, a - b, |a - b|, a * b, |b|."""
        if what not in sources:
            name = self.fresh(what)
            if what == "d":
                self.nodes.append(helper.make_node("Sub", [sources["a"], sources["b"]], [name]))
            elif what == "|d|":
                self.nodes.append(helper.make_node("Abs", [self._source("d", sources)], [name]))
            elif what == "ab":
                self.nodes.append(helper.make_node("Mul", [sources["a"], sources["b"]], [name]))
            else:  # |b|
                self.nodes.append(helper.make_node("Abs", [sources["b"]], [name]))
            sources[what] = name
        return sources[what]

    def _reduce(self, op: str, source: str) -> str:
        name = self.fresh(op)
        attributes = {} if op == "Size" else {"keepdims": 0}
        self.nodes.append(helper.make_node(op, [source], [name], **attributes))
        self.outputs.append(name)
        self.output_types[name] = onnx.TensorProto.INT64 if op == "Size" else onnx.TensorProto.DOUBLE
        return name

    def _rounded_weight(self, node: ir.Node, index: int) -> str:
        """The planned int8 rounding of a constant input, dequantized (one initializer per constant)."""
        key = (node.name, index)
        if key not in self.rounded_weights:
            array = constant_array(node.inputs[index])
            qparams = weight_qparams(array, self.slots[key].scheme)
            name = self.fresh("rounded_weight")
            self.initializers.append(numpy_helper.from_array(qparams.dequantize(qparams.quantize(array)), name))
            self.rounded_weights[key] = name
        return self.rounded_weights[key]
