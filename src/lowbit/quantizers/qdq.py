"""The QDQ rewrite: apply a plan and its quantization parameters to the graph.

Rules:

* an activation ``t`` becomes ``t -> QuantizeLinear -> DequantizeLinear -> t'`` and
  every reader of ``t`` reads ``t'`` (8 or 16 bits, as the plan's scale-sharing group
  says); graph outputs keep the float ``t`` unless model_output_type quantizes them,
  then ``t'`` takes the output's name;
* a weight (or a constant operand) is stored as integers, read through one
  DequantizeLinear (per-channel ones carry ``axis``);
* a bias is stored as int32 with ``scale = input scale x weight scale`` and zero point
  0, the form integer kernels accumulate in; where a bias would not fit in int32 the
  weight scale of that channel is raised until it does (an int16 node's bias takes a
  wider scale of its own instead);
* the plan's error-compensated inputs get their residual branch
  (:mod:`~lowbit.quantizers.compensation`) and its float16 nodes their Casts
  (:mod:`~lowbit.quantizers.float16`), here rather than in passes of their own, so that
  every model the range search scores is the model that is written;
* only standard ONNX operators are emitted (no custom domains).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..graph.passes import unique_name
from ..graph.query import constant_array
from .compensation import compensate_errors
from .constants import add_initializer, dequantize_node, weight_qparams
from .float16 import compute_in_float16
from .plan import WEIGHT_REQUANTIZED, BiasSlot, QuantPlan
from .qparams import INT32, QParams, QuantScheme, compute_qparams
from .saturation import fit_weight, guarded, widen_for_pairs
from .ties import as_recorded, off_ties
from .weight_bits import quantize_weight

WIDE_HEADROOM = 2.0


@dataclass
class _Rewriter:
    graph: ir.Graph
    activation_qparams: dict[str, QParams]
    plan: QuantPlan

    def __post_init__(self):
        self.dequantized: dict[tuple, ir.Value] = {}
        self.weight_qparams: dict[tuple[int, int], QParams] = {}
        # the float weight and its parameters of each input with error compensation, which needs the residual
        self.compensated = {(id(node), index) for node, index in self.plan.compensated}
        self.float_weights: dict[tuple[int, int], tuple[np.ndarray, QParams]] = {}

    # -- constants -----------------------------------------------------------------

    def dequantized_constant(self, value: ir.Value, qparams: QParams, tag: str,
                             fitted_for: ir.Node | None = None) -> ir.Value:
        """Integer initializer + DequantizeLinear for a constant; shared by readers with equal parameters.

        ``fitted_for``: the integers are kept from saturating that node's kernel
        (:func:`~lowbit.quantizers.saturation.fit_weight`)."""
        key = (value.name, tag, qparams.scale.tobytes(), qparams.zero_point.tobytes(), qparams.scheme.axis,
               fitted_for is not None)
        if key in self.dequantized:
            return self.dequantized[key]
        integers = qparams.quantize(constant_array(value))
        if fitted_for is not None:
            integers = fit_weight(fitted_for, integers)[0]
        q = add_initializer(self.graph, f"{value.name}_quantized", integers, qparams.scheme.qtype.onnx_type)
        scale = add_initializer(self.graph, f"{value.name}_scale", qparams.scale)
        # An int32 bias leaves out its zero point (0 by default, 4 bytes a channel saved).
        # Weights keep theirs even when 0: ONNX Runtime fuses DQ -> Gemm into QGemm only then.
        omit_zero_point = qparams.scheme.qtype is INT32 and not qparams.zero_point.any()
        zero_point = (None if omit_zero_point
                      else add_initializer(self.graph, f"{value.name}_zero_point", qparams.zero_point,
                                           qparams.scheme.qtype.onnx_type))
        out = dequantize_node(self.graph, q, scale, zero_point, qparams.scheme.axis, f"{value.name}_dequantized",
                              value.shape)
        self.graph.insert_before(self.graph.node(0), out.producer())
        self.dequantized[key] = out
        return out

    # -- activations ---------------------------------------------------------------

    def quantize_activation(self, value: ir.Value, qparams: QParams) -> None:
        scale = add_initializer(self.graph, f"{value.name}_scale", qparams.scale)
        zero_point = add_initializer(self.graph, f"{value.name}_zero_point", qparams.zero_point)
        quantize = ir.node("QuantizeLinear", [value, scale, zero_point],
                           name=unique_name(self.graph, f"{value.name}_QuantizeLinear"))
        q = quantize.outputs[0]
        q.name = unique_name(self.graph, f"{value.name}_quantized")
        q.type = ir.TensorType(qparams.scheme.qtype.onnx_type)
        q.shape = value.shape
        dq = dequantize_node(self.graph, q, scale, zero_point, None, f"{value.name}_dequantized", value.shape)
        readers = [(use.node, use.idx) for use in value.uses()
                   if use.node is not quantize and not self._keeps_float_input(use.node, use.idx)]
        for node, index in readers:
            node.replace_input_with(index, dq)
        producer = value.producer()
        if producer is None:
            self.graph.insert_before(self.graph.node(0), [quantize, dq.producer()])
        else:
            self.graph.insert_after(producer, [quantize, dq.producer()])
        if value.is_graph_output():  # model_output_type: the output is the dequantized value, same name
            index = list(self.graph.outputs).index(value)
            name = value.name
            value.name = unique_name(self.graph, f"{name}_float")
            dq.name = name
            self.graph.outputs[index] = dq

    def _keeps_float_input(self, node: ir.Node, index: int) -> bool:
        """A node listed in skip_quant_node, and any float Conv/ConvTranspose/Gemm, read the float tensor.

        A skipped node (or one set to float32/float16, or an input set to float32) computes
        on the value before the rounding, so that leaving a node float removes all of its
        quantization error (what ``lowbit analyze`` measures as
        its gain). Other float nodes read the dequantized tensor, so that the producer
        keeps its integer kernel with an integer output, except Conv/ConvTranspose/Gemm:
        ONNX Runtime's WeightBiasQuantization rewrites any such op whose data input comes
        from a DequantizeLinear, quantizing its float weight to int8 *per tensor*, which
        on a depthwise convolution wrecks the output (EfficientNet-Lite0 with its first
        depthwise convolution in skip_quant_node: cosine 0.99 -> 0.92).
        """
        decision = self.plan.decisions.get(node.name)
        if decision is not None and decision.reads_float(index):
            return True
        return (index == 0 and node.op_type in WEIGHT_REQUANTIZED
                and (decision is None or not decision.quantized))

    # -- weights and biases --------------------------------------------------------

    def quantize_weight(self, node: ir.Node, index: int, scheme: QuantScheme, bias: BiasSlot | None) -> None:
        value = node.inputs[index]
        array = constant_array(value)
        qparams = weight_qparams(array, scheme)
        if scheme.qtype.bits < 8:  # few levels: a scale that clips a few large weights costs less error
            grid = quantize_weight(array, scheme.qtype.bits, scheme.axis)
            qparams = QParams(grid.scale.astype(np.float32), qparams.zero_point, scheme)
        fitted = index == 1 and guarded(node, scheme.qtype, self.plan.saturation_safe)
        if fitted:  # a coarser grid for the channels where that costs less than cutting pairs down to the bound
            qparams = widen_for_pairs(node, array, qparams)
        if bias is not None and not bias.own_scale and bias.input_value.name in self.activation_qparams:
            qparams = _fit_bias_in_int32(qparams, constant_array(node.inputs[bias.index]),
                                         self.activation_qparams[bias.input_value.name])
        if (id(node), index) in self.compensated:
            self.float_weights[(id(node), index)] = (array, qparams)
        self.weight_qparams[(id(node), index)] = qparams
        node.replace_input_with(index, self.dequantized_constant(value, qparams, "weight", node if fitted else None))

    def quantize_bias(self, slot: BiasSlot) -> None:
        node = slot.node
        input_qparams = self.activation_qparams.get(slot.input_value.name)
        weight_qparams = self.weight_qparams.get((id(node), slot.weight_index))
        if input_qparams is None or weight_qparams is None:
            return
        bias = constant_array(node.inputs[slot.index])
        scale = (input_qparams.scale.astype(np.float64) * weight_qparams.scale.astype(np.float64))
        scale = np.broadcast_to(scale, bias.shape)
        if slot.own_scale:
            scale = np.maximum(scale, np.abs(bias.astype(np.float64)) / INT32.qmax * (1 + 1e-6))
        scale = scale.astype(np.float32)
        qparams = QParams(scale, np.zeros(bias.shape, dtype=np.int32), QuantScheme(INT32, True, 0))
        node.replace_input_with(slot.index, self.dequantized_constant(node.inputs[slot.index], qparams, "bias"))


def _fit_bias_in_int32(weight_qparams: QParams, bias: np.ndarray, input_qparams: QParams) -> QParams:
    """Raise weight scales where bias / (input scale x weight scale) would not fit in int32.

    Happens only for channels with (almost) all-zero weights and a non-zero bias.
    """
    needed = np.abs(bias.astype(np.float64)) / (float(input_qparams.scale) * INT32.qmax)
    scale = weight_qparams.scale.astype(np.float64)
    if np.all(scale >= needed):
        return weight_qparams
    if scale.ndim == 0:
        needed = needed.max()
    widened = np.maximum(scale, needed * (1 + 1e-6)).astype(np.float32)
    return QParams(widened, weight_qparams.zero_point, weight_qparams.scheme)


def activation_qparams(plan: QuantPlan, ranges: dict[str, tuple[float, float]],
                       value_counts: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                       recorded_scales: Mapping[str, float] | None = None) -> dict[str, QParams]:
    """One set of parameters per scale-sharing group, from the union of its members' ranges.

    A group is 16-bit when any member is (an int16 reader widens the whole group). A 16-bit
    range reaches :data:`WIDE_HEADROOM` times beyond what calibration saw: one bit of 16 buys
    room for inputs larger than the calibration's, which an int8 grid cannot afford.
    ``value_counts`` (the distinct calibration values of graph inputs, with their counts) keeps
    those inputs off the grid's rounding ties (:func:`~lowbit.quantizers.ties.off_ties`);
    ``recorded_scales`` (a lowbit calibration table's) bring such a widening back without them.
    """
    qparams: dict[str, QParams] = {}
    for members in plan.groups().values():
        lows, highs = zip(*(ranges[name] for name in members))
        scheme = plan.activation_scheme(members[0])
        headroom = WIDE_HEADROOM if scheme.qtype.bits == 16 else 1.0
        shared = compute_qparams(headroom * min(lows), headroom * max(highs), scheme)
        counted = [value_counts[name] for name in members if value_counts and name in value_counts]
        if counted:
            values, counts = (np.concatenate(parts) for parts in zip(*counted))
            shared = off_ties(shared, values, counts)
        recorded = {recorded_scales[name] for name in members if recorded_scales and name in recorded_scales}
        if len(recorded) == 1:
            shared = as_recorded(shared, recorded.pop())
        for name in members:
            qparams[name] = shared
    return qparams


def apply_plan(model: ir.Model, plan: QuantPlan, activation_qparams: dict[str, QParams]) -> None:
    """Rewrite the model in place: Q/DQ on planned activations, integer weights and biases, error
    compensation and float16 nodes."""
    rewriter = _Rewriter(model.graph, activation_qparams, plan)
    for name, value in plan.activations.items():
        rewriter.quantize_activation(value, activation_qparams[name])
    biases = {(id(slot.node), slot.weight_index): slot for slot in plan.biases}
    for slot in plan.weights:
        rewriter.quantize_weight(slot.node, slot.index, slot.scheme, biases.get((id(slot.node), slot.index)))
    for slot in plan.biases:
        rewriter.quantize_bias(slot)
    compensate_errors(model.graph, plan.compensated, rewriter.float_weights, plan.target.activation)
    compute_in_float16(model.graph, plan.float16_nodes)
    ir.passes.Sequential(
        ir.passes.common.RemoveUnusedNodesPass(),
        ir.passes.common.TopologicalSortPass(),
    )(model)
