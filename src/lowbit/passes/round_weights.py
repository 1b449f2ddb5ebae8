"""GPTQ: re-round each integer weight against its layer's input second moments, on the same grid.

FULL_QUANT's int8 weights (its default), and WEIGHT_QUANT's integer weights of 2 to 16 bits
when calibration data is given and ``weight_rounding=GPTQ`` (there the layer inputs are
float activations after the weights rounded before them).

Reads: the rewritten model and the float weights before the rewrite. Needs: the second
moment of every re-rounded layer's input, measured on the quantized model (its first 64
calibration samples, a subset of each one's patches). Changes the model: which integer
each weight gets (scales, zero points and file size stay). The rule and its fallbacks are
:mod:`lowbit.recovery.gptq`'s.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from ..config.model import QuantConfig
from ..errors import LowbitError
from ..graph.loading import with_opset
from ..graph.query import attribute, constant_array
from ..pipeline.engine import Request
from ..pipeline.state import QuantState
from ..quantizers.levels import AUTO, PACKED_TAG, channel_shape, fixed_count, packed_bytes, table_levels
from ..quantizers.saturation import guarded, kernel_pairs
from ..quantizers.weight_bits import level_bound
from ..recovery.gptq import (
    LevelsRow,
    RoundingLayer,
    RoundingReport,
    compensable,
    compensate_rounding,
    plan_rounding,
    relative_squared_error,
    weight_only_layers,
)
from ..recovery.layers import LayerJob, by_tensor, in_stages, integer_weight
from ..recovery.paired import InputPair, beside, paired_model
from .layer_inputs import LayerInputsPass


class RoundWeights(LayerInputsPass):
    name = "round_weights"
    setting = "weight_rounding"
    requires = ("plan", "float_layers")
    changes_model = True

    def applies(self, state: QuantState) -> bool:
        config = state.config
        if config.weight_rounding not in ("GPTQ", "ADAROUND") and not asks_levels(config):
            return False
        if config.quant_type == "FULL_QUANT" and not state.plan.activations:
            return False
        if not state.data.given:  # ranges from a calibration table, or weights only, and no data
            if asks_levels(config):
                raise LowbitError("weight_levels chooses each layer's levels by its output error on calibration "
                                  "data, and none was given; give --data FOLDER")
            state.note(f"weight_rounding={config.weight_rounding} measures the layers' inputs on calibration "
                       "data, and none was given: weights are rounded to nearest")
            return False
        if asks_levels(config) and config.weight_rounding == "ADAROUND":
            state.note("weight_rounding=ADAROUND with weight_levels: AdaRound chooses up or down on the uniform "
                       "grid, so the levels are rounded by GPTQ alone")
        layers = [layer for layer in rounding_layers(state) if compensable(layer.node)]
        staged = _staged(layers, config, state)
        toward_float = staged and config.quant_type == "WEIGHT_QUANT"
        self.reference, self.pairs = _float_pairs(state, layers) if toward_float else (None, {})
        self.job = plan_rounding(layers, {name: pair.joined for name, pair in self.pairs.items()})
        self.stages = in_stages(self.job, state.model.graph) if staged else [self.job]
        return bool(self.job.layers)

    def requests(self, state: QuantState) -> list[Request]:
        return [Request(observers) for observers in by_tensor(self.stages[0].observers)]

    def measured_model(self, state: QuantState):
        return self._model_for(state, self.stages[0])

    def _model_for(self, state: QuantState, stage: LayerJob):
        """The model a stage is measured on: the quantized one, with the float model beside it for the layers
        rounded toward its output."""
        model = super().measured_model(state)
        pairs = [self.pairs[layer.node.name] for layer, _ in stage.layers if layer.node.name in self.pairs]
        return paired_model(model, self.reference, pairs) if pairs else model

    def run(self, state: QuantState) -> RoundingReport:
        config = state.config
        self.stored = "packed" if config.pack_weight_levels else "once packed (stored as integers)"
        if config.weight_levels == AUTO:  # search_levels rounds each layer on 16 to 128 levels from these moments
            state.level_job = self.job
        report = compensate_rounding(self.stages, self.samples_seen, self.started,
                                     refine=config.weight_rounding == "ADAROUND",
                                     levels=fixed_levels(self.job, config),
                                     compensate=config.weight_rounding != "NEAREST",
                                     measure=lambda index, stage: self._measure(state, index, stage))
        if config.quant_type == "WEIGHT_QUANT":
            report.levels += _table_levels(state)
        state.rounded_toward_float.update(report.toward_float)
        return report

    def _measure(self, state: QuantState, index: int, stage: LayerJob) -> None:
        """Fill stage ``index``'s observers on the model as the stages before it left it."""
        state.engine.run(self._model_for(state, stage), [Request(o) for o in by_tensor(stage.observers)],
                         what=f"{self.name} (stage {index + 1} of {len(self.stages)})", model_label="quantized model",
                         limit=self.samples(state).limit)

    def describe(self, report: RoundingReport) -> list[str]:
        stages = f" in {len(self.stages)} stages" if len(self.stages) > 1 else ""
        toward = f", {len(report.toward_float)} toward the float model's output" if report.toward_float else ""
        lines = [] if not report.layers else [
            f"  weight rounding: {report.method} on {report.layers} layers{stages}{toward} from {report.samples} "
            "samples, "
            f"mean layer output error {report.error_nearest:.3g} (nearest) -> {report.error_compensated:.3g}, "
            f"{report.seconds:.1f} s"]
        lines += [f"    fallback: {fallback}" for fallback in report.fallbacks]
        if report.levels:
            rows = report.levels
            uniform, packed = sum(r.bytes_uniform for r in rows), sum(r.bytes_packed for r in rows)
            error_uniform = sum(r.uniform_output_error for r in rows) / len(rows)
            error_levels = sum(r.output_error for r in rows) / len(rows)
            counts = sorted({r.count for r in rows})
            spread = ", ".join(f"{k} on {sum(r.count == k for r in rows)}" for k in counts)
            lines.append(f"  weight levels: {spread} of {len(rows)} layers, weights "
                         f"{uniform / 1e6:.2f} -> {packed / 1e6:.2f} MB {self.stored} ({packed / uniform:.2f}x), "
                         f"mean layer output error {error_uniform:.3g} (uniform) -> {error_levels:.3g}; per layer: "
                         "result.weight_rounding.levels")
        return lines


def _staged(layers: list[RoundingLayer], config: QuantConfig, state: QuantState) -> bool:
    """Whether each stage of layers is measured after the stages before it are re-rounded: with GPTQ on a grid
    narrower than int8 (W4A8, weight-only below 8 bits).

    Measured on EfficientNet-Lite0 (300 held-out crops): W4A8 top-1 agreement 0.547 -> 0.653, 4-bit
    weight-only 0.580 -> 0.633; int8 weights, 0.970 either way (1 - cosine 0.00185 in one run, 0.00192 in
    stages); weight_levels on the int8 grid, 1 - cosine 0.0056 -> 0.0059 at 64 levels, 0.0199 -> 0.0186 at 32,
    0.089 -> 0.094 at 16. Where the stages gain nothing measurable, the one run stays: each stage is a run over
    64 samples (EfficientNet-Lite0 at 4 bits: 23 -> 45 s).
    """
    if config.weight_rounding == "NEAREST" or not state.data.rereadable:
        return False
    return any(layer.qmax - layer.qmin < 254 for layer in layers if integer_weight(layer.node) is not None)


def _float_pairs(state: QuantState, layers: list[RoundingLayer]) -> tuple[onnx.ModelProto | None,
                                                                          dict[str, InputPair]]:
    """The float model (at the quantized model's opset, prefixed to sit beside it) and, per layer it has a node
    of the same name and op for, the pair of inputs GPTQ reads to round that layer toward the float model's output.

    Weight-only below 8 bits only. There the layer inputs of the two models differ only by what
    the weights rounded upstream changed, the same way on every sample, and the correction
    cancels it. Measured (300 held-out crops per EfficientNet, 1000 digits; agreement / 1 - cosine,
    bench/RECOVERY.md), 4-bit weight-only: EfficientNet-Lite0 0.633 / 0.120 -> 0.673 / 0.120,
    Lite1 0.633 / 0.134 -> 0.677 / 0.109, digit CNN 0.996 / 0.00044 -> 0.997 / 0.00040. With
    quantized activations the inputs also differ by the activations' own rounding noise, which
    the correction fits rather than cancels: W4A8 lost on both EfficientNets (Lite0 0.590 / 0.116
    -> 0.637 / 0.143, Lite1 0.680 / 0.105 -> 0.633 / 0.131), and W8A8 on Lite0 (0.960 / 0.00186 ->
    0.950 / 0.00398, bias correction off), so full quantization rounds toward each layer's own weight.
    """
    reference = state.float_reference()
    opset = state.model.opset_imports.get("", 1)
    if reference.opset_imports.get("", 1) != opset:
        reference = with_opset(reference, opset)
        if reference is None:
            state.note(f"weight rounding: onnx's converter could not take the float model to opset {opset}, where "
                       "the quantized one is; each layer is rounded toward its own float weight")
            return None, {}
    nodes = {node.name: node for node in reference.graph}
    pairs = {}
    for layer in layers:
        twin = nodes.get(layer.node.name)
        if twin is None or twin.op_type != layer.node.op_type or twin.inputs[0] is None:
            continue
        spatial = layer.float_weight.ndim - 2 if layer.node.op_type == "Conv" else 0
        groups = int(attribute(layer.node, "group", 1)) if spatial else 1
        pairs[layer.node.name] = InputPair(layer.node.inputs[0].name, twin.inputs[0].name, groups, spatial)
    return beside(ir.serde.serialize_model(reference)), pairs


def _table_levels(state: QuantState) -> list[LevelsRow]:
    """Weight-only lookup tables (every reader a Gather: word embeddings) on their fixed levels, tagged for
    packing. No input statistic weighs a table's entries: the levels minimise the squared error of the
    dequantized table, and each entry goes to the nearest."""
    rows = []
    for name, tensor in state.plan.tensors.items():
        nodes = [node for node, _ in tensor.readers]
        count = _fixed_count(nodes[0], state.config)
        dq = nodes[0].inputs[0].producer()
        bits = state.bits[name]
        if any(node.op_type != "Gather" for node in nodes) or count is None or count >= 2 ** bits \
                or dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0].const_value is None:
            continue
        stored = dq.inputs[0].const_value.numpy()
        scale, zero = constant_array(dq.inputs[1]), constant_array(dq.inputs[2]) if len(dq.inputs) > 2 else 0
        table, low, high = tensor.array.astype(np.float64), -level_bound(bits), level_bound(bits)
        integers, chosen = table_levels(table, scale, zero, tensor.axis, low, high, count)
        uniform_error = _relative_error(table, stored, scale, zero, tensor.axis)
        dq.inputs[0].const_value = ir.tensor(integers.astype(stored.dtype), name=dq.inputs[0].name)
        dq.metadata_props[PACKED_TAG] = str(count)
        error = _relative_error(table, integers, scale, zero, tensor.axis)
        rows.append(LevelsRow(name, count, [int(v) for v in chosen], error, error, uniform_error,
                              stored.size * stored.itemsize, packed_bytes(stored.size, count)))
    return rows


def _relative_error(table, integers, scale, zero, axis) -> float:
    shape = channel_shape(table.ndim, axis)
    return relative_squared_error((integers - np.reshape(zero, shape)) * np.reshape(scale, shape), table)


def _fixed_count(node, config) -> int | None:
    entries = ((config.node_config or {}).get(node.name), (config.op_config or {}).get(node.op_type))
    return next((int(e.weight_levels) for e in entries if e is not None and e.weight_levels is not None),
                fixed_count(config.weight_levels))


def asks_levels(config) -> bool:
    """Whether weight_levels is set, for the model or in an op_config / node_config entry."""
    entries = [*(config.op_config or {}).values(), *(config.node_config or {}).values()]
    return config.weight_levels is not None or any(e.weight_levels is not None for e in entries)


def fixed_levels(job, config) -> dict[str, int]:
    """Per layer of ``job``, the fixed K asked for it: its node_config entry's, else its op type's op_config
    entry's, else the model's weight_levels (none under AUTO)."""
    chosen = {}
    for layer, _ in job.layers:
        count = _fixed_count(layer.node, config)
        if count is not None:
            chosen[layer.node.name] = count
    return chosen


def rounding_layers(state: QuantState) -> list[RoundingLayer]:
    """The layers whose integers are chosen on data, with their float weights and integer ranges."""
    return _full_quant_layers(state) if state.config.quant_type == "FULL_QUANT" else _weight_only_layers(state)


def _full_quant_layers(state: QuantState) -> list[RoundingLayer]:
    layers = []
    for slot in state.plan.weights:
        if slot.index != 1 or slot.node.name not in state.float_layers:
            continue
        weight = state.float_layers[slot.node.name].float_weight
        pairs = (kernel_pairs(slot.node, weight.shape)
                 if guarded(slot.node, slot.scheme.qtype, state.plan.saturation_safe) else None)
        layers.append(RoundingLayer(slot.node, weight, slot.scheme.qmin, slot.scheme.qmax, pairs))
    return layers


def _weight_only_layers(state: QuantState) -> list[RoundingLayer]:
    """The weights GPTQ re-rounds (:func:`~lowbit.recovery.gptq.weight_only_layers`) at 2 bits or more (1 bit
    has no zero level to round to)."""
    return [RoundingLayer(node, state.float_layers[node.name].float_weight, -level_bound(state.bits[name]),
                          level_bound(state.bits[name]))
            for name, node in weight_only_layers(state.plan).items()
            if state.bits[name] >= 2 and node.name in state.float_layers]
