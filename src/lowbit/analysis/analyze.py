"""``lowbit analyze``: where a quantized model loses accuracy, and what to revert.

Given the float model, its quantized (QDQ) form and a few samples, one job measures:

1. per quantized node, the output error with only that node quantized and with only that
   node left float (:mod:`.sensitivity`, one session of the switched model, :mod:`.switches`),
   and a ranking: first the nodes in the order in which leaving them float helps most, found
   by a greedy search with every step measured, then the others by their own gain;
2. per tensor along the graph, the quantized model's value against the float one, with
   the histogram, range and clip rate of each quantized activation, and the per-channel
   ranges of each quantized weight (:mod:`.tensors`);
3. a suggestion: the first few nodes of the ranking, and for each of them whether 16-bit
   inputs would do as well as float, as a ``skip_quant_node`` line and a Horizon
   ``node_config`` snippet.

The float model is prepared as lowbit prepares it for quantization, so its node and tensor
names match those of a model lowbit wrote.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from ..config import QuantConfig, load_config
from ..data.calibration import CalibrationData, FeedSource
from ..data.feeds import batched, input_specs
from ..distributed.workers import start_workers
from ..errors import LowbitError
from ..graph.loading import load_model
from ..graph.passes import prepare, typed
from ..graph.query import is_float32
from ..graph.runtime import make_session
from ..quantizers.levels import unpack_model
from ..quantizers.pair_order import CHANNEL_ORDER_KEY, reorder
from ..recovery.equalization import EQUALIZATION_KEY, equalize, same_signature
from ..reports import debug
from .sensitivity import NodeSensitivity, OutputError, mean_error, ranked_nodes
from .switches import switched_model
from .tensors import ActivationRange, ErrorSums, TensorRow, WeightRow, weight_row

SUGGESTED = 3  # at most this many nodes in the suggestion
BATCH = 8  # samples per run where the model's batch dimension is free
SAMPLES = 32  # samples analysed unless told otherwise


@dataclass(frozen=True)
class Precision:
    """A suggested node's output error with the rest of the suggestion float and it in each form."""

    int8: float
    int16: float
    float32: float

    @property
    def qtype(self) -> str:
        """int16 where it recovers at least 90% of what float recovers, else float32."""
        recovered = self.int8 - self.float32
        return "int16" if recovered <= 0 or self.int8 - self.int16 >= 0.9 * recovered else "float32"


@dataclass(frozen=True)
class Suggestion:
    nodes: list[str]  # the suggested nodes, in the order the search chose them
    curve: list[tuple[str, float]]  # (node, output error with it and every node before it left float)
    precisions: dict[str, Precision] = field(default_factory=dict)

    @property
    def skip_quant_node(self) -> str:
        """The MindSpore INI form: each suggested node float."""
        return "skip_quant_node=" + ",".join(self.nodes)

    @property
    def node_config(self) -> dict:
        """The Horizon quant_config form: int16 where the measurement says it is enough, else float32."""
        return {"node_config": {name: {"qtype": self.precisions[name].qtype if name in self.precisions
                                       else "float32"} for name in self.nodes}}


@dataclass
class Analysis:
    float_path: Path
    quantized_path: Path
    samples: int
    outputs: list[str]
    quantized_error: float  # the quantized model as ONNX Runtime runs it
    simulated_error: float  # every switch on: the same model as fake quantization
    nodes: list[NodeSensitivity]  # ranked: the greedy order first (see sensitivity.greedy_order), then by gain
    tensors: list[TensorRow]  # in graph order
    weights: list[WeightRow]  # the weights (int32 biases left out: their grid is far finer than the weights')
    suggestion: Suggestion
    seconds: float = 0.0
    runs: int = 0  # runs of the switched model
    notes: list[str] = field(default_factory=list)


def analyze(float_path: str | Path, quantized_path: str | Path, data: FeedSource | None = None, *,
            config: QuantConfig | None = None, samples: int = SAMPLES,
            progress: Callable[[str, int], Callable[[], None]] | None = None,
            warn: Callable[[str], None] = lambda message: None, float_model: ir.Model | None = None) -> Analysis:
    """Analyse ``quantized_path`` against ``float_path`` on the first ``samples`` samples of ``data``.

    ``data`` is given as to :func:`lowbit.quantize` (a folder, or an iterable of feed dicts);
    without it, ``calibrate_path`` / ``data_list`` of ``config``, whose ``[data_preprocess_param]``
    settings also apply. ``progress(label, total)`` returns a function called once per step.
    ``float_model``: the prepared float model to compare with, when it is not the file's as
    prepared (quantize's own report). Without it, the file's model is equalized and reordered as
    the quantized model's metadata says quantize did (:mod:`lowbit.recovery.equalization`,
    :mod:`lowbit.quantizers.pair_order`).
    """
    start = time.perf_counter()
    float_path, quantized_path = Path(float_path), Path(quantized_path)
    config = config if config is not None else load_config(None, {})
    quantized = _load_quantized(quantized_path)
    if float_model is None:
        float_model = _as_quantize_rewrote(prepare(load_model(float_path)[0]), quantized, float_path, quantized_path)
    _check_pair(float_model, quantized, float_path, quantized_path)
    outputs = [v.name for v in float_model.graph.outputs if is_float32(v)]
    specs = input_specs(float_model)
    feeds = _read_samples(CalibrationData(data, config, specs, warn), samples)
    batches = list(batched(feeds, specs, BATCH))

    traced = debug.trace(float_model, quantized, [node.name for node in quantized.graph])
    step = progress("tensors", len(feeds)) if progress else (lambda: None)
    tensors = _compare_tensors(float_model, quantized, traced, feeds, step)
    float_ranges = {t.name: (t.activation.histogram.min, t.activation.histogram.max)
                    for t in tensors if t.activation is not None and t.activation.histogram.min is not None}

    switched = switched_model(_load_quantized(quantized_path), float_model, float_ranges)
    if not switched.nodes:
        raise LowbitError(f"{quantized_path}: no node reads a DequantizeLinear output; "
                          "analyze reads QDQ models (QuantizeLinear/DequantizeLinear pairs)")
    error = OutputError(make_session(switched.model), switched, batches, outputs)
    simulated = error({n.name for n in switched.nodes})
    # against the float model itself (not the switched model with every switch off, which keeps the rounding of
    # weights whose float counterpart it did not find)
    float_session, quantized_session = make_session(float_model), make_session(quantized)
    quantized_error = mean_error([float_session.run(outputs, b) for b in batches],
                                 (quantized_session.run(outputs, b) for b in batches))

    step = progress("sensitivity", len(switched.nodes)) if progress else (lambda: None)
    where = config.source("ray_address" if config.ray_address is not None else "workers")
    with start_workers(config.workers, config.ray_address, where) as workers:  # the per-node figures in shares
        nodes, curve = ranked_nodes(error, simulated, step, workers=workers)
    suggestion = _suggest(error, curve, {n.name for n in nodes})
    weights = [weight_row(t) for t in traced if t.weight is not None and t.grid is not None and t.grid.bits <= 16]
    notes = []
    unmatched = [name for node in switched.nodes for name in node.unmatched]
    if unmatched:
        notes.append(f"{len(unmatched)} of {sum(len(n.weights) for n in switched.nodes)} quantized constants "
                     f"(weights and biases) have no float counterpart in {float_path.name} (matched by node name "
                     f"and input position), first {unmatched[0]}: their rounding stays in every figure, float ones "
                     "included")
    if abs(simulated - quantized_error) > max(0.1 * quantized_error, 1e-4):
        notes.append(f"ONNX Runtime's integer kernels give an output error of {quantized_error:.3g}, the float "
                     f"simulation of the same model {simulated:.3g}: the per-node figures are the simulation's")
    return Analysis(float_path, quantized_path, len(feeds), outputs, quantized_error, simulated, nodes, tensors,
                    weights, suggestion, time.perf_counter() - start, error.runs, notes)


def _as_quantize_rewrote(float_model: ir.Model, quantized: ir.Model, float_path: Path,
                         quantized_path: Path) -> ir.Model:
    """The prepared float model rewritten as the quantized model's metadata says quantize rewrote it: equalized
    (cross-layer equalization needs no data, so it is run again and its counts checked), then its channels
    reordered. Both compute what the original computes; only then do its tensors and constants match the
    quantized model's, channel for channel."""
    shapes = {EQUALIZATION_KEY: dict, CHANNEL_ORDER_KEY: list}
    written = {key: _metadata_json(quantized, key, shape, quantized_path) for key, shape in shapes.items()
               if key in quantized.metadata_props}
    if EQUALIZATION_KEY in written:
        again, recorded = equalize(float_model.graph).signature(), written[EQUALIZATION_KEY]
        if not same_signature(again, recorded):
            counts = ", ".join(f"{k} {recorded.get(k)} -> {again[k]}" for k in ("pairs", "channels", "clips_rewritten"))
            raise LowbitError(f"{quantized_path} was written with cross-layer equalization, and equalizing "
                              f"{float_path.name} again does not rescale its channels the same way ({counts}; the "
                              "scales' spread per pair differs): not the model it was quantized from, or another "
                              "lowbit version's rule")
    if CHANNEL_ORDER_KEY in written:  # the channels quantize reordered, in the same order
        reorder(float_model.graph, written[CHANNEL_ORDER_KEY])
    return float_model


def _metadata_json(model: ir.Model, key: str, shape: type, path: Path) -> Any:
    """lowbit's JSON under ``key`` in the model's metadata (a ``shape``: dict or list), or a clear error when an
    edit left something else."""
    try:
        value = json.loads(model.metadata_props[key])
    except ValueError as exc:
        raise LowbitError(f"{path}: its metadata {key} is not the JSON lowbit writes ({exc})") from None
    if not isinstance(value, shape):
        raise LowbitError(f"{path}: its metadata {key} is not the JSON lowbit writes (a {type(value).__name__})")
    return value


def _load_quantized(path: Path) -> ir.Model:
    """The quantized model with its weights as integer constants (non-uniform weights unpacked)."""
    model = load_model(path)[0]
    unpack_model(model)
    return typed(model)


def _read_samples(data: CalibrationData, count: int) -> list[dict[str, np.ndarray]]:
    if count < 1:
        raise LowbitError(f"samples={count}: the analysis needs at least one sample")
    if not data.given:
        raise LowbitError("the analysis needs data: give --data FOLDER (or calibrate_path / data_list in --config)")
    stream, _ = data.open(count)
    samples = list(stream)
    if not samples:
        raise LowbitError("the analysis data holds no sample")
    return samples


def _check_pair(float_model: ir.Model, quantized: ir.Model, float_path: Path, quantized_path: Path) -> None:
    float_inputs = {v.name for v in float_model.graph.inputs}
    quant_inputs = {v.name for v in quantized.graph.inputs}
    if float_inputs != quant_inputs:
        raise LowbitError(f"{quantized_path} does not look like a quantized form of {float_path}: inputs "
                          f"{sorted(quant_inputs)} against {sorted(float_inputs)}")
    if not any(node.op_type == "DequantizeLinear" for node in quantized.graph):
        raise LowbitError(f"{quantized_path}: no DequantizeLinear in the model; analyze reads QDQ models "
                          "(QuantizeLinear/DequantizeLinear pairs)")
    compensated = _compensated_sums(quantized)
    if compensated:
        name, op_type = compensated[0]
        raise LowbitError(f"{quantized_path}: {name} adds two copies of one {op_type} (error compensation, ec); "
                          "the analysis does not take ec nodes yet: analyse the model quantized without ec")
    readers = {node.name for node in quantized.graph if node.op_type not in ("QuantizeLinear", "DequantizeLinear")
               and any(v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear"
                       for v in node.inputs)}
    rounded = {node.inputs[0].name for node in quantized.graph
               if node.op_type == "QuantizeLinear" and node.inputs[0].const_value is None}
    float_tensors = {v.name for node in float_model.graph for v in node.outputs if v is not None}
    if readers and not readers & {node.name for node in float_model.graph} and not rounded & float_tensors:
        raise LowbitError(f"{quantized_path} does not look like a quantized form of {float_path}: none of its "
                          f"{len(readers)} quantized nodes (such as {sorted(readers)[0]!r}) is named as a node of the "
                          "float model, nor any tensor it rounds, and the analysis matches the float weights by node "
                          "name and the tensors by name")
    float_outputs = {v.name for v in float_model.graph.outputs}
    if not float_outputs & {v.name for v in quantized.graph.outputs}:
        raise LowbitError(f"{quantized_path} does not look like a quantized form of {float_path}: "
                          "no output name in common")


def _compensated_sums(model: ir.Model) -> list[tuple[str, str]]:
    """(Add, op type) where an Add sums two nodes of one op type that share an input: error compensation."""
    found = []
    for node in model.graph:
        producers = [v.producer() if v is not None else None for v in node.inputs]
        if node.op_type != "Add" or len(producers) != 2 or None in producers:
            continue
        a, b = producers
        shared = {id(v) for v in a.inputs if v is not None} & {id(v) for v in b.inputs if v is not None}
        if a.op_type == b.op_type and a.op_type != "DequantizeLinear" and shared:
            found.append((node.name, a.op_type))
    return found


def _suggest(error: OutputError, curve: list[tuple[str, float]], everything: set[str]) -> Suggestion:
    """The prefix of the greedy order, at most :data:`SUGGESTED` nodes, with the lowest error;
    and each of its nodes measured in int8, int16 and float with the others float."""
    if not curve:
        return Suggestion([], [])
    errors = [e for _, e in curve[:SUGGESTED]]
    count = errors.index(min(errors)) + 1
    suggested = [name for name, _ in curve[:count]]
    floated = everything - set(suggested)
    precisions = {name: Precision(error(floated | {name}), error(floated | {name}, wide={name}), errors[count - 1])
                  for name in suggested}
    return Suggestion(suggested, curve, precisions)


def _compare_tensors(float_model: ir.Model, quantized: ir.Model, traced: list[debug.TracedTensor],
                     samples: Sequence[dict[str, np.ndarray]], step: Callable[[], None]) -> list[TensorRow]:
    """Both models sample by sample, every matched tensor as an extra output (see :mod:`.tensors`)."""
    quant_producers = {v.name: node.name for node in quantized.graph for v in node.outputs if v is not None}
    rows: dict[str, TensorRow] = {v.name: TensorRow(v.name, "", "(graph input)")
                                  for v in float_model.graph.inputs if is_float32(v)}
    for node in float_model.graph:
        for value in node.outputs:
            if is_float32(value) and value.name in quant_producers:
                rows[value.name] = TensorRow(value.name, node.name, node.op_type)
    rounded: dict[str, str] = {}  # float tensor -> the dequantized tensor its readers see
    for t in traced:
        if t.weight is None and t.grid is not None and t.tensor in rows and t.tensor != t.dequant:
            rounded[t.tensor] = t.dequant
            row = rows[t.tensor]
            if row.activation is None:
                row.rounded, row.activation = ErrorSums(), ActivationRange(t.grid)
    # a Relu/Clip that the quantized model left to the tensor's Q/DQ pair (onnxruntime drops them):
    # there the quantized model computes the float model's tensor as the dequantized value
    computed = {name: rounded[name] if name in rounded and quant_producers.get(name, "") != row.producer else name
                for name, row in rows.items()}
    inputs = {v.name for v in float_model.graph.inputs}
    names = [name for name in rows if name not in inputs]
    float_session = make_session(float_model, names)
    quant_names = list(dict.fromkeys([computed[name] for name in names] + list(rounded.values())))
    quant_session = make_session(quantized, quant_names)
    for sample in samples:
        reference = {**sample, **dict(zip(names, float_session.run(names, sample)))}
        values = {**sample, **dict(zip(quant_names, quant_session.run(quant_names, sample)))}
        for name, row in rows.items():
            row.computed.add(reference[name], values[computed[name]])
            if name in rounded:
                row.rounded.add(reference[name], values[rounded[name]])
                row.activation.add(reference[name])
        step()
    return list(rows.values())
