"""Weight-only quantization (``quant_type=WEIGHT_QUANT``): integers in the file, float ops at run time.

Which weights: the float constant weight of every Conv, ConvTranspose, Gemm and MatMul,
and the constant table of every Gather (word embeddings, most of a text encoder's
size), unless the node is in skip_quant_node or the weight has no more elements than
min_quant_weight_size or no more channels than min_quant_weight_channel (MindSpore's
thresholds; small layers gain little and lose the most).

How they are written (:func:`apply_weight_only`):

* ``DequantizeLinear`` over the integer initializer (int4 at opset 21, int8 or int16,
  see :mod:`lowbit.quantizers.weight_bits`) with a float32 scale per output channel
  (per row for an embedding table), feeding the unchanged float op. Standard ONNX, so
  any runtime runs it; a weight read by several nodes is stored once;
* with ``matmul_nbits`` (4 bits, 2-D MatMul weights): ONNX Runtime's ``MatMulNBits``
  contrib op, 4-bit blocks of ``block_size`` values along K, each with its own scale,
  packed two per byte; the MatMul is replaced, and only ONNX Runtime runs the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..graph.passes import unique_name
from ..graph.query import STANDARD_DOMAINS, attribute, constant_array
from .constants import add_initializer, dequantize_node
from .plan import SKIPPED, Decisions, NodeDecision
from .selection import WeightSelection
from .weight_bits import level_bound, quantize_weight, storage_type

# Op -> index of its weight input.
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "Gather": 0}
NBITS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class WeightOnlyOptions(WeightSelection):
    opset21: bool = False  # the model is at opset 21 or more, so it may store int4 and int16
    matmul_nbits: bool = False
    block_size: int = 32


@dataclass
class WeightTensor:
    """One constant to store as integers, with every (node, input index) that reads it."""

    value: ir.Value
    axis: int | None  # channel axis; None = one scale for the tensor
    readers: list[tuple[ir.Node, int]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.value.name

    @property
    def array(self) -> np.ndarray:
        return constant_array(self.value)

    @property
    def size(self) -> int:
        return self.array.size


@dataclass
class WeightOnlyPlan(Decisions):
    tensors: dict[str, WeightTensor] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredWeight:
    """How one weight ended up in the file (for the summary and result.weights)."""

    name: str
    nodes: tuple[str, ...]
    elements: int
    bits: int
    storage: str  # int4, int8, int16, or "MatMulNBits"


def plan_weight_only(model: ir.Model, options: WeightOnlyOptions) -> WeightOnlyPlan:
    plan = WeightOnlyPlan()
    for node in model.graph:
        if node.op_type not in WEIGHT_INPUT or node.domain not in STANDARD_DOMAINS:
            continue
        index = WEIGHT_INPUT[node.op_type]
        weight = constant_array(node.inputs[index]) if len(node.inputs) > index else None
        if weight is None or weight.dtype != np.float32 or weight.ndim < 2:
            continue  # nothing to store: not reported, the node computes in float either way
        axis = _channel_axis(node, weight.ndim)
        reason = _why_float(node, weight, axis, options)
        plan.decisions[node.name] = NodeDecision(node, reason is None, reason or "")
        if reason is not None:
            continue
        value = node.inputs[index]
        tensor = plan.tensors.setdefault(value.name, WeightTensor(value, axis if options.per_channel else None))
        if tensor.axis != (axis if options.per_channel else None):
            tensor.axis = None  # readers disagree on the channel axis: one scale for the tensor
        tensor.readers.append((node, index))
    return plan


def _channel_axis(node: ir.Node, ndim: int) -> int:
    op = node.op_type
    if op == "Gather":
        return 0 if attribute(node, "axis", 0) == 0 else ndim - 1  # a row per token / per entry
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1 if attribute(node, "group", 1) == 1 else 0
    if op == "Gemm":
        return 0 if attribute(node, "transB", 0) else 1
    return ndim - 1  # MatMul: output columns


def _why_float(node: ir.Node, weight: np.ndarray, axis: int, options: WeightOnlyOptions) -> str | None:
    if node.name in options.skip_nodes:
        return SKIPPED
    return options.too_small(weight.size, weight.shape[axis])


def apply_weight_only(model: ir.Model, plan: WeightOnlyPlan, bits: dict[str, int],
                      options: WeightOnlyOptions) -> list[StoredWeight]:
    """Rewrite the model in place, each planned weight at ``bits[name]``; returns what was stored."""
    graph = model.graph
    stored = []
    for name, tensor in plan.tensors.items():
        width = bits[name]
        nodes = tuple(node.name for node, _ in tensor.readers)
        if options.matmul_nbits and _fits_nbits(tensor, width):
            for node, _ in tensor.readers:
                _replace_with_nbits(graph, node, tensor.array, options.block_size)
            model.opset_imports.setdefault(NBITS_DOMAIN, 1)
            stored.append(StoredWeight(name, nodes, tensor.size, width, "MatMulNBits"))
            continue
        qtype = storage_type(width, options.opset21)
        quantized = quantize_weight(tensor.array, width, tensor.axis)
        q = add_initializer(graph, f"{name}_quantized", quantized.q, qtype.onnx_type)
        scale = add_initializer(graph, f"{name}_scale", quantized.scale)
        out = dequantize_node(graph, q, scale, None, tensor.axis, f"{name}_dequantized", tensor.value.shape)
        graph.insert_before(graph.node(0), out.producer())
        for node, index in tensor.readers:
            node.replace_input_with(index, out)
        stored.append(StoredWeight(name, nodes, tensor.size, width, qtype.name))
    ir.passes.Sequential(
        ir.passes.common.RemoveUnusedNodesPass(),
        ir.passes.common.TopologicalSortPass(),
    )(model)
    return stored


def _fits_nbits(tensor: WeightTensor, bits: int) -> bool:
    return bits == 4 and tensor.array.ndim == 2 and all(
        node.op_type == "MatMul" and index == 1 for node, index in tensor.readers)


def nbits_blocks(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A [K, N] weight as MatMulNBits stores it: (packed uint8 [N, blocks, block_size / 2], scales [N * blocks]).

    Each block of ``block_size`` values along K gets a 4-bit symmetric grid (levels 1..15
    around the default zero point 8, scale chosen as for per-channel weights); K is
    padded with zeros to whole blocks; the even element of a pair is the low nibble.
    """
    k, n = weight.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = weight
    rows = padded.T.reshape(n * blocks, block_size)
    quantized = quantize_weight(rows, 4, axis=0)
    unsigned = (quantized.q.astype(np.int16) + level_bound(4) + 1).astype(np.uint8).reshape(n, blocks, block_size)
    packed = unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)
    return packed, quantized.scale.astype(np.float32)


def _replace_with_nbits(graph: ir.Graph, node: ir.Node, weight: np.ndarray, block_size: int) -> None:
    k, n = weight.shape
    packed, scales = nbits_blocks(weight, block_size)
    b = add_initializer(graph, f"{node.name}_weight_nbits", packed)
    s = add_initializer(graph, f"{node.name}_weight_nbits_scales", scales)
    nbits = ir.node("MatMulNBits", [node.inputs[0], b, s],
                    {"K": k, "N": n, "bits": 4, "block_size": block_size},
                    domain=NBITS_DOMAIN, name=unique_name(graph, f"{node.name}_MatMulNBits"))
    old = node.outputs[0]
    out = nbits.outputs[0]
    out.type, out.shape = old.type, old.shape
    graph.insert_before(node, nbits)
    old.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    name = old.name
    old.name = unique_name(graph, f"{name}_replaced")
    out.name = name  # the tensor keeps its name (a graph output must)
