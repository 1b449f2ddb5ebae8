"""Channel orders that keep large int8 weights of the same sign out of one kernel pair.

x86 CPUs without VNNI add the products of weights ``2j`` and ``2j + 1`` of a layer's
reduction axis in one 16-bit lane (:mod:`lowbit.quantizers.saturation`), so a channel
whose largest weight has a neighbour of the same sign needs a coarser grid. Which weights
are neighbours is the model's choice, not the kernel's: the channels between two dense
layers can be stored in any order, as long as both layers (and everything per channel in
between) agree. In an inverted-residual block (1x1 expand -> depthwise -> 1x1 project, as
in MobileNet v2/v3, EfficientNet-Lite, MnasNet) and in a bottleneck (1x1 -> kxk -> 1x1),
the project layer's input channels are such a free order: permuting the expand layer's
output channels, the depthwise layer's channels and the project layer's input channels
computes the same sums in another order (equal up to float rounding: 4e-7 relative on
EfficientNet-Lite0's logits).

For each such chain, :func:`choose_order` pairs the consumer's input channels so that few
of its output channels have a pair over the bound at their own grid: greedily, the channel
with the largest total excess first, each with the partner that adds the least excess
over the consumer's output channels. On EfficientNet-Lite0's 16 project layers the channels
that need a wider grid drop from 1633 of 1808 to 9 (measured).

Only chains in which every value has one reader are reordered (a residual connection or a
squeeze-and-excitation branch ends the chain), and only through nodes that treat channels
alike (Relu, Clip with scalar bounds, pooling, ... see :data:`CHANNEL_BLIND`; adding or
multiplying one constant number, as PP-LCNet's learnable affine blocks do) or per channel
with their own constants (a depthwise Conv).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..errors import LowbitError
from ..graph.query import attribute, constant_array, constant_scalar
from .saturation import PAIR_BOUND

# The output model's metadata key that lists the reordered chains (:func:`reorder` reads its JSON).
CHANNEL_ORDER_KEY = "lowbit.channel_order"
# Ops that compute each element (or each channel's plane: pooling) alike, with no per-channel parameter: a channel
# permutation passes through them.
CHANNEL_BLIND = frozenset({"Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish",
                           "Tanh", "Softplus", "Softsign", "Gelu", "Mish", "Identity", "Dropout",
                           "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool"})
# Binary ops that pass a channel permutation through when their second input is one constant number.
SCALAR_ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div"})


@dataclass
class Chain:
    """Layers whose shared channels can be stored in any order: ``producer`` writes them (its output channels),
    ``per_channel`` carry them one to one (depthwise convolutions), ``consumer`` reads them (its input channels)."""

    producer: ir.Node
    per_channel: list[ir.Node]
    consumer: ir.Node


def find_chains(graph: ir.Graph) -> list[Chain]:
    """Every chain whose consumer is a dense Conv (group 1) with constant weights, in graph order."""
    chains = []
    for node in graph:
        if _dense_conv(node):
            chain = _chain_to(node)
            if chain is not None:
                chains.append(chain)
    return chains


def _chain_to(consumer: ir.Node) -> Chain | None:
    per_channel = []
    value = consumer.inputs[0]
    while value is not None and _single_reader(value):
        node = value.producer()
        if node is None:
            return None
        if _dense_conv(node):
            channels = constant_array(node.inputs[1]).shape[0]
            return Chain(node, per_channel, consumer) if channels == _input_channels(consumer) else None
        if _depthwise(node):
            per_channel.append(node)
            value = node.inputs[0]
        else:
            value = _channel_blind_input(node)
            if value is None:
                return None
    return None


def _single_reader(value: ir.Value) -> bool:
    return not value.is_graph_output() and len(list(value.uses())) == 1


def _own_constant(value: ir.Value | None) -> bool:
    return value is not None and constant_array(value) is not None and len(list(value.uses())) == 1


def _has_own_constants(node: ir.Node) -> bool:
    """Weight (and bias, if any) are constants only this node reads: a permutation of them changes nothing else."""
    if len(node.inputs) < 2 or not _own_constant(node.inputs[1]):
        return False
    return len(node.inputs) < 3 or node.inputs[2] is None or _own_constant(node.inputs[2])


def _dense_conv(node: ir.Node) -> bool:
    return (node.op_type == "Conv" and node.domain in ("", "ai.onnx") and int(attribute(node, "group", 1)) == 1
            and _has_own_constants(node) and constant_array(node.inputs[1]).ndim >= 3)


def _depthwise(node: ir.Node) -> bool:
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or not _has_own_constants(node):
        return False
    weight = constant_array(node.inputs[1])
    return weight.ndim >= 3 and weight.shape[1] == 1 and int(attribute(node, "group", 1)) == weight.shape[0]


def _channel_blind_input(node: ir.Node) -> ir.Value | None:
    """The input a channel permutation passes through ``node`` from, if it treats every channel alike: a unary op
    of :data:`CHANNEL_BLIND`, a Clip with scalar bounds, or arithmetic with one constant number (either side)."""
    if node.domain not in ("", "ai.onnx") or not node.inputs:
        return None
    if any(extra.is_graph_output() or list(extra.uses()) for extra in node.outputs[1:]):
        return None  # MaxPool's indices and Dropout's mask would carry the channel order too
    if node.op_type == "Clip":  # scalar bounds only (a per-channel bound would need permuting too)
        return node.inputs[0] if all(bound is None or _scalar(bound) for bound in node.inputs[1:]) else None
    if node.op_type in SCALAR_ARITHMETIC and len(node.inputs) == 2:
        first, second = node.inputs
        if _scalar(second) and not _scalar(first):
            return first
        return second if _scalar(first) and not _scalar(second) else None
    return node.inputs[0] if node.op_type in CHANNEL_BLIND else None


def _scalar(value: ir.Value) -> bool:
    return constant_scalar(value) is not None


def _input_channels(conv: ir.Node) -> int:
    return constant_array(conv.inputs[1]).shape[1]


# -- choosing the order -------------------------------------------------------------------

def natural_integers(weight: np.ndarray, per_channel: bool) -> np.ndarray:
    """The weight rounded on its own symmetric int8 grid (|w|max / 127, per output channel or per tensor)."""
    w = weight.astype(np.float64)
    peak = np.abs(w).reshape(w.shape[0], -1).max(axis=1) if per_channel else np.full(w.shape[0], np.abs(w).max())
    scale = np.where(peak > 0, peak / 127.0, 1.0).reshape((-1,) + (1,) * (w.ndim - 1))
    return np.round(w / scale).astype(np.int64)


def kernel_rows(integers: np.ndarray) -> np.ndarray:
    """A Conv weight (O, C, kh, kw) as rows of C input channels, one per output channel and tap (O * taps, C):
    with C even, the kernel's pairs are channels 2j and 2j + 1 of each row (it reads ``(kh, kw, c)``)."""
    return np.moveaxis(integers, 1, -1).reshape(-1, integers.shape[1])


def excess_matrix(rows: np.ndarray) -> np.ndarray:
    """(C, C), symmetric: for channels i and j, ``|a + b| - 128`` summed over the rows where pairing them is over
    the bound. Only a weight over 64 can take a pair over 128, so each row is scanned from its large weights
    (a pair of two large ones counted once, from the first)."""
    channels = rows.shape[1]
    excess = np.zeros((channels, channels), np.int64)
    for row in rows:
        is_large = np.abs(row) > PAIR_BOUND // 2
        large = np.flatnonzero(is_large)
        if not large.size:
            continue
        over = np.maximum(np.abs(row[large, None] + row[None, :]) - PAIR_BOUND, 0)
        counted_here = ~is_large[None, :] | (large[:, None] < np.arange(channels)[None, :])
        over = np.where(counted_here, over, 0)
        excess[large, :] += over
        excess[:, large] += over.T
    return excess


def choose_order(excess: np.ndarray) -> np.ndarray:
    """A channel order whose neighbours (2j, 2j + 1) add little excess: the channel with the most excess
    against all others first, with the free partner that adds the least (among equals the one with the most
    excess elsewhere, which is hardest to place later); an odd channel out goes last."""
    load = excess.sum(axis=1)
    free = np.ones(len(excess), bool)
    order: list[int] = []
    for channel in np.argsort(-load, kind="stable"):
        if not free[channel]:
            continue
        free[channel] = False
        candidates = np.flatnonzero(free)
        if not candidates.size:
            order.append(int(channel))
            break
        cost = excess[channel, candidates]
        best = candidates[cost == cost.min()]
        partner = best[np.argmax(load[best])]
        free[partner] = False
        order += [int(channel), int(partner)]
    return np.array(order)


def channels_over(integers: np.ndarray, order: np.ndarray | None = None) -> int:
    """How many output channels of a Conv weight (O, C, ...) of integers have a kernel pair over the bound
    with its input channels stored in ``order``."""
    rows = np.moveaxis(integers if order is None else integers[:, order], 1, -1).reshape(integers.shape[0], -1,
                                                                                         integers.shape[1])
    paired = rows.shape[-1] // 2 * 2
    sums = np.abs(rows[..., 0:paired:2] + rows[..., 1:paired:2])
    return int(np.count_nonzero((sums > PAIR_BOUND).any(axis=(1, 2))))


# -- applying it ------------------------------------------------------------------------

@dataclass
class OrderReport:
    chains: int = 0  # chains found
    reordered: int = 0  # chains whose channels were stored in a new order
    channels: int = 0  # output channels of the reordered consumers
    over_before: int = 0  # of those, channels with a pair over the bound at their own grid, before ...
    over_after: int = 0  # ... and after
    orders: list[dict] = field(default_factory=list)  # per reordered chain, as :func:`reorder` reads it


def order_channels(graph: ir.Graph, per_channel: bool) -> OrderReport:
    """Reorder the channels of every chain, when the new order leaves fewer output channels of its last layer with
    a pair over the bound (at the layer's own int8 grid, per output channel or per tensor); in place, same
    outputs."""
    report = OrderReport()
    for chain in find_chains(graph):
        report.chains += 1
        integers = natural_integers(constant_array(chain.consumer.inputs[1]), per_channel)
        if integers.shape[1] % 2 and np.prod(integers.shape[2:]) > 1:
            continue  # an odd channel count pairs across taps: a permutation does not keep pairs apart
        order = choose_order(excess_matrix(kernel_rows(integers)))
        before, after = channels_over(integers), channels_over(integers, order)
        if after >= before:
            continue
        _permute(chain, order)
        report.reordered += 1
        report.channels += integers.shape[0]
        report.over_before += before
        report.over_after += after
        report.orders.append({"producer": chain.producer.name, "per_channel": [n.name for n in chain.per_channel],
                              "consumer": chain.consumer.name, "order": order.tolist()})
    return report


def reorder(graph: ir.Graph, orders: list[dict]) -> None:
    """Apply the orders that :func:`order_channels` reported (``OrderReport.orders``) to another copy of the same
    float model, matched by node name: ``lowbit analyze`` compares the quantized model's tensors with it."""
    nodes = {node.name: node for node in graph}
    for entry in orders:
        names = [entry["producer"], *entry["per_channel"], entry["consumer"]]
        missing = [name for name in names if name not in nodes]
        if missing:
            raise LowbitError(f"the quantized model stores the channels of {', '.join(names)} in a new order, and the "
                              f"float model has no node {missing[0]}: is it the model that was quantized?")
        order = np.asarray(entry["order"], np.int64)
        chain = Chain(nodes[entry["producer"]], [nodes[name] for name in entry["per_channel"]],
                      nodes[entry["consumer"]])
        if sorted(order.tolist()) != list(range(_input_channels(chain.consumer))):
            raise LowbitError(f"the quantized model's channel order for {entry['consumer']} does not fit the float "
                              f"model's {_input_channels(chain.consumer)} channels: is it the model that was "
                              "quantized?")
        _permute(chain, order)


def _permute(chain: Chain, order: np.ndarray) -> None:
    for node in (chain.producer, *chain.per_channel):
        _take(node.inputs[1], order, axis=0)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            _take(node.inputs[2], order, axis=0)
    _take(chain.consumer.inputs[1], order, axis=1)


def _take(value: ir.Value, order: np.ndarray, axis: int) -> None:
    value.const_value = ir.tensor(np.take(constant_array(value), order, axis=axis), name=value.name)
