"""Each quantized node's share of the output error, from one session of the switched model.

For every node two figures, both as the model-output error (1 - cosine against the float
model, averaged over samples and outputs):

* ``alone``: only this node quantized, the rest float: the error the node brings by itself;
* ``without``: every node quantized but this one: what leaving it float would give, so
  ``gain = error of the quantized model - without`` is what reverting it buys.

The two disagree where errors interact (a node whose rounding is harmless alone but not
after the rounding before it); the gain answers the user's question directly (what to
revert), and :func:`node_sensitivities` orders by it. Gains of several nodes do not add up:
the analysis orders the first ones by measuring them together (see
:func:`greedy_order`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from ..search.metrics import compare
from .switches import OUTPUT_ROUNDING, SwitchedModel

if TYPE_CHECKING:
    from ..distributed.workers import Workers

CURVE = 8  # the greedy order considers this many of the nodes of largest gain


@dataclass(frozen=True)
class NodeSensitivity:
    name: str
    op_type: str
    alone: float
    without: float
    gain: float
    activations: tuple[str, ...]
    weights: tuple[str, ...]


class OutputError:
    """The output error of the switched model for a set of quantized nodes, on fixed batches."""

    def __init__(self, session: ort.InferenceSession, switched: SwitchedModel, batches: Sequence[dict[str, np.ndarray]],
                 outputs: Sequence[str]):
        self.session, self.switched, self.batches, self.outputs = session, switched, batches, list(outputs)
        self.runs = 0
        self.references = [self._run(batch, frozenset()) for batch in batches]
        self._known: dict[tuple[frozenset[str], frozenset[str]], float] = {}

    def _run(self, batch: dict[str, np.ndarray], quantized: frozenset[str],
             wide: frozenset[str] = frozenset()) -> list[np.ndarray]:
        self.runs += 1
        return self.session.run(self.outputs, {**batch, **self.switched.feeds(quantized, wide)})

    def __call__(self, quantized: Iterable[str], wide: Iterable[str] = ()) -> float:
        """The error with the ``quantized`` nodes quantized (the ``wide`` ones among them to 16 bits)."""
        key = (frozenset(quantized), frozenset(wide))
        if key not in self._known:  # the search asks again for sets the ranking measured
            self._known[key] = mean_error(self.references, (self._run(batch, *key) for batch in self.batches))
        return self._known[key]


def mean_error(references: Sequence[list[np.ndarray]], results: Iterable[list[np.ndarray]]) -> float:
    """1 - cosine, per sample and output, averaged."""
    errors = []
    for reference, result in zip(references, results):
        for expected, got in zip(reference, result):
            rows = len(expected) if expected.ndim > 1 else 1
            a = expected.reshape(rows, -1).astype(np.float64)
            b = got.reshape(rows, -1).astype(np.float64)
            errors.extend(1.0 - compare(y, x) for x, y in zip(a, b))
    return float(np.mean(errors)) if errors else 0.0


def node_sensitivities(error: OutputError, full_error: float, step: Callable[[], None] = lambda: None,
                       names: Sequence[str] | None = None, alone: bool = True) -> list[NodeSensitivity]:
    """The figures of the switched nodes ``names`` (all when None), ranked by gain (largest first).

    ``alone=False`` skips the "alone" figure (NaN then), which only breaks ties of the ranking:
    half the runs, for a search that needs the order only.
    """
    everything = {node.name for node in error.switched.nodes}
    rows = []
    for node in error.switched.nodes:
        if names is not None and node.name not in names:
            continue
        by_itself = error({node.name}) if alone else math.nan
        without = error(everything - {node.name})
        rows.append(NodeSensitivity(node.name, node.op_type, by_itself, without, full_error - without,
                                    tuple(node.activations), tuple(node.weights)))
        step()
    return sorted(rows, key=_by_gain)


def _by_gain(row: NodeSensitivity) -> tuple:
    return -row.gain, 0.0 if math.isnan(row.alone) else -row.alone, row.name


def ranked_nodes(error: OutputError, full_error: float, step: Callable[[], None] = lambda: None,
                 workers: Workers | None = None, alone: bool = True
                 ) -> tuple[list[NodeSensitivity], list[tuple[str, float]]]:
    """Every switched node, ranked: first the greedy order of :func:`greedy_order`, then the others by gain.

    Returns the ranking and the greedy curve (node, output error with it and those before it float).
    With ``workers``, the nodes' figures are measured in Ray tasks, a share of the nodes each.
    """
    if workers is None:
        by_gain = node_sensitivities(error, full_error, step, alone=alone)
    else:
        by_gain = sorted(workers.sensitivities(error, full_error, alone, step), key=_by_gain)
    curve = greedy_order(error, by_gain)
    first = [name for name, _ in curve]
    return sorted(by_gain, key=lambda n: first.index(n.name) if n.name in first else len(first)), curve


def greedy_order(error: OutputError, nodes: list[NodeSensitivity]) -> list[tuple[str, float]]:
    """The first nodes of the ranking, in the order in which leaving them float helps most.

    Only nodes of the model take part (not the rounding of a quantized graph output).

    Gains do not add up: leaving two nodes float can give less than either alone (on
    EfficientNet-Lite0, the first three by gain together gave 0.00135 where the first alone
    gave 0.00132). So, over the :data:`CURVE` nodes of largest gain, each step measures every
    remaining one with those already chosen and keeps the best. Returns (node, output error
    with it and every node before it float), in that order.
    """
    candidates = [n.name for n in nodes if n.gain > 0 and n.op_type != OUTPUT_ROUNDING][:CURVE]
    everything = {n.name for n in nodes}
    chosen: list[str] = []
    curve: list[tuple[str, float]] = []
    while candidates:
        trials = {name: error(everything - {*chosen, name}) for name in candidates}
        best = min(trials, key=trials.get)  # ties: the first by gain
        chosen.append(best)
        candidates.remove(best)
        curve.append((best, trials[best]))
    return curve
