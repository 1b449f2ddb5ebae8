"""The layers whose weights the recovery passes refine, seen the way their statistics see them.

A Conv, Gemm or MatMul computes, per output channel, ``w . p`` for every input row
``p`` it reads (a patch of a Conv's input, a row of a matrix). GPTQ and bias correction
both reason on the weight as rows, ``(groups, outputs per group, D)``, and on the input
statistics of :class:`~lowbit.calibration.layer_inputs.LayerInputObserver`; this module
turns a graph node into those shapes and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from ..calibration.layer_inputs import ConvGeometry, LayerInputObserver
from ..graph.query import attribute, constant_array

# Calibration samples the layer-input statistics read (GPTQ's second moments, bias correction's
# means): a 14x14 map gives 196 patches a sample, so 64 samples give thousands per layer; more
# samples cost a copy per layer each and changed neither the agreement nor the cosine measurably
# (bench/RESULTS.md, issue 19's note).
SAMPLES = 64


@dataclass(frozen=True)
class Layer:
    """A layer to refine, with the float weight and bias it had before quantization."""

    node: ir.Node
    float_weight: np.ndarray
    float_bias: np.ndarray | None


def dequantize_source(value: ir.Value) -> ir.Node | None:
    producer = value.producer() if value is not None else None
    return producer if producer is not None and producer.op_type == "DequantizeLinear" else None


def integer_weight(node: ir.Node) -> ir.Node | None:
    """The DequantizeLinear over a constant integer tensor that feeds the node's weight, if any."""
    dq = dequantize_source(node.inputs[1]) if len(node.inputs) > 1 else None
    if dq is None or constant_array(dq.inputs[0]) is None or constant_array(dq.inputs[1]) is None:
        return None
    return dq if dq.inputs[0].const_value.dtype.is_integer() else None  # int4 included (numpy sees a void type)


def dequantized_weight(dq: ir.Node) -> np.ndarray:
    """The float values a constant DequantizeLinear gives, in float64 (any axis, any block size absent)."""
    q = constant_array(dq.inputs[0]).astype(np.float64)
    scale = constant_array(dq.inputs[1]).astype(np.float64)
    zero = constant_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    zero = np.zeros_like(scale) if zero is None else zero.astype(np.float64)
    if scale.ndim == 1 and q.ndim > 1:
        shape = [1] * q.ndim
        shape[attribute(dq, "axis", 1)] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q - zero) * scale


def conv_geometry(node: ir.Node, weight_shape: tuple[int, ...]) -> ConvGeometry | None:
    """The patch geometry of a 1-D or 2-D Conv with explicit pads (1-D as a 2-D of height 1); None otherwise."""
    if node.op_type != "Conv" or len(weight_shape) not in (3, 4) \
            or attribute(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    spatial = len(weight_shape) - 2
    pads = tuple(attribute(node, "pads", (0,) * 2 * spatial))
    strides = tuple(attribute(node, "strides", (1,) * spatial))
    dilations = tuple(attribute(node, "dilations", (1,) * spatial))
    group = int(attribute(node, "group", 1))
    if spatial == 1:
        return ConvGeometry(kernel=(1, weight_shape[2]), group=group, strides=(1, strides[0]),
                            pads=(0, pads[0], 0, pads[1]), dilations=(1, dilations[0]))
    return ConvGeometry(kernel=tuple(weight_shape[2:]), group=group, strides=strides, pads=pads,
                        dilations=dilations)


def reads_rows(node: ir.Node) -> bool:
    """Whether the layer's input statistics can be taken: a 1-D/2-D Conv with explicit pads,
    a Gemm without transA, or a MatMul, reading a constant-shaped weight."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    shape = weight.shape if weight is not None else None
    if shape is None:
        return False
    if node.op_type == "Conv":
        return conv_geometry(node, tuple(shape)) is not None
    if node.op_type == "Gemm":
        return len(shape) == 2 and not attribute(node, "transA", 0)
    return node.op_type == "MatMul" and len(shape) == 2


InputKey = tuple[str, ConvGeometry | None]  # the input tensor's name, and the window a layer reads it with


def input_observer(node: ir.Node, weight_shape: tuple[int, ...], observers: dict[InputKey, LayerInputObserver],
                   order: int, tensor: str | None = None) -> InputKey:
    """The key of the observer of the node's input's ``order``-th moments in ``observers``, added there when new.

    Layers that read one tensor with the same window share an observer; two windows over
    one tensor (a 1x1 and a 3x3 Conv on the same input) get one each. ``tensor``: the
    tensor to observe instead of the node's input (a joined one, :mod:`lowbit.recovery.paired`).
    """
    geometry = conv_geometry(node, weight_shape)
    key = (tensor or node.inputs[0].name, geometry)
    observers.setdefault(key, LayerInputObserver(geometry, orders=(order,)))
    return key


@dataclass
class LayerJob:
    """Layers to refine, each with the key of its input's observer (several layers may share one)."""

    layers: list[tuple[Any, InputKey]]  # (a Layer or RoundingLayer: .node and .float_weight, its key)
    observers: dict[InputKey, LayerInputObserver]


def plan_layer_inputs(layers: list, order: int, tensors: dict[str, str] | None = None) -> LayerJob:
    """The layers whose weight is stored as integers, with an observer of the ``order``-th moments of each input
    (of the tensor ``tensors`` names for the layer's node, when it names one)."""
    job = LayerJob([], {})
    for layer in layers:
        if integer_weight(layer.node) is not None:
            tensor = (tensors or {}).get(layer.node.name)
            job.layers.append((layer, input_observer(layer.node, layer.float_weight.shape, job.observers, order,
                                                     tensor)))
    return job


def in_stages(job: LayerJob, graph: ir.Graph) -> list[LayerJob]:
    """``job`` split into stages, in graph order: a layer's stage is one more than the latest stage of the job's
    layers upstream of it (0 when none is).

    Measuring stage k's inputs after stages 0..k-1 are re-rounded gives each layer the inputs
    the finished model will feed it, not those of upstream weights rounded to nearest: layer
    after layer on the inputs of the already-quantized layers, as AdaRound (Nagel et al., 2020)
    reconstructs. Layers that share an observer read the same tensor, so they share a stage.
    The graph's nodes are in topological order (ONNX requires it).
    """
    stage_of_node = {id(layer.node): 0 for layer, _ in job.layers}
    depth: dict[int, int] = {}  # id of a value -> how many of the job's layers lie on the longest path to it
    for node in graph:
        reach = max((depth.get(id(value), 0) for value in node.inputs if value is not None), default=0)
        if id(node) in stage_of_node:
            stage_of_node[id(node)] = reach
            reach += 1
        for value in node.outputs:
            depth[id(value)] = reach
    stages: list[LayerJob] = []
    for layer, key in job.layers:
        index = stage_of_node[id(layer.node)]
        while len(stages) <= index:
            stages.append(LayerJob([], {}))
        stages[index].layers.append((layer, key))
        stages[index].observers[key] = job.observers[key]
    return [stage for stage in stages if stage.layers]


def by_tensor(observers: dict[InputKey, LayerInputObserver]) -> list[dict[str, LayerInputObserver]]:
    """The observers as dicts keyed by tensor name (what a run's request takes): one dict per window of a tensor."""
    requests: list[dict[str, LayerInputObserver]] = []
    for (name, _), observer in observers.items():
        free = next((request for request in requests if name not in request), None)
        if free is None:
            requests.append(free := {})
        free[name] = observer
    return requests


def as_rows(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """The weight as (groups, outputs per group, D): one row per output channel."""
    if node.op_type == "Conv":
        group = int(attribute(node, "group", 1))
        return weight.reshape(group, weight.shape[0] // group, -1)
    if node.op_type == "Gemm" and attribute(node, "transB", 0):
        return weight[np.newaxis]
    return weight.T[np.newaxis]  # MatMul and Gemm: (K, N) -> N rows of K


def per_row(values, rows_shape: tuple[int, int]) -> np.ndarray:
    """One value per output channel (or one for all), as float64 shaped like the rows' first two axes."""
    flat = np.asarray(values, np.float64).reshape(-1)
    return np.broadcast_to(flat, (rows_shape[0] * rows_shape[1],)).reshape(rows_shape)


def from_rows(node: ir.Node, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if node.op_type == "Conv" or (node.op_type == "Gemm" and attribute(node, "transB", 0)):
        return rows.reshape(shape)
    return rows[0].T
