"""Mixed-bit weight quantization (``bit_num=0``): how many bits each weight gets.

Widths: a weight is stored at 4 (int4), 8 or 16 bits (int16; int4 and int16 need opset
21). A width in between (5, 6, 7 bits) keeps fewer levels in the same bytes as 8, so it
would lose accuracy for no smaller file.

A weight's error at a width (the widest width counts as exact):

* without data: the relative weight error ``||W_q - W|| / ||W||``;
* with calibration data: the relative error of the model's outputs when that weight
  alone is quantized, ``||y_q - y|| / ||y||`` on a few calibration samples. This is what
  gives sensitive layers (a stem convolution, a first depthwise convolution) more bits:
  their weight errors alone do not show it. When the model will be rounded by GPTQ
  (``weight_rounding=GPTQ`` or ``ADAROUND``), the weight is measured as GPTQ rounds it
  (:class:`WeightRounding`): at 4 bits GPTQ leaves a fraction of round-to-nearest's error,
  so measuring nearest rounding would keep layers wider than the written model needs.

The budget: errors of different weights add roughly in squares, so the search bounds
their root mean square, ``sqrt(sum(error^2) / weights) <= init_scale``. Starting from
every weight at 16 bits, it repeatedly narrows the weight whose next narrower width
saves the most bits of the model per unit of squared error added, among the moves that
still fit the budget, until none fits. So a larger init_scale compresses more, a large
insensitive layer drops to 4 bits before a small or sensitive one, and a sensitive one
(whose 8-bit error alone would take much of the budget) stays at 16 bits.

``auto_tune`` (needs data): a binary search over init_scale (on a log scale) for the
largest whose model, every weight at its width, keeps the cosine similarity of its
outputs to the float model's at AUTO_TUNE_COSINE (0.995) or more.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ..graph.query import attribute, constant_array
from ..graph.runtime import make_session
from ..quantizers.weight_bits import level_bound, quantize_weight, relative_error
from ..quantizers.weight_only import WeightOnlyPlan
from ..recovery.bias_correction import correctable
from ..recovery.gptq import RoundingLayer, compensated_rows, weight_only_layers
from ..recovery.layers import as_rows, from_rows, per_row
from .metrics import METRICS, PairStats

AUTO_TUNE_COSINE = 0.995


@dataclass(frozen=True)
class LayerBits:
    """The width chosen for one weight, and its error at each width tried."""

    name: str
    nodes: tuple[str, ...]
    elements: int
    bits: int
    errors: dict[int, float]


@dataclass
class MixedBitReport:
    init_scale: float
    measured_on: str  # "weights", or "model outputs on N calibration samples"
    layers: list[LayerBits]
    auto_tuned: bool = False
    cosine: float | None = None  # output cosine of the allocation on the samples (estimated; the built one if checked)
    tries: list[tuple[float, float, float]] = field(default_factory=list)  # auto_tune: (init_scale, bits, cosine)
    checked: list[tuple[float, float]] = field(default_factory=list)  # auto_tune, GPTQ: (init_scale, built cosine)
    searched: Any = None  # with an evaluator: the search's report (passes.choose_widths.WidthSearchReport)

    @property
    def bits(self) -> dict[str, int]:
        return {layer.name: layer.bits for layer in self.layers}

    @property
    def average_bits(self) -> float:
        total = sum(layer.elements for layer in self.layers)
        return sum(layer.bits * layer.elements for layer in self.layers) / total if total else float("nan")


def widths(opset21: bool) -> tuple[int, ...]:
    """The widths to choose from: int4 and int16 weights need opset 21."""
    return (4, 8, 16) if opset21 else (8,)


def allocate(errors: dict[str, dict[int, float]], shares: dict[str, float], init_scale: float,
             choices: Sequence[int]) -> dict[str, int]:
    """Per weight, its width under the root-mean-square error budget ``init_scale`` (module docstring)."""
    bits = {name: choices[-1] for name in errors}
    budget = len(errors) * init_scale**2
    while True:
        best, best_value = None, -1.0
        for name, width in bits.items():
            position = choices.index(width)
            if position == 0:
                continue
            narrower = choices[position - 1]
            added = errors[name][narrower] ** 2 - error_at(errors, name, width, choices) ** 2
            if added > budget:
                continue
            value = shares[name] * (width - narrower) / max(added, 1e-30)
            if value > best_value:
                best, best_value = (name, narrower, added), value
        if best is None:
            return bits
        name, narrower, added = best
        bits[name] = narrower
        budget -= added


def error_at(errors: dict[str, dict[int, float]], name: str, bits: int, choices: Sequence[int]) -> float:
    return 0.0 if bits == choices[-1] else errors[name][bits]


def shares_of(plan: WeightOnlyPlan) -> dict[str, float]:
    """Each weight's share of all the elements the plan quantizes."""
    total = sum(tensor.size for tensor in plan.tensors.values())
    return {name: tensor.size / total for name, tensor in plan.tensors.items()}


def weight_errors(plan: WeightOnlyPlan, choices: Sequence[int]) -> dict[str, dict[int, float]]:
    """Data-free errors: each weight's relative error at each width but the widest (counted exact)."""
    return {name: {bits: relative_error(tensor.array, quantize_weight(tensor.array, bits, tensor.axis))
                   for bits in choices[:-1]}
            for name, tensor in plan.tensors.items()}


# Compares the outputs of a session (run with some inputs overridden) with the float references.
Score = Callable[[Any, dict[str, np.ndarray]], PairStats]


class WeightRounding:
    """A weight's dequantized values at a width, as the written model will have them: rounded to nearest,
    or, for the weights with an input second moment in ``second_moments`` (by weight name, of the float
    model's layer input, (groups, D, D) as the layer-input observers give it), by GPTQ on the same grid
    (:func:`lowbit.recovery.gptq.compensated_rows`)."""

    def __init__(self, plan: WeightOnlyPlan, second_moments: dict[str, np.ndarray] | None = None):
        self.plan = plan
        self.second_moments = second_moments or {}
        self.layers = weight_only_layers(plan) if second_moments else {}

    @property
    def compensates(self) -> bool:
        return bool(self.second_moments)

    def __call__(self, name: str, bits: int) -> np.ndarray:
        tensor = self.plan.tensors[name]
        quantized = quantize_weight(tensor.array, bits, tensor.axis)
        node, covariance = self.layers.get(name), self.second_moments.get(name)
        if node is None or covariance is None or bits < 2 or not np.all(np.isfinite(covariance)):
            return quantized.dequantize()
        weight = tensor.array.astype(np.float64)
        rows_shape = as_rows(node, weight).shape[:2]
        if quantized.scale.size not in (1, rows_shape[0] * rows_shape[1]):  # not one per output channel: as written
            return quantized.dequantize()
        scale = per_row(quantized.scale, rows_shape)
        layer = RoundingLayer(node, weight, -level_bound(bits), level_bound(bits))
        rows = compensated_rows(layer, covariance, scale) * scale[..., None]
        return from_rows(node, rows, weight.shape).astype(np.float32)


class OutputProbe:
    """The float model in ONNX Runtime with the planned weights as inputs that a run may override.

    Running it with some weights replaced by their dequantized values gives the outputs of
    the weight-quantized model without building one model per candidate. With
    ``correct_biases``, each Conv/Gemm weight overridden also overrides its layer's bias
    by the shift that bias correction will take out (``bias - dW . mean(input)``, from the
    layer's per-channel input means on the samples), so the search sees the errors that
    remain after correction: a 4-bit layer's mean shift is what correction removes.

    ``input_means`` are those per-channel means, by tensor name (:func:`bias_inputs` names
    them; the float run over the samples measures them); ``score`` runs the probe's
    session over the samples and compares with the float model's outputs.
    """

    def __init__(self, model: ir.Model, plan: WeightOnlyPlan, score: Score,
                 input_means: dict[str, np.ndarray] | None = None):
        self.plan = plan
        self.biases = _correctable_biases(plan) if input_means is not None else {}
        proto = ir.serde.serialize_model(model)
        initializers = {t.name: t for t in proto.graph.initializer}
        for name in [*plan.tensors, *(bias.value_name for bias in self.biases.values())]:
            tensor = initializers[name]
            proto.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, tensor.dims))
        self.session = make_session(proto)
        self.score = score
        for bias in self.biases.values():
            bias.input_mean = input_means[bias.input_name]

    def overrides(self, dequantized: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Feeds for these dequantized weights, with their layers' corrected biases."""
        feeds = dict(dequantized)
        for name, values in dequantized.items():
            bias = self.biases.get(name)
            if bias is not None:
                feeds[bias.value_name] = bias.corrected(values - self.plan.tensors[name].array)
        return feeds

    def compare(self, dequantized: dict[str, np.ndarray]) -> PairStats:
        return self.score(self.session, self.overrides(dequantized))


def bias_inputs(plan: WeightOnlyPlan) -> list[str]:
    """The tensors whose per-channel means the probe's bias correction reads: inputs of correctable layers."""
    return sorted({bias.input_name for bias in _correctable_biases(plan).values()})


@dataclass
class _LayerBias:
    """The bias of a Conv/Gemm read by one node, and how a weight change shifts that node's output mean."""

    node: ir.Node
    value_name: str
    bias: np.ndarray
    input_name: str
    input_mean: np.ndarray | None = None

    def corrected(self, weight_change: np.ndarray) -> np.ndarray:
        mean = self.input_mean
        if self.node.op_type == "Gemm":
            shift = weight_change @ mean if attribute(self.node, "transB", 0) else mean @ weight_change
        else:  # Conv, any group: each output channel reads the input channels of its group
            groups = attribute(self.node, "group", 1)
            out_channels, per_group = weight_change.shape[:2]
            change = weight_change.reshape(groups, out_channels // groups, per_group, -1).sum(axis=3)
            shift = np.einsum("goi,gi->go", change, mean.reshape(groups, per_group)).reshape(-1)
        return (self.bias - shift).astype(np.float32)


def _correctable_biases(plan: WeightOnlyPlan) -> dict[str, _LayerBias]:
    """Weights read by one Conv or Gemm (no transA, alpha = beta = 1) that has a constant bias of its own."""
    found = {}
    for name, tensor in plan.tensors.items():
        if len(tensor.readers) != 1:
            continue
        node, index = tensor.readers[0]
        if index != 1 or not correctable(node) or len(node.inputs) < 3:
            continue
        bias = constant_array(node.inputs[2])
        if bias is None or bias.ndim != 1 or len(node.inputs[2].uses()) != 1:
            continue
        found[name] = _LayerBias(node, node.inputs[2].name, bias.astype(np.float64), node.inputs[0].name)
    return found


def relative_output_error(stats: PairStats) -> float:
    return math.sqrt(stats.sum_sq_diff / stats.sum_sq_reference) if stats.sum_sq_reference else 0.0


def output_errors(plan: WeightOnlyPlan, probe: OutputProbe, choices: Sequence[int],
                  step: Callable[[], None] = lambda: None, rounded: WeightRounding | None = None
                  ) -> dict[str, dict[int, float]]:
    """Errors with data: the model's relative output error with one weight quantized at a time."""
    rounded = rounded or WeightRounding(plan)
    errors: dict[str, dict[int, float]] = {}
    for name in plan.tensors:
        errors[name] = {}
        for bits in choices[:-1]:
            errors[name][bits] = relative_output_error(probe.compare({name: rounded(name, bits)}))
            step()
    return errors


def allocation_cosine(plan: WeightOnlyPlan, probe: OutputProbe, bits: dict[str, int],
                      cache: dict[tuple[str, int], np.ndarray], rounded: WeightRounding | None = None) -> float:
    """Output cosine similarity of the model with every weight at its allocated width."""
    rounded = rounded or WeightRounding(plan)
    weights = {}
    for name, width in bits.items():
        if (name, width) not in cache:
            cache[(name, width)] = rounded(name, width)
        weights[name] = cache[(name, width)]
    return METRICS["cosine-similarity"].value(probe.compare(weights))


def tune_init_scale(plan: WeightOnlyPlan, probe: OutputProbe, errors: dict[str, dict[int, float]],
                    choices: Sequence[int], target: float = AUTO_TUNE_COSINE, steps: int = 14,
                    rounded: WeightRounding | None = None
                    ) -> tuple[float, dict[str, int], float, list[tuple[float, float, float]]]:
    """The largest init_scale (within a factor 10^(5 / 2^steps)) whose allocation keeps the output cosine >= target.

    Returns (init_scale, bits per weight, cosine, tries); init_scale is searched over
    [1e-5, 1] on a log scale. When even 1e-5 fails, every weight stays at the widest width.
    """
    shares = shares_of(plan)
    cache: dict[tuple[str, int], np.ndarray] = {}
    tries: list[tuple[float, float, float]] = []

    def evaluate(init_scale: float) -> tuple[dict[str, int], float]:
        bits = allocate(errors, shares, init_scale, choices)
        cosine = allocation_cosine(plan, probe, bits, cache, rounded)
        tries.append((init_scale, sum(bits[n] * shares[n] for n in bits), cosine))
        return bits, cosine

    widest = {name: choices[-1] for name in errors}
    best = (0.0, widest, allocation_cosine(plan, probe, widest, cache, rounded))
    low, high = -5.0, 0.0  # log10(init_scale)
    for _ in range(steps):
        middle = (low + high) / 2
        bits, cosine = evaluate(10**middle)
        if cosine >= target:
            best, low = (10**middle, bits, cosine), middle
        else:
            high = middle
    return best[0], best[1], best[2], tries
