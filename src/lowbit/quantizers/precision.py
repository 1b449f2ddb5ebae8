"""Which precision each node's inputs get: Horizon's model_config < op_config < node_config.

A node's input ``i`` takes, in this order: ``node_config[node].input<i>``, then
``node_config[node].qtype``, then ``op_config[op type].qtype``, then ``all_node_type``,
then int8. The precisions:

* ``int8``: today's int8 Q/DQ (the target's scheme);
* ``int16``: a 16-bit Q/DQ pair (opset 21), 65536 levels over the same kind of range. One
  tensor has one Q/DQ pair, so an int16 input also makes its producer's output and its
  other readers' inputs int16 (Horizon's "context");
* ``float16``: the node computes in float16 (Cast in and out, float16 constants). It is a
  property of the whole node: it cannot be mixed with integer inputs;
* ``int4``: for the constant weight of a Conv / ConvTranspose / Gemm / MatMul only: int4
  levels -7..7 (opset 21) under the node's 8-bit activations (W4A8). ``weight_bit_num=4``
  makes it every weight's default (a depthwise filter's few weights keep 8 bits unless a
  setting names the node); an ``int8`` that op_config or node_config names keeps that
  node's weight at 8 bits;
* ``float32``: the input is read as the float tensor, before any rounding;
* ``ec``: error compensation, int8 plus a second int8 pass over the rounding residual
  (:mod:`lowbit.quantizers.compensation`), on the inputs where that is exact.

Targets change what a request becomes: TensorRT (NVGPU) has no int16, so int16 becomes
float16; the DSP preset keeps 8-bit weights under 16-bit activations (SNPE's A16W8).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import onnx_ir as ir

from ..config import QuantConfig
from ..config.precision import EC, FLOAT16, FLOAT32, INT4, INT8, INT16, NodePrecision
from ..errors import LowbitError, closest
from ..graph.query import constant_array
from .targets import WEIGHTED_OPS

# Where error compensation is exact: the op is linear in that input.
EC_INPUTS = {"Conv": (1,), "ConvTranspose": (1,), "MatMul": (0, 1), "GridSample": (0,), "Resize": (0,)}
FLOATS = (FLOAT16, FLOAT32)
INT4_OPS = tuple(WEIGHTED_OPS)  # ops whose constant weight (input 1) may be int4
ALL_NODE_TYPE, DEFAULT = "all_node_type", "default"  # the sources of a precision no node or op type setting names
WEIGHT_BIT_NUM = "weight_bit_num"  # the source of a weight's int4 when no setting names its node


@dataclass(frozen=True)
class Precision:
    """One input's precision and the setting it came from (for the summary)."""

    qtype: str
    source: str


@dataclass
class PrecisionRules:
    """The resolved op_config / node_config / all_node_type of one job."""

    model: str = INT8
    ops: dict[str, NodePrecision] = field(default_factory=dict)
    nodes: dict[str, NodePrecision] = field(default_factory=dict)
    output: str | None = None  # model_output_type
    int16_becomes: str = INT16  # what the target makes of int16 (float16 on TensorRT)
    weights: str = INT8  # the weights' precision where no setting names it: int4 with weight_bit_num=4

    @classmethod
    def from_config(cls, config: QuantConfig, target_name: str) -> PrecisionRules:
        return cls(model=config.all_node_type or INT8, ops=dict(config.op_config or {}),
                   nodes=dict(config.node_config or {}), output=config.model_output_type,
                   int16_becomes=FLOAT16 if target_name == "NVGPU" else INT16,
                   weights=INT4 if config.weight_bit_num == 4 else INT8)

    @property
    def asks_int4(self) -> bool:
        """Whether any weight may be int4 (the model then needs opset 21)."""
        entries = [*self.ops.values(), *self.nodes.values()]
        return self.weights == INT4 or any(entry.asks(INT4) for entry in entries)

    @property
    def asks_int16(self) -> bool:
        """Whether any setting asks for int16 (the model then needs opset 21)."""
        entries = [*self.ops.values(), *self.nodes.values()]
        wanted = {self.model, self.output} | {e.qtype for e in entries}
        wanted |= {q for e in entries for q in e.inputs.values()}
        return INT16 in wanted and self.int16_becomes == INT16

    def without_int16(self) -> PrecisionRules:
        """The same rules with every int16 read as int8 (a model that cannot reach opset 21)."""
        def demote(entry: NodePrecision) -> NodePrecision:
            return NodePrecision(INT8 if entry.qtype == INT16 else entry.qtype,
                                 {i: INT8 if q == INT16 else q for i, q in entry.inputs.items()}, entry.where,
                                 entry.weight_levels)
        return PrecisionRules(INT8 if self.model == INT16 else self.model,
                              {k: demote(v) for k, v in self.ops.items()},
                              {k: demote(v) for k, v in self.nodes.items()},
                              INT8 if self.output == INT16 else self.output, self.int16_becomes, self.weights)

    def check(self, graph: ir.Graph) -> None:
        """Every named op type and node exists, and ec is asked only where it is exact."""
        nodes = {node.name: node for node in graph}
        op_types = sorted({node.op_type for node in graph})
        for op_type, entry in self.ops.items():
            if op_type not in op_types:
                raise LowbitError(f"{entry.where}: no {op_type} node in the model" + _suggest(op_type, op_types))
        for name, entry in self.nodes.items():
            if name not in nodes:
                raise LowbitError(f"{entry.where}: no node named '{name}' in the model (as lowbit prepares it: "
                                  "Constant and BatchNormalization nodes folded)" + _suggest(name, nodes))
            node = nodes[name]
            for index, qtype in entry.inputs.items():
                if qtype == EC and index not in EC_INPUTS.get(node.op_type, ()):
                    raise LowbitError(f"{entry.where}.input{index}: ec applies to Conv/ConvTranspose input1, MatMul "
                                      f"input0 or input1, GridSample/Resize input0; '{name}' is a {node.op_type}")
            values = {entry.qtype, *entry.inputs.values()}
            if FLOAT16 in values and values & {INT4, INT8, INT16, EC}:
                raise LowbitError(f"{entry.where}: float16 applies to the whole node (it computes in float16); "
                                  "it cannot be mixed with int4/int8/int16/ec inputs")
            if INT4 in values and not has_constant_weight(node):
                raise LowbitError(f"{entry.where}: int4 applies to the constant weight of a "
                                  f"{'/'.join(INT4_OPS)}; '{name}' is a {node.op_type}"
                                  + ("" if node.op_type not in INT4_OPS else " whose input1 is not a constant"))
            if any(qtype == INT4 and index != 1 for index, qtype in entry.inputs.items()):
                raise LowbitError(f"{entry.where}: int4 applies to the weight (input1); activations take 8 or 16 bits")
        for op_type, entry in self.ops.items():
            if entry.qtype == INT4 and op_type not in INT4_OPS:
                raise LowbitError(f"{entry.where}: int4 applies to the constant weight of a {'/'.join(INT4_OPS)}, "
                                  f"not to {op_type}")

    def input_precision(self, node: ir.Node, index: int, weight: bool = False) -> Precision:
        """Input ``index``'s precision; ``weight``: it is the node's constant weight, which int4 (asked, or
        weight_bit_num=4) applies to. int4 asked for a whole node leaves its other inputs at int8."""
        precision = self._asked(node, index)
        if precision.qtype == INT4 and not weight:
            return Precision(INT8, precision.source)
        if weight and precision.qtype == INT8 and self.weights == INT4 and precision.source in (ALL_NODE_TYPE, DEFAULT):
            return Precision(INT4, WEIGHT_BIT_NUM)
        return precision

    def _asked(self, node: ir.Node, index: int) -> Precision:
        entry = self.nodes.get(node.name)
        if entry is not None and index in entry.inputs:
            return self._on_target(entry.inputs[index], f"node_config input{index}")
        if entry is not None and entry.qtype is not None:
            return self._on_target(entry.qtype, "node_config")
        entry = self.ops.get(node.op_type)
        if entry is not None and entry.qtype is not None:
            return self._on_target(entry.qtype, "op_config")
        return self._on_target(self.model, DEFAULT if self.model == INT8 else ALL_NODE_TYPE)

    def node_precision(self, node: ir.Node, indices: tuple[int, ...]) -> Precision:
        """The node's own precision: float16 if any input asks for it, else the widest of its inputs."""
        precisions = [self.input_precision(node, i) for i in indices] or [self.input_precision(node, 0)]
        for wanted in (FLOAT16, INT16, EC, INT8, FLOAT32):
            found = next((p for p in precisions if p.qtype == wanted), None)
            if found is not None:
                return found
        raise AssertionError(precisions)

    def _on_target(self, qtype: str, source: str) -> Precision:
        if qtype == INT16 and self.int16_becomes != INT16:
            return Precision(self.int16_becomes, f"{source}, int16 as {self.int16_becomes} on this target")
        return Precision(qtype, source)

    def explicit(self, node: ir.Node) -> bool:
        """Whether op_config or node_config names this node's precision (not only all_node_type; an entry
        that sets weight_levels alone does not)."""
        return any(entry is not None and entry.asks_precision
                   for entry in (self.nodes.get(node.name), self.ops.get(node.op_type)))


def has_constant_weight(node: ir.Node) -> bool:
    """A Conv / ConvTranspose / Gemm / MatMul whose input 1 is a constant: a weight to store as integers."""
    return node.op_type in WEIGHTED_OPS and len(node.inputs) > 1 and constant_array(node.inputs[1]) is not None


def _suggest(name: str, candidates) -> str:
    near = closest(name, candidates)
    return f" (did you mean {', '.join(repr(n) for n in near)}?)" if near else ""


@cache
def float16_kernels(opset: int) -> frozenset[str]:
    """Op types that ONNX Runtime's CPU provider runs in float16 at ``opset``.

    Without a kernel, ONNX Runtime would insert Casts and compute in float32 anyway, so
    lowbit keeps such nodes float32 and says so rather than writing Casts that do nothing.
    """
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    registry = getattr(ort_c, "get_all_opkernel_def", None)
    if registry is None:  # an onnxruntime build without the listing: claim no float16 kernel (float32 is safe)
        return frozenset()
    ops = set()
    for kernel in registry():
        if kernel.provider != "CPUExecutionProvider" or kernel.domain not in ("", "ai.onnx"):
            continue
        low, high = kernel.version_range
        if low <= opset <= high and any("tensor(float16)" in types for types in kernel.type_constraints.values()):
            ops.add(kernel.op_name)
    return frozenset(ops)
