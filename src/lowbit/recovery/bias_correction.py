"""Empirical bias correction (MindSpore's ``bias_correction``, DFQ's idea, measured on data).

Rounding a weight to 8 bits changes what each output channel computes by
``(W_q - W) * x``. Its mean over the data, the shift of the channel's output, is not
zero: in depthwise and stem convolutions it is large enough to move the class scores
(DFQ, Nagel et al. 2019). The correction measures the shift and takes it out of the bias.

Rule, for each Conv (any group) and Gemm of the quantized model whose weight is stored
as integers (full quantization or weight-only):

    shift = mean_c( Conv(x_q, W_q) ) - mean_c( Conv(x_q, W) )
    bias' = bias - shift          (int32 with the same scale where the input is quantized,
                                   float32 otherwise; added where absent)

Both terms are measured in one streaming pass of ONNX Runtime over the calibration data
on the *quantized* model, each layer with a "shadow" copy that applies the float weight
to the same quantized input. The shift is therefore the layer's own error given what
really reaches it, and correcting every layer at once does not double-count errors
coming from layers above.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from ..calibration.observers import MeanObserver
from ..graph.query import attribute, constant_array
from ..quantizers.qdq import add_initializer, dequantize_node
from ..quantizers.qparams import INT32

CORRECTABLE = ("Conv", "Gemm")


@dataclass(frozen=True)
class Layer:
    """A layer to correct, with the float weight and bias it had before quantization."""

    node: ir.Node
    float_weight: np.ndarray
    float_bias: np.ndarray | None


@dataclass
class BiasCorrectionReport:
    layers: int
    samples: int
    seconds: float
    largest_shift: float  # the largest |shift| corrected, in units of the output


def correctable(node: ir.Node) -> bool:
    if node.op_type not in CORRECTABLE:
        return False
    if node.op_type == "Gemm" and (attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0
                                   or attribute(node, "beta", 1.0) != 1.0):
        return False
    return True


def dequantize_source(value: ir.Value) -> ir.Node | None:
    producer = value.producer() if value is not None else None
    return producer if producer is not None and producer.op_type == "DequantizeLinear" else None


@dataclass
class CorrectionJob:
    """The layers to correct, the measuring model (with a shadow of each), and the shift observer of each."""

    layers: list[Layer]
    model: onnx.ModelProto
    observers: dict[str, MeanObserver]


def plan_correction(model: ir.Model, layers: list[Layer]) -> CorrectionJob:
    """The measuring model: the quantized model plus, per layer, its float-weight shadow and the difference."""
    layers = [layer for layer in layers if dequantize_source(layer.node.inputs[1]) is not None]
    proto = with_dequantized_constants(ir.serde.serialize_model(model))
    observers: dict[str, MeanObserver] = {}
    for i, layer in enumerate(layers):
        node = layer.node
        shadow_out, difference = f"lowbit_bias_correction_{i}_float", f"lowbit_bias_correction_{i}"
        weight_name = f"{shadow_out}_weight"
        proto.graph.initializer.append(numpy_helper.from_array(layer.float_weight, weight_name))
        shadow = onnx.helper.make_node(node.op_type, [node.inputs[0].name, weight_name], [shadow_out],
                                       name=f"{shadow_out}_node")
        shadow.attribute.extend(ir.serde.serialize_attribute(a) for a in node.attributes.values())
        # one output per layer: (quantized output) - (float weight on the same input)
        subtract = onnx.helper.make_node("Sub", [node.outputs[0].name, shadow_out], [difference],
                                         name=f"{difference}_node")
        proto.graph.node.extend([shadow, subtract])
        observers[difference] = MeanObserver(1 if node.op_type == "Conv" else -1)
    return CorrectionJob(layers, proto, observers)


def correct_biases(model: ir.Model, job: CorrectionJob, samples: int, start: float) -> BiasCorrectionReport:
    """Fold each layer's measured output shift (``job``'s observers) into its bias, in place."""
    largest = 0.0
    for i, layer in enumerate(job.layers):
        node = layer.node
        # mean of Conv(x_q, W_q) + current bias - Conv(x_q, W): the shift, plus the bias in place now
        shift_plus_bias = job.observers[f"lowbit_bias_correction_{i}"].mean()
        current = _current_bias(node, shift_plus_bias.shape[0])
        float_bias = layer.float_bias if layer.float_bias is not None else np.zeros_like(current)
        shift = shift_plus_bias - current
        largest = max(largest, float(np.max(np.abs(shift))))
        _set_bias(model.graph, node, float_bias - shift)
    ir.passes.common.RemoveUnusedNodesPass()(model)  # the biases replaced by new initializers
    return BiasCorrectionReport(len(job.layers), samples, time.perf_counter() - start, largest)


def with_dequantized_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The measuring model with weights and biases stored dequantized (the same float values).

    ONNX Runtime would otherwise run every weight's DequantizeLinear on every batch: the
    layers under measurement are not fused into integer kernels, so nothing folds them.
    """
    constants = {t.name: t for t in proto.graph.initializer}
    kept = []
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and all(name in constants for name in node.input):
            q, scale, *zero = (numpy_helper.to_array(constants[name]) for name in node.input)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if scale.ndim == 1 and q.ndim > 1:
                shape = [1] * q.ndim
                shape[axis] = -1
                scale = scale.reshape(shape)
                zero = [z.reshape(shape) for z in zero]
            values = (q.astype(np.float64) - (zero[0].astype(np.float64) if zero else 0)) * scale
            proto.graph.initializer.append(numpy_helper.from_array(values.astype(np.float32), node.output[0]))
        else:
            kept.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    return proto


def _scales(node: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(input scale, weight scale) of an int8 layer, or None when the layer is not int8."""
    x_dq, w_dq = dequantize_source(node.inputs[0]), dequantize_source(node.inputs[1])
    if x_dq is None or w_dq is None:
        return None
    x_scale, w_scale = constant_array(x_dq.inputs[1]), constant_array(w_dq.inputs[1])
    if x_scale is None or w_scale is None or x_scale.size != 1:
        return None
    return x_scale.astype(np.float64), w_scale.astype(np.float64)


def _has_float_bias(node: ir.Node) -> bool:
    return len(node.inputs) > 2 and constant_array(node.inputs[2]) is not None


def _current_bias(node: ir.Node, channels: int) -> np.ndarray:
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return np.zeros(channels)
    dq = dequantize_source(node.inputs[2])
    if dq is None:
        return constant_array(node.inputs[2]).astype(np.float64).reshape(-1)
    return constant_array(dq.inputs[0]).astype(np.float64) * constant_array(dq.inputs[1]).astype(np.float64)


def _set_bias(graph: ir.Graph, node: ir.Node, bias: np.ndarray) -> None:
    """Store the corrected bias: as int32 with scale = input scale x weight scale when the input is
    quantized (integer kernels add it in int32), else as float32 (weight-only models)."""
    dq = dequantize_source(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    own_dq = dq is not None and len(dq.outputs[0].uses()) == 1 and constant_array(dq.inputs[0]) is not None
    scales = _scales(node)
    if own_dq:
        scale = constant_array(dq.inputs[1]).astype(np.float32)
    elif scales is not None and dq is None and not _has_float_bias(node):
        x_scale, w_scale = scales
        scale = np.broadcast_to(x_scale.reshape(()) * w_scale, bias.shape).astype(np.float32)
    else:
        value = add_initializer(graph, f"{node.name}_bias_corrected", bias.astype(np.float32))
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        node.replace_input_with(2, value)
        return
    quantized = np.clip(np.rint(bias / scale.astype(np.float64)), -INT32.qmax, INT32.qmax).astype(np.int32)
    if own_dq:
        dq.inputs[0].const_value = ir.tensor(quantized, name=dq.inputs[0].name)
        return
    q = add_initializer(graph, f"{node.name}_bias_quantized", quantized)
    scale_value = add_initializer(graph, f"{node.name}_bias_scale", scale)
    dequantized = dequantize_node(graph, q, scale_value, None, 0, f"{node.name}_bias_dequantized")
    graph.insert_before(node, dequantized.producer())
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, dequantized)
