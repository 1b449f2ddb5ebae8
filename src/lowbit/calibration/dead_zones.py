"""The part of a tensor's range that its readers can tell apart: beyond it, every reader outputs a constant.

HardSwish outputs 0 for every input at or below -3, HardSigmoid 0 below ``-beta / alpha`` and
1 above ``(1 - beta) / alpha``, Relu 0 below 0, Clip its bound beyond each bound. A grid that
spends levels on values there rounds nothing any reader sees: clipping the tensor's range at
the bound is exact for the model's outputs, and the levels go to the values that count.

Measured on PP-OCRv4 det, whose PP-LCNet convolutions feed HardSwish: one convolution's output
spans [-150.5, 103.6] on calibration data, with a median channel spread of 18 (std 1.3); the
values below -3 all become 0, so the per-tensor uint8 step that [-150.5, 103.6] forces (1.0)
wastes three fifths of the grid. (MobileNetV3 and every HardSwish / HardSigmoid network share
the pattern; a ReLU or ReLU6 after a Conv is fused and never quantized on its own input.)

A tensor is restricted only when *every* reader has such a dead zone and it is not a graph
output; the restriction is the union of the readers' live intervals. The histogram a range
method reads is clamped to the interval first (:func:`clamped`: the counts beyond a bound are
dropped, since the grid's end at the bound represents them exactly as far as the readers can
tell), so MSE, KL and the percentile weigh only the values that count; the range is then
clipped to the interval (:func:`restrict`), for methods that read only the minimum and maximum.
Measured on PP-OCRv4 det (``bench/ppocr_det.py``: text drawn on 40 held-out photos, mean cosine
of the probability maps / IoU of the text masks): the default 0.928 / 0.850 -> 0.960 / 0.906,
MSE 0.652 / 0.539 -> 0.940 / 0.870, KL 0.727 / 0.617 -> 0.696 / 0.580 (on two other scene sets
KL moved by less than 0.01). Piling the dropped counts into the bound's bin instead made KL
worse (on the test's scenes 0.853 -> 0.756, against 0.850 dropped), its |x| histogram then
holding a spike at the bound.

SiLU (``x * sigmoid(x)``, YOLOv5/v8/X, EfficientNet-B, exported as a Sigmoid and a Mul that
both read ``x``) has no exact dead zone, but below ``-SILU_LIVE_FROM`` it stops mattering to
the quantized model: there ``x * sigmoid(x)`` lies within 0.00046 of 0 (10 * sigmoid(-10)),
under half a step of any uint8 grid that holds SiLU's own minimum (-0.278; 0.278 / 255 / 2 =
0.00055), and the Sigmoid's output within 0.00005 of 0, under half a step of its [0, 1] grid.
ONNX Runtime has no int8 Sigmoid on the CPU, so the convolution before a SiLU writes int8
outputs whose range is otherwise set by its most negative pre-activations: on nudenet's
YOLOv8n (``bench/silu.py``) ranges like [-74, 74] and [-52, 16] become [-10, 74] and
[-10, 16], a grid two to three times finer.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from ..graph.query import STANDARD_DOMAINS, attribute, constant_scalar
from .histogram import HistogramObserver
from .observers import RangeObserver
from .ranges import Range

UNBOUNDED = (-math.inf, math.inf)


def live_interval(node: ir.Node, value: ir.Value) -> Range:
    """The inputs of ``value`` (read as ``node``'s first input) whose outputs differ; UNBOUNDED when ``node`` has
    no dead zone there (any other op, or ``value`` in another position)."""
    if node.domain not in STANDARD_DOMAINS or not node.inputs or node.inputs[0] is not value:
        return UNBOUNDED
    if node.op_type == "HardSwish":
        return -3.0, math.inf
    if node.op_type == "Relu":
        return 0.0, math.inf
    if node.op_type == "HardSigmoid":
        alpha, beta = float(attribute(node, "alpha", 0.2)), float(attribute(node, "beta", 0.5))
        if alpha <= 0:
            return UNBOUNDED
        return -beta / alpha, (1.0 - beta) / alpha
    if node.op_type == "Clip":
        given = [node.inputs[i] if len(node.inputs) > i else None for i in (1, 2)]
        bounds = [None if value is None else constant_scalar(value) for value in given]
        if any(value is not None and bound is None for value, bound in zip(given, bounds)):
            return UNBOUNDED  # a bound computed at run time
        return (-math.inf if bounds[0] is None else bounds[0]), (math.inf if bounds[1] is None else bounds[1])
    return UNBOUNDED


SILU_LIVE_FROM = 10.0  # below -10, SiLU and its Sigmoid round to what they give at -10 (module docstring)


def read_as_silu(value: ir.Value) -> bool:
    """Whether ``value`` is read by exactly a Sigmoid and a Mul of it with that Sigmoid's output: SiLU as
    exporters write it."""
    readers = [use[0] for use in value.uses()]
    if len(readers) != 2 or any(node.domain not in STANDARD_DOMAINS for node in readers):
        return False
    sigmoid = next((node for node in readers if node.op_type == "Sigmoid"), None)
    mul = next((node for node in readers if node.op_type == "Mul"), None)
    return (sigmoid is not None and mul is not None and len(mul.inputs) == 2
            and {id(v) for v in mul.inputs} == {id(value), id(sigmoid.outputs[0])})


def live_intervals(graph: ir.Graph, names) -> dict[str, Range]:
    """For each of the tensors ``names`` that every reader ignores beyond some bound, the union of the readers'
    live intervals, and from ``-SILU_LIVE_FROM`` up for the input of a SiLU (tensors with no bound are left
    out)."""
    values = {value.name: value for node in graph for value in node.outputs if value is not None}
    values.update({value.name: value for value in graph.inputs})
    intervals = {}
    for name in names:
        value = values.get(name)
        if value is None or value.is_graph_output():
            continue
        uses = list(value.uses())
        if not uses:
            continue
        if read_as_silu(value):
            intervals[name] = (-SILU_LIVE_FROM, math.inf)
            continue
        spans = [live_interval(use[0], value) for use in uses]
        low, high = min(lo for lo, _ in spans), max(hi for _, hi in spans)
        if (low, high) != UNBOUNDED:
            intervals[name] = (low, high)
    return intervals


def reaches_beyond(observer: RangeObserver, interval: Range) -> bool:
    """Whether the observer saw values outside the interval (False when it saw none)."""
    try:
        lo, hi = (float(v) for v in observer.range())
    except ValueError:  # no data: the range methods say so
        return False
    return lo < interval[0] or hi > interval[1]


def restrict(ranges: dict[str, Range], intervals: dict[str, Range]) -> dict[str, Range]:
    """``ranges`` clipped to the live intervals; a range that would lose all of its extent (every calibration value
    in a dead zone) is kept as it is."""
    restricted = dict(ranges)
    for name, (live_lo, live_hi) in intervals.items():
        if name not in ranges:
            continue
        lo, hi = ranges[name]
        new_lo, new_hi = max(lo, live_lo), min(hi, live_hi)
        if new_lo < new_hi:
            restricted[name] = (float(new_lo), float(new_hi))
    return restricted


def clamped(observer: RangeObserver, interval: Range) -> RangeObserver:
    """A histogram's copy without the counts beyond the interval (bins are kept whole: the bound's own bin stays),
    its minimum and maximum clamped; other observers, and a histogram with no value inside the interval, as they
    are."""
    if not isinstance(observer, HistogramObserver) or observer.exponent is None or observer.min is None:
        return observer
    live_lo, live_hi = interval
    lo, hi = max(observer.min, live_lo), min(observer.max, live_hi)
    if not lo < hi:
        return observer
    copy = HistogramObserver.from_state(observer.state())
    counts = copy.counts = copy.counts.copy()  # the state shares the observer's array
    first = int(np.clip(math.floor(lo / copy.width) - copy.start, 0, len(counts) - 1))
    last = int(np.clip(math.floor(hi / copy.width) - copy.start, 0, len(counts) - 1))
    counts[:first] = 0
    counts[last + 1:] = 0
    copy.min, copy.max = float(lo), float(hi)
    return copy
