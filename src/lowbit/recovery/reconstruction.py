"""Block reconstruction: AdaRound over blocks of layers, on the quantized graph itself, in torch.

Why: GPTQ and lowbit's AdaRound choose each layer's integers against that layer's linear output alone
(the second moment of its input). Below 8 bits that leaves much of the error: what the next block reads
is a block's output after its activations (Clip, Relu), its depthwise and pointwise layers together and
its residual Add. Rounding the weights of a block together against that output, on inputs from the
already-quantized blocks before it, is BRECQ's recipe (Li et al. 2021, AdaRound per block).

How:

* :func:`blocks`: the graph is cut where a single tensor carries everything later nodes read (a
  residual block's output, a chain's activation); consecutive pieces are joined until each holds at
  least :data:`MIN_LAYERS` learned layers. Graph inputs after the first (masks, token types), and what is
  computed from them alone, are read by any block.
* :func:`reconstruct`: block after block, the float block's output from the float input is the target,
  and the quantized block reads what the quantized blocks before it gave. Each weight rounds down or up
  by a rectified sigmoid ``h(V)`` (Nagel et al. 2020), learned with Adam on the squared output error plus
  AdaRound's regulariser, whose exponent anneals from 20 to 2 after a warm-up. Activations keep their
  calibrated Q/DQ (fake quantization with a straight-through gradient). A block whose learned integers
  leave more error than the ones it started from (GPTQ's, or nearest) on samples held back from learning
  keeps those.
* Only the integers change: scales, zero points, file size and graph are as before.

:class:`GraphRunner` evaluates the ONNX nodes with torch functions (the ops of :data:`OPS`); an op
outside them is a clear error naming it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from ..errors import LowbitError
from ..graph.query import attribute, constant_array
from .gptq import RoundingLayer
from .layers import dequantized_weight, integer_weight

MIN_LAYERS = 2  # learned layers per block at least (a single layer is AdaRound's own case)
ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (Nagel et al. 2020)
WARM_UP = 0.2  # share of the iterations before the regulariser starts
REGULARISER = 0.01  # its weight against the output error (AdaRound's and BRECQ's default)
BETA = (20.0, 2.0)  # its exponent, annealed from the first to the second
LEARNING_RATE = 3e-2  # for V: the iterations are few (hundreds, not AdaRound's 10 000), so the steps are long
BATCH = 16  # samples per step
START = 0.85  # h(V) at the start: near the starting integer, where the sigmoid still has a gradient
# One sample in this many is held back from learning and judges whether a block keeps its learned integers (with
# fewer than two such samples, all samples learn and judge): judged on the samples it learned from, PP-OCRv4 rec at
# W4A8 kept blocks that fitted its 64 calibration strips and lost on held-out text (1 - cosine 0.069 -> 0.100).
JUDGED_SHARE = 4


def _torch():
    try:
        import torch
    except ImportError:
        raise LowbitError("block_reconstruction learns with torch, which is not installed: "
                          "pip install 'lowbit[reconstruction]' (install torch==2.13.0 first for the CPU wheel)"
                          ) from None
    return torch


@dataclass(frozen=True)
class Block:
    """Nodes that read one tensor (``source``; graph inputs aside) and hand one on (``result``)."""

    nodes: list[ir.Node]
    source: str
    result: str
    layers: list[str]  # the learned layers' node names


@dataclass
class BlockRow:
    result: str
    names: list[str]  # its learned layers
    error_before: float  # mean squared error of the block's output against the float block's (held-back samples)
    error_after: float
    kept: bool  # the learned integers were kept (else the block keeps its starting integers)


@dataclass
class ReconstructionReport:
    iterations: int
    samples: int
    judged: int = 0  # samples held back from learning, on which the block errors are measured (0: all samples)
    seconds: float = 0.0
    rows: list[BlockRow] = field(default_factory=list)

    @property
    def improved(self) -> int:
        return sum(row.kept for row in self.rows)


def blocks(graph: ir.Graph, learned: set[str]) -> list[Block]:
    """Cut the graph (topologically sorted) into blocks of at least :data:`MIN_LAYERS` learned layers."""
    nodes = list(graph)
    outputs = {value.name for value in graph.outputs}
    last_use: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for value in node.inputs:
            if value is not None:
                last_use[value.name] = index
    static = _static_values(nodes, {value.name for value in graph.inputs[1:]})
    cuts, live = [], set()
    for index, node in enumerate(nodes):
        live |= {v.name for v in node.outputs if v.name not in static and (v.name in last_use or v.name in outputs)}
        live = {name for name in live if last_use.get(name, -1) > index or name in outputs}
        if live == {node.outputs[0].name} and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            cuts.append(index)
    counts = np.cumsum([node.name in learned for node in nodes])

    def learned_in(first: int, last: int) -> int:
        return int(counts[last] - (counts[first - 1] if first else 0))

    result, first, source = [], 0, graph.inputs[0].name
    for position, cut in enumerate(cuts):
        following = cuts[position + 1] if position + 1 < len(cuts) else len(nodes) - 1
        # close a block at the last cut before the next learned layer, so its activation is inside it
        if learned_in(first, cut) >= MIN_LAYERS and learned_in(cut + 1, following) > 0:
            result.append(_block(nodes, first, cut, source, learned))
            first, source = cut + 1, nodes[cut].outputs[0].name
    if learned_in(first, len(nodes) - 1):
        last = len(nodes) - 1
        if len(graph.outputs) != 1 or nodes[last].outputs[0].name != graph.outputs[0].name:
            last = max(i for i, n in enumerate(nodes) if any(v.name in outputs for v in n.outputs))
        result.append(_block(nodes, first, last, source, learned))
    return result


def _block(nodes: list[ir.Node], first: int, last: int, source: str, learned: set[str]) -> Block:
    part = nodes[first:last + 1]
    return Block(part, source, nodes[last].outputs[0].name, [n.name for n in part if n.name in learned])


def _static_values(nodes: list[ir.Node], side_inputs: set[str]) -> set[str]:
    """Values any block computes for itself: from shapes, constants and the side inputs (graph inputs after the
    first: an attention mask, token types) only. Dequantized weights and biases, shape computations (Shape ->
    Gather -> Concat -> Reshape's shape), a mask turned into an attention bias: they do not carry one block's
    result to the next, so they do not stop a cut."""
    static: set[str] = set(side_inputs)
    for node in nodes:
        if node.op_type in ("Shape", "Constant") or (
                node.inputs and all(v is None or v.name in static or v.const_value is not None for v in node.inputs)):
            static.update(v.name for v in node.outputs)
    return static


class Rounding:
    """One layer's weight as ``scale * (clip(floor(w / scale) + h(V), qmin, qmax) - zero)``."""

    def __init__(self, torch, layer: RoundingLayer, dq: ir.Node):
        self.torch, self.dq, self.node_name = torch, dq, layer.node.name
        stored = constant_array(dq.inputs[0])
        scale = constant_array(dq.inputs[1]).astype(np.float32)
        zero = constant_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
        zero = np.zeros_like(scale) if zero is None else zero.astype(np.float32)
        shape = [1] * stored.ndim
        if scale.ndim:
            shape[attribute(dq, "axis", 1)] = -1
        self.scale = torch.tensor(scale.reshape(shape))
        self.zero = torch.tensor(zero.reshape(shape))
        self.qmin, self.qmax = float(layer.qmin), float(layer.qmax)
        self.start = stored.astype(np.int64)  # the integers before reconstruction (GPTQ's, or nearest)
        scaled = torch.tensor(layer.float_weight.astype(np.float32).reshape(stored.shape)) / self.scale + self.zero
        # each weight chooses between its starting integer and the neighbour on the float weight's side (GPTQ
        # may have moved it further than floor or ceil), and starts near its starting integer: learning from
        # the float weights' fractions instead lost to GPTQ on 8 of EfficientNet-Lite0's 19 blocks at W4A8
        start = torch.tensor(self.start, dtype=torch.float32)
        above = start > scaled
        self.floor = torch.where(above, start - 1, start) - self.zero
        rest = torch.where(above, torch.tensor(START), torch.tensor(1 - START))
        self.V = torch.nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.hard = False  # after learning: V's sign chooses
        self.use_start = False  # the starting integers (before learning, or when learning did not help)

    def h(self):
        return (self.torch.sigmoid(self.V) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def integers(self):
        if self.use_start:
            return self.torch.tensor(self.start, dtype=self.torch.float32)
        return (self.floor + (self.V >= 0).float() + self.zero).clamp(self.qmin, self.qmax)

    def weight(self):
        if self.hard or self.use_start:
            return self.scale * (self.integers() - self.zero)
        return self.scale * ((self.floor + self.h() + self.zero).clamp(self.qmin, self.qmax) - self.zero)

    def regulariser(self, beta: float):
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def learned(self) -> np.ndarray:
        return self.integers().detach().numpy().astype(np.int64)


class GraphRunner:
    """Evaluate graph nodes with torch: quantized (learned weights, fake-quantized activations) or float."""

    def __init__(self, torch, graph: ir.Graph, roundings: dict[str, Rounding], float_values: dict[str, np.ndarray]):
        self.torch, self.graph = torch, graph
        self.roundings = roundings  # by the name of the DequantizeLinear output they replace
        self.float_values = {name: torch.tensor(array.astype(np.float32)) for name, array in float_values.items()}
        self.producer = {v.name: node for node in graph for v in node.outputs}
        self.constants: dict[str, Any] = {}
        self.shapes: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # Shape's inputs at batch 1 and 2

    def value(self, value: ir.Value, env: dict, quantized: bool):
        name = value.name
        if name in env:
            return env[name]
        if name in self.roundings:
            return self.roundings[name].weight() if quantized else self.float_values[name]
        if not quantized and name in self.float_values:
            return self.float_values[name]
        if name not in self.constants:
            producer = self.producer.get(name)
            if value.const_value is not None:
                self.constants[name] = self.tensor(value.const_value.numpy())
            elif producer is not None and producer.op_type == "DequantizeLinear" \
                    and constant_array(producer.inputs[0]) is not None:
                self.constants[name] = self.torch.tensor(dequantized_weight(producer).astype(np.float32))
            elif producer is not None:  # a shape computation: evaluate it here
                self.run([producer], env, quantized)
                return env[name]
            else:
                raise LowbitError(f"block_reconstruction: value {name!r} is neither computed nor given")
        return self.constants[name]

    def tensor(self, array: np.ndarray):
        return _as_tensor(self.torch, array)

    def run(self, nodes: list[ir.Node], env: dict, quantized: bool) -> dict:
        for node in nodes:
            if any(v.name in env for v in node.outputs):
                continue
            if node.op_type == "DequantizeLinear" and constant_array(node.inputs[0]) is not None:
                continue  # weights and biases: read where they are used
            if node.op_type == "Shape":
                env[node.outputs[0].name] = _shape_part(node, self._shape(node.inputs[0].name, env))
                continue
            rule = OPS.get(node.op_type)
            if rule is None:
                raise LowbitError(f"block_reconstruction: node {node.name!r} is a {node.op_type}, which it cannot "
                                  f"run in torch (it runs {', '.join(sorted(OPS))})")
            args = [None if v is None else self.value(v, env, quantized) for v in node.inputs]
            if node.op_type == "DequantizeLinear" and quantized:
                args.append(self._q_range(node))
            elif node.op_type == "DequantizeLinear":
                env[node.outputs[0].name] = args[0]
                continue
            result = rule(self.torch, node, *args)
            for value, tensor in zip(node.outputs, result if isinstance(result, tuple) else (result,)):
                if value is not None:
                    env[value.name] = tensor
        return env

    def _q_range(self, dq: ir.Node) -> tuple[float, float]:
        q = self.producer.get(dq.inputs[0].name)
        zero = q.inputs[2] if q is not None and len(q.inputs) > 2 else None
        dtype = zero.const_value.dtype if zero is not None and zero.const_value is not None else ir.DataType.UINT8
        info = np.iinfo(dtype.numpy()) if dtype.bitwidth >= 8 else None
        if info is None:
            return (-8.0, 7.0) if dtype.is_signed() else (0.0, 15.0)
        return float(info.min), float(info.max)

    def _shape(self, name: str, env: dict):
        """The shape of ``name`` at the batch the block runs on: linear in the batch (measured at 1 and 2)."""
        one, two = self.shapes[name]
        batch = next(iter(t.shape[0] for t in env.values() if hasattr(t, "shape") and len(t.shape)))
        return self.torch.tensor(one + (two - one) * (batch - 1))

    def record_shapes(self, feeds_one: dict, feeds_two: dict) -> None:
        wanted = {node.inputs[0].name for node in self.graph if node.op_type == "Shape"}
        if not wanted:
            return
        shapes = []
        for feeds in (feeds_one, feeds_two):
            env = dict(feeds)
            for node in self.graph:
                if node.op_type == "Shape":
                    env[node.outputs[0].name] = _shape_part(node, self.torch.tensor(env[node.inputs[0].name].shape))
                else:
                    self.run([node], env, quantized=False)
            shapes.append({name: np.array(env[name].shape) for name in wanted})
        self.shapes = {name: (shapes[0][name], shapes[1][name]) for name in wanted}


# -- the ops -------------------------------------------------------------------------------------------------

def _as_tensor(torch, array: np.ndarray):
    """float32 for floats, int64 for integers (indices, shapes): the two types the runner computes in."""
    return torch.tensor(array.astype(np.float32 if array.dtype.kind == "f" else np.int64))


def _shape_part(node: ir.Node, shape):
    """Shape's output: the dimensions from ``start`` to ``end`` (opset 15)."""
    return shape[attribute(node, "start", 0):attribute(node, "end", None)]


def _conv(torch, node, x, w, b=None):
    if attribute(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise LowbitError(f"block_reconstruction: Conv {node.name!r} uses auto_pad, which it does not run")
    spatial = w.ndim - 2
    pads = list(attribute(node, "pads", [0] * 2 * spatial))
    padding = [p for i in reversed(range(spatial)) for p in (pads[i], pads[i + spatial])]
    x = torch.nn.functional.pad(x, padding) if any(padding) else x
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[spatial]
    return conv(x, w, b, list(attribute(node, "strides", [1] * spatial)), 0,
                list(attribute(node, "dilations", [1] * spatial)), attribute(node, "group", 1))


def _gemm(torch, node, a, b, c=None):
    a = a.T if attribute(node, "transA", 0) else a
    b = b.T if attribute(node, "transB", 0) else b
    out = attribute(node, "alpha", 1.0) * (a @ b)
    return out if c is None else out + attribute(node, "beta", 1.0) * c


def _clip(torch, node, x, low=None, high=None):
    low = attribute(node, "min", None) if low is None else float(low)
    high = attribute(node, "max", None) if high is None else float(high)
    return torch.clamp(x, low, high)


def _fake_quantize(torch, node, x, scale, zero=None, limits=(0.0, 255.0)):
    zero = torch.zeros_like(scale) if zero is None else zero.float()
    if scale.ndim:  # per axis
        shape = [1] * x.ndim
        shape[attribute(node, "axis", 1)] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    scaled = x / scale + zero
    rounded = scaled + (torch.round(scaled) - scaled).detach()  # straight through
    return (rounded.clamp(*limits) - zero) * scale


def _reshape(torch, node, x, shape):
    shape = [x.shape[i] if int(s) == 0 and not attribute(node, "allowzero", 0) else int(s)
             for i, s in enumerate(shape.tolist())]
    return x.reshape(shape)


def _pool(kind: str) -> Callable:
    def pool(torch, node, x):
        kernel = list(attribute(node, "kernel_shape"))
        spatial = len(kernel)
        pads = list(attribute(node, "pads", [0] * 2 * spatial))
        if pads[:spatial] != pads[spatial:]:
            x = torch.nn.functional.pad(x, [p for i in reversed(range(spatial)) for p in (pads[i], pads[i + spatial])],
                                        value=-float("inf") if kind == "max" else 0.0)
            pads = [0] * 2 * spatial
        strides = list(attribute(node, "strides", [1] * spatial))
        function = getattr(torch.nn.functional, f"{kind}_pool{spatial}d")
        extra = {} if kind == "max" else {"count_include_pad": bool(attribute(node, "count_include_pad", 0))}
        return function(x, kernel, strides, pads[:spatial], **extra)
    return pool


def _conv_transpose(torch, node, x, w, b=None):
    if attribute(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID") or attribute(node, "output_shape", None):
        raise LowbitError(f"block_reconstruction: ConvTranspose {node.name!r} uses auto_pad or output_shape, "
                          "which it does not run")
    spatial = w.ndim - 2
    pads = list(attribute(node, "pads", [0] * 2 * spatial))
    function = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d,
                3: torch.nn.functional.conv_transpose3d}[spatial]
    out = function(x, w, b, list(attribute(node, "strides", [1] * spatial)), 0,
                   list(attribute(node, "output_padding", [0] * spatial)), attribute(node, "group", 1),
                   list(attribute(node, "dilations", [1] * spatial)))
    crop = tuple(slice(None, None) for _ in range(2)) + tuple(
        slice(pads[i], out.shape[2 + i] - pads[i + spatial]) for i in range(spatial))
    return out[crop]


def _batch_normalization(torch, node, x, scale, bias, mean, var):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    inverse = scale / torch.sqrt(var + attribute(node, "epsilon", 1e-5))
    return (x - mean.reshape(shape)) * inverse.reshape(shape) + bias.reshape(shape)


def _layer_normalization(torch, node, x, scale, bias=None):
    dims = tuple(range(attribute(node, "axis", -1) % x.ndim, x.ndim))
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    out = (x - mean) / torch.sqrt(var + attribute(node, "epsilon", 1e-5)) * scale
    return out if bias is None else out + bias


def _resize(torch, node, x, roi=None, scales=None, sizes=None):
    """Nearest (asymmetric, floor: what torch's "nearest" computes) and linear (half-pixel or align-corners)."""
    mode = attribute(node, "mode", "nearest")
    transform = attribute(node, "coordinate_transformation_mode", "half_pixel")
    if sizes is not None and sizes.numel():
        size = [int(v) for v in sizes.tolist()[2:]]
    else:
        size = [int(np.floor(d * float(f))) for d, f in zip(x.shape[2:], scales.tolist()[2:])]
    if mode == "nearest" and transform == "asymmetric" and attribute(node, "nearest_mode", "round_prefer_floor") \
            == "floor":
        return torch.nn.functional.interpolate(x, size=size, mode="nearest")
    if mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel", "align_corners") and x.ndim == 4:
        return torch.nn.functional.interpolate(x, size=size, mode="bilinear",
                                               align_corners=transform == "align_corners")
    raise LowbitError(f"block_reconstruction: Resize {node.name!r} (mode {mode}, {transform}) is not one it runs "
                      "(nearest asymmetric floor; bilinear half_pixel or align_corners)")


def _slice(torch, node, x, starts=None, ends=None, axes=None, steps=None):
    starts = starts.tolist() if starts is not None else list(attribute(node, "starts"))
    ends = ends.tolist() if ends is not None else list(attribute(node, "ends"))
    axes = axes.tolist() if axes is not None else list(attribute(node, "axes", range(len(starts))))
    steps = steps.tolist() if steps is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        size, end, step = x.shape[axis], int(end), int(step)
        # Python's slice clamps as ONNX does, except that stepping down to an end before the first element is None
        stop = None if step < 0 and end < -size else end
        picked = list(range(*slice(int(start), stop, step).indices(size)))
        x = torch.index_select(x, axis, torch.tensor(picked, dtype=torch.long))
    return x


def _split(torch, node, x, split=None):
    axis = attribute(node, "axis", 0)
    sizes = split.tolist() if split is not None else attribute(node, "split", None)
    if sizes is None:
        parts = len(node.outputs)
        size = x.shape[axis]
        sizes = [-(-size // parts)] * (parts - 1) + [size - -(-size // parts) * (parts - 1)]
    return tuple(torch.split(x, [int(v) for v in sizes], axis))


def _reduce(method: str) -> Callable:
    """ReduceX over ``axes`` (attribute or input); no axes: all of them, or none with noop_with_empty_axes."""
    def reduce(torch, node, x, axes=None):
        found = _axes(node, axes)
        if not found:
            if attribute(node, "noop_with_empty_axes", 0):
                return x
            found = list(range(x.ndim))
        return getattr(x, method)(tuple(found), keepdim=bool(attribute(node, "keepdims", 1)))
    return reduce


def _cast(torch, node, x):
    """Floats compute in float32 and integers in int64 (as the runner's tensors do), booleans stay booleans."""
    target = ir.DataType(attribute(node, "to"))
    if target == ir.DataType.BOOL:
        return x != 0
    return x.float() if target.is_floating_point() else x.long()


def _range(torch, node, start, limit, delta):
    values = torch.arange(start.item(), limit.item(), delta.item())
    return values.float() if start.is_floating_point() else values.long()


def _softmax(torch, node, x):
    """Over one axis from opset 13 on; before it, over all axes from ``axis`` (default 1) on, as one."""
    opset = node.graph.opset_imports.get("", 13) if node.graph is not None else 13
    if opset >= 13:
        return torch.softmax(x, attribute(node, "axis", -1))
    axis = attribute(node, "axis", 1) % x.ndim
    return torch.softmax(x.reshape(*x.shape[:axis], -1), -1).reshape(x.shape)


def _constant(torch, node):
    for name, attr in node.attributes.items():
        return _as_tensor(torch, attr.value.numpy() if name == "value" else np.asarray(attr.value))
    raise LowbitError(f"block_reconstruction: Constant {node.name!r} has no value")


def _where(torch, node, condition, x, y):
    return torch.where(condition.bool(), x, y)


def _axes(node, axes) -> list[int]:
    """The axes operand (opset 13 on) or attribute (before); empty when neither is given."""
    found = attribute(node, "axes", None) if axes is None else axes.tolist()
    return [int(a) for a in found or []]


OPS: dict[str, Callable] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda torch, node, a, b: a @ b,
    "Add": lambda torch, node, a, b: a + b,
    "Sub": lambda torch, node, a, b: a - b,
    "Mul": lambda torch, node, a, b: a * b,
    "Div": lambda torch, node, a, b: a / b,
    "Relu": lambda torch, node, x: torch.relu(x),
    "LeakyRelu": lambda torch, node, x: torch.nn.functional.leaky_relu(x, attribute(node, "alpha", 0.01)),
    "Clip": _clip,
    "Sigmoid": lambda torch, node, x: torch.sigmoid(x),
    "Tanh": lambda torch, node, x: torch.tanh(x),
    "HardSigmoid": lambda torch, node, x: (attribute(node, "alpha", 0.2) * x
                                           + attribute(node, "beta", 0.5)).clamp(0, 1),
    "HardSwish": lambda torch, node, x: torch.nn.functional.hardswish(x),
    "Erf": lambda torch, node, x: torch.erf(x),
    "Sqrt": lambda torch, node, x: torch.sqrt(x),
    "Pow": lambda torch, node, x, y: torch.pow(x, y),
    "Softmax": _softmax,
    "GlobalAveragePool": lambda torch, node, x: x.mean(tuple(range(2, x.ndim)), keepdim=True),
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "Flatten": lambda torch, node, x: x.reshape(int(np.prod(x.shape[:attribute(node, "axis", 1)])), -1),
    "Reshape": _reshape,
    "Transpose": lambda torch, node, x: x.permute(*attribute(node, "perm", list(reversed(range(x.ndim))))),
    "Concat": lambda torch, node, *xs: torch.cat(xs, attribute(node, "axis")),
    "Identity": lambda torch, node, x: x,
    "Gather": lambda torch, node, x, i: torch.index_select(x, attribute(node, "axis", 0), i.reshape(-1)).reshape(
        x.shape[:attribute(node, "axis", 0)] + i.shape + x.shape[attribute(node, "axis", 0) + 1:]),
    "Unsqueeze": lambda torch, node, x, axes=None: _unsqueeze(x, _axes(node, axes)),
    "Squeeze": lambda torch, node, x, axes=None: x.squeeze(tuple(_axes(node, axes))) if _axes(node, axes) else
    x.squeeze(),
    "ReduceMean": _reduce("mean"),
    "ReduceMax": _reduce("amax"),
    "ReduceMin": _reduce("amin"),
    "ReduceSum": _reduce("sum"),
    "ConvTranspose": _conv_transpose,
    "BatchNormalization": _batch_normalization,
    "LayerNormalization": _layer_normalization,
    "Resize": _resize,
    "Slice": _slice,
    "Split": _split,
    "Cast": _cast,
    "Range": _range,
    "Where": _where,
    "Constant": _constant,
    "Expand": lambda torch, node, x, shape: x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(shape.tolist()))),
    "Equal": lambda torch, node, a, b: a == b,
    "Less": lambda torch, node, a, b: a < b,
    "Greater": lambda torch, node, a, b: a > b,
    "Not": lambda torch, node, x: ~x.bool(),
    "Max": lambda torch, node, *xs: _fold(torch.maximum, xs),
    "Min": lambda torch, node, *xs: _fold(torch.minimum, xs),
    "Sum": lambda torch, node, *xs: _fold(torch.add, xs),
    "Neg": lambda torch, node, x: -x,
    "Abs": lambda torch, node, x: torch.abs(x),
    "Exp": lambda torch, node, x: torch.exp(x),
    "Log": lambda torch, node, x: torch.log(x),
    "Reciprocal": lambda torch, node, x: 1.0 / x,
    "Gelu": lambda torch, node, x: torch.nn.functional.gelu(x, approximate=attribute(node, "approximate", "none")),
    "PRelu": lambda torch, node, x, slope: torch.where(x >= 0, x, x * slope),
    "Elu": lambda torch, node, x: torch.nn.functional.elu(x, attribute(node, "alpha", 1.0)),
    "Softplus": lambda torch, node, x: torch.nn.functional.softplus(x),
    "GlobalMaxPool": lambda torch, node, x: x.amax(tuple(range(2, x.ndim)), keepdim=True),
    "QuantizeLinear": lambda torch, node, x, *rest: x,  # its DequantizeLinear does the fake quantization
    "DequantizeLinear": _fake_quantize,
}


def _fold(function: Callable, xs):
    result = xs[0]
    for x in xs[1:]:
        result = function(result, x)
    return result


def _unsqueeze(x, axes: list[int]):
    for axis in sorted(a % (x.ndim + len(axes)) for a in axes):
        x = x.unsqueeze(axis)
    return x


# -- the loop ---------------------------------------------------------------------------------------------------

def reconstruct(model: ir.Model, layers: list[RoundingLayer], samples: list[dict[str, np.ndarray]],
                float_biases: dict[str, np.ndarray], iterations: int, seed: int = 0) -> ReconstructionReport:
    """Learn the integers of ``layers`` block by block on ``samples``; write them into ``model``."""
    torch = _torch()
    torch.manual_seed(seed)
    graph = model.graph
    roundings, float_values = {}, {}
    for layer in layers:
        dq = integer_weight(layer.node)
        if dq is None:
            continue
        roundings[dq.outputs[0].name] = Rounding(torch, layer, dq)
        float_values[dq.outputs[0].name] = layer.float_weight
        bias = layer.node.inputs[2] if len(layer.node.inputs) > 2 else None
        if bias is not None and layer.node.name in float_biases:
            float_values[bias.name] = float_biases[layer.node.name]
    runner = GraphRunner(torch, graph, roundings, float_values)
    names = [value.name for value in graph.inputs]
    data = {name: runner.tensor(np.concatenate([s[name] for s in samples])) for name in names}
    runner.record_shapes({n: t[:1] for n, t in data.items()}, {n: t[:2] for n, t in data.items()})
    learned = {rounding.node_name for rounding in roundings.values()}
    judged = len(samples) // JUDGED_SHARE if len(samples) >= 2 * JUDGED_SHARE else 0
    taught = slice(0, len(samples) - judged)
    judge = slice(len(samples) - judged, None) if judged else taught
    report = ReconstructionReport(iterations, len(samples), judged)
    start = time.perf_counter()
    float_in = quant_in = data[names[0]]
    for block in blocks(graph, learned):
        own = [r for name, r in roundings.items() if any(v.name == name for n in block.nodes for v in n.inputs)]

        def outputs(source, quantized: bool):
            return torch.cat([_batch(runner, block, names, data, source, slice(first, first + 32), quantized)
                              for first in range(0, len(source), 32)])

        with torch.no_grad():
            target = outputs(float_in, quantized=False)
            for rounding in own:
                rounding.use_start = True
            before = float(((outputs(quant_in, True) - target)[judge] ** 2).mean())
        _learn(torch, own, lambda rows: _batch(runner, block, names, data, quant_in, rows), target[taught], iterations)
        with torch.no_grad():
            result = outputs(quant_in, True)
            after = float(((result - target)[judge] ** 2).mean())
            kept = after < before
            if not kept:  # the starting integers were better: keep them
                for rounding in own:
                    rounding.use_start = True
                result = outputs(quant_in, True)
        report.rows.append(BlockRow(block.result, block.layers, before, after, kept))
        float_in, quant_in = target, result
    for rounding in roundings.values():
        stored = rounding.dq.inputs[0].const_value.numpy()
        rounding.dq.inputs[0].const_value = ir.tensor(rounding.learned().astype(stored.dtype),
                                                      name=rounding.dq.inputs[0].name)
    report.seconds = time.perf_counter() - start
    return report


def _batch(runner: GraphRunner, block: Block, names: list[str], data: dict, source, rows, quantized: bool = True):
    """The block's output on the samples ``rows`` of ``source`` (its input), other graph inputs from ``data``."""
    env = {name: data[name][rows] for name in names[1:]}
    env[block.source] = source[rows]
    return runner.run(block.nodes, env, quantized)[block.result]


def _learn(torch, roundings: list[Rounding], run: Callable, target, iterations: int) -> None:
    """Adam on V: the block's squared output error (summed over channels) plus the annealed regulariser."""
    if not roundings or not iterations:
        return
    for rounding in roundings:
        rounding.use_start, rounding.hard = False, False
    optimizer = torch.optim.Adam([rounding.V for rounding in roundings], lr=LEARNING_RATE)
    warm = int(WARM_UP * iterations)
    generator = torch.Generator().manual_seed(len(target))
    for step in range(iterations):
        rows = torch.randint(0, len(target), (min(BATCH, len(target)),), generator=generator)
        difference = (run(rows) - target[rows]) ** 2
        loss = difference.sum(1).mean() if difference.ndim > 1 else difference.mean()
        if step >= warm:
            beta = BETA[0] + (BETA[1] - BETA[0]) * (step - warm) / max(1, iterations - warm)
            loss = loss + REGULARISER * sum(rounding.regulariser(beta) for rounding in roundings)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for rounding in roundings:
        rounding.hard = True
