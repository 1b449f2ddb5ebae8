"""Non-uniform weights on the uniform grid: K of a layer's integer levels, and files that store only those.

Ascend AMCT's non-uniform quantization (seed 002) keeps the uniform 8-bit grid (scale, zero
point, the integer kernels) but lets each layer's weights take only K of its 256 integers,
so a runtime that compresses weights moves ``log2(K)`` bits per weight instead of 8.

*Which K levels*: those that minimise ``sum a_e (v_e - level(v_e))^2`` over the layer's
weights ``v`` in grid units, each weighted by ``a`` (its channel's scale squared times the
second moment of the input it multiplies: the layer's output error, not the weight error,
when calibration data gives it). Levels are integers and each weight goes to the nearest, so
every boundary between two levels' shares is a half-integer: :func:`optimal_levels` finds the
exact optimum by dynamic programming over the integers of the grid (``K x L^2`` for an
``L``-integer grid), from cumulative sums of ``a``, ``a v`` and ``a v^2`` at the half-integers.

*Storage*: each weight's index into its sorted levels, ``b = log2(K)`` bits, stored as ``b``
bit-planes (plane ``p`` holds bit ``p`` of every index, eight indices a byte) plus the K
levels; :func:`decoder_nodes` writes the standard ONNX ops that rebuild the integer tensor
from them (BitShift, Mod, ReduceSum, Gather, Reshape) in front of the same
DequantizeLinear. Every input of that subgraph is a constant, so ONNX Runtime folds it when
the session is created and runs the same integer kernels as for the uniform model.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

LEVEL_COUNTS = tuple(2 ** b for b in range(1, 9))  # the K a user may ask for: powers of two, 2 to 256
AUTO = "AUTO"  # weight_levels=AUTO: K per layer, searched with the evaluator
AUTO_COUNTS = (16, 32, 64, 128)  # the K the automatic mode tries per layer (256: the uniform grid)
PACKED_TAG = "lowbit.weight_levels"  # metadata on a DequantizeLinear whose integer weight takes K levels
# The decoder's nodes and constants take up to 2.5 KB of the file (2.3 KB measured): a weight is packed only
# when packing saves more than twice that, so small weights stay plain integer tensors.
DECODER_BYTES = 2560


def fixed_count(setting: str | None) -> int | None:
    """The K of ``weight_levels`` when it names one (None when unset or AUTO)."""
    return int(setting) if setting is not None and setting != AUTO else None


def optimal_levels(values: np.ndarray, importance: np.ndarray, count: int, low: int, high: int) -> np.ndarray:
    """The ``count`` integers in ``[low, high]`` that minimise the importance-weighted squared distance of
    ``values`` (clipped to the grid) to their nearest level; sorted. All the grid when it has no more."""
    grid = np.arange(low, high + 1)
    if count >= len(grid):
        return grid
    weights = np.broadcast_to(np.asarray(importance, np.float64), np.shape(values)).reshape(-1)
    values = np.clip(np.asarray(values, np.float64).reshape(-1), low, high)
    order = np.argsort(values, kind="stable")
    values, weights = values[order], weights[order]
    # cumulative sums at every half-integer t of [low, high]: of the values <= t
    thresholds = low + 0.5 * np.arange(2 * len(grid) - 1)
    ends = np.searchsorted(values, thresholds, side="right")
    sums = [np.concatenate([[0.0], np.cumsum(weights * values ** power)])[ends] for power in range(3)]

    def cost(level, start, stop):
        """Of the values in (threshold[start], threshold[stop]] sent to ``level`` (start -1: from the bottom)."""
        s = [total[stop] - np.where(start >= 0, total[np.maximum(start, 0)], 0.0) for total in sums]
        return s[2] - 2 * level * s[1] + level ** 2 * s[0]

    index = np.arange(len(grid))
    i, j = np.meshgrid(index, index, indexing="ij")  # level i then the next chosen level j > i
    middle = i + j  # the half-integer between them, on the threshold lattice (grid index g is lattice 2g)
    between = np.where(j > i, cost(grid[i], 2 * i, middle) + cost(grid[j], middle, 2 * j), np.inf)
    best = cost(grid, np.full(len(grid), -1), 2 * index)  # one level so far, at j: every value below it
    choices = []
    for _ in range(count - 1):
        total = best[:, None] + between
        choices.append(np.argmin(total, axis=0))
        best = total[choices[-1], index]
    best = best + cost(grid, 2 * index, np.full(len(grid), 2 * len(grid) - 2))  # the values above the last
    last = int(np.argmin(best))
    chosen = [last]
    for back in reversed(choices):
        chosen.append(int(back[chosen[-1]]))
    return grid[np.array(chosen[::-1])]


def channel_shape(ndim: int, axis: int | None) -> list[int]:
    """The shape that spreads per-channel parameters (scale, zero point) along ``axis`` (None: one for all)."""
    shape = [1] * ndim
    if axis is not None:
        shape[axis] = -1
    return shape


def table_levels(table: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None, low: int,
                 high: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """A lookup table's integers (a Gather's: no input statistic weighs its entries) on ``count`` levels chosen
    for the least squared error of its dequantized values; returns (integers, levels)."""
    shape = channel_shape(table.ndim, axis)
    scale = np.asarray(scale, np.float64).reshape(shape)
    values = np.clip(table / scale + np.asarray(zero_point, np.float64).reshape(shape), low, high)
    levels = optimal_levels(values, np.broadcast_to(scale ** 2, table.shape), count, low, high)
    return nearest_level(values, levels), levels


def nearest_level(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Each value's nearest level (ties to the lower one), as float64."""
    position = np.clip(np.searchsorted(levels, values), 1, len(levels) - 1)
    lower, upper = levels[position - 1], levels[position]
    return np.where(values - lower <= upper - values, lower, upper).astype(np.float64)


def index_bits(count: int) -> int:
    return max(1, math.ceil(math.log2(count)))


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """``bits`` bit-planes of the indices, eight a byte (index ``8j + k`` in bit ``k`` of byte ``j``)."""
    flat = np.asarray(indices, np.int64).reshape(-1)
    return np.stack([np.packbits(((flat >> p) & 1).astype(np.uint8), bitorder="little") for p in range(bits)])


def unpack_indices(planes: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` indices of :func:`pack_indices`'s planes."""
    bits = np.unpackbits(planes, axis=1, bitorder="little")[:, :count].astype(np.int64)
    return np.sum(bits << np.arange(len(planes))[:, None], axis=0)


def packed_bytes(count: int, levels: int) -> int:
    """Bytes of a packed tensor of ``count`` weights on ``levels`` levels (planes and the level table)."""
    return index_bits(levels) * math.ceil(count / 8) + levels


def pack_model(model: ir.Model) -> int:
    """Replace every tagged integer weight by its packed form and decoder, in place; returns how many."""
    packed = 0
    for node in list(model.graph):
        if node.op_type != "DequantizeLinear" or PACKED_TAG not in node.metadata_props:
            continue
        value = node.inputs[0]
        if value.const_value is None or len(list(value.uses())) != 1:
            continue
        stored = value.const_value.numpy()
        levels = np.unique(stored)
        if stored.size * stored.itemsize - packed_bytes(stored.size, len(levels)) <= 2 * DECODER_BYTES:
            continue
        indices = np.searchsorted(levels, stored)
        decoded = decoder_nodes(value.name, pack_indices(indices, index_bits(len(levels))), levels, stored.shape,
                                model.graph)
        node.replace_input_with(0, decoded)
        model.graph.initializers.pop(value.name)
        packed += 1
    return packed


def decoder_nodes(name: str, planes: np.ndarray, levels: np.ndarray, shape: tuple[int, ...],
                  graph: ir.Graph) -> ir.Value:
    """The standard ops that rebuild the integer tensor ``name`` from its planes and levels (before the
    first reader of ``name``); returns their output."""
    count = int(np.prod(shape))

    def constant(suffix: str, array: np.ndarray) -> ir.Value:
        full = f"{name}_packed_{suffix}"
        value = ir.Value(name=full, const_value=ir.tensor(array, name=full),
                         type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape))
        graph.register_initializer(value)
        return value

    steps: list[ir.Node] = []

    def op(op_type: str, inputs, suffix: str, **attributes) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attributes, name=f"{name}_unpack_{suffix}")
        node.outputs[0].name = f"{name}_unpack_{suffix}"
        steps.append(node)
        return node.outputs[0]

    bytes_ = op("Unsqueeze", [constant("planes", planes), constant("byte_axis", np.array([2], np.int64))], "bytes")
    shifted = op("BitShift", [bytes_, constant("shifts", np.arange(8, dtype=np.uint8).reshape(1, 1, 8))],
                 "shifted", direction="RIGHT")
    wide = op("Cast", [shifted], "wide", to=ir.DataType.INT32)
    bit = op("Mod", [wide, constant("two", np.array(2, np.int32))], "bit")
    weighted = op("Mul", [bit, constant("powers", (2 ** np.arange(len(planes), dtype=np.int32)).reshape(-1, 1, 1))],
                  "weighted")
    index = op("ReduceSum", [weighted, constant("plane_axis", np.array([0], np.int64))], "index", keepdims=0)
    flat = op("Reshape", [index, constant("flat", np.array([-1], np.int64))], "flat")
    first = op("Slice", [flat, constant("start", np.array([0], np.int64)), constant("stop", np.array([count]))],
               "first")
    chosen = op("Gather", [constant("levels", levels), first], "gathered", axis=0)
    rebuilt = op("Reshape", [chosen, constant("shape", np.array(shape, np.int64))], "rebuilt")
    reader = next(iter(graph.initializers[name].uses())).node if name in graph.initializers else None
    anchor = reader if reader is not None else graph.node(0)
    graph.insert_before(anchor, steps)
    rebuilt.dtype = ir.DataType.from_numpy(levels.dtype)
    rebuilt.shape = ir.Shape(shape)
    return rebuilt


def unpack_model(model: ir.Model) -> int:
    """Undo :func:`pack_model` in place (the tools that read integer weights as constants: analysis,
    inspection); returns how many tensors were unpacked."""
    unpacked = 0
    for node in list(model.graph):
        if node.op_type != "DequantizeLinear" or PACKED_TAG not in node.metadata_props:
            continue
        rebuilt = node.inputs[0]
        name = rebuilt.name.removesuffix("_unpack_rebuilt")
        if rebuilt.const_value is not None or name == rebuilt.name:
            continue
        constants = {suffix: model.graph.initializers.get(f"{name}_packed_{suffix}")
                     for suffix in ("planes", "levels", "shape")}
        if any(value is None or value.const_value is None for value in constants.values()):
            continue
        shape = tuple(int(d) for d in constants["shape"].const_value.numpy())
        planes, levels = constants["planes"].const_value.numpy(), constants["levels"].const_value.numpy()
        stored = levels[unpack_indices(planes, int(np.prod(shape)))].reshape(shape)
        value = ir.Value(name=name, const_value=ir.tensor(stored, name=name),
                         type=ir.TensorType(ir.DataType.from_numpy(stored.dtype)), shape=ir.Shape(shape))
        model.graph.register_initializer(value)
        node.replace_input_with(0, value)
        unpacked += 1
    if unpacked:
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return unpacked
