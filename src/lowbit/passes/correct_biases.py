"""Bias correction: take each int8 layer's output shift out of its bias.

Reads: the quantized model (after weight rounding, when that ran) and the float weights
and biases before the rewrite. Needs: per layer, the mean patch of its input, measured on
the quantized model as weight rounding left it (its first ``bias_correction_samples``
calibration samples, 64 by default). Changes the model: the biases (int32 where the input
is quantized, float32 otherwise). The rule is :mod:`lowbit.recovery.bias_correction`'s.

With ``bias_correction_metric`` (Horizon's ``metric``), the corrected model is compared with
the uncorrected one on the held-back samples of the range search, and the corrected biases
are kept only if the metric is not worse.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from ..pipeline.passes import Samples
from ..pipeline.state import QuantState
from ..recovery.bias_correction import (
    BiasCorrectionReport,
    correct_biases,
    correctable,
    plan_correction,
)
from ..search.metrics import METRICS
from .layer_inputs import LayerInputsPass


@dataclass(frozen=True)
class Verdict:
    """bias_correction_metric's comparison on the held-back samples."""

    metric: str
    samples: int
    uncorrected: float
    corrected: float
    kept: bool


@dataclass(frozen=True)
class CorrectionOutcome:
    report: BiasCorrectionReport
    verdict: Verdict | None = None


class CorrectBiases(LayerInputsPass):
    name = "correct_biases"
    setting = "bias_correction"
    requires = ("plan", "float_layers")
    changes_model = True

    def applies(self, state: QuantState) -> bool:
        if not state.config.bias_correction or not state.data.given:
            if state.config.bias_correction and state.config.quant_type == "FULL_QUANT":  # ranges from a table
                state.note("bias_correction measures the layers' outputs on calibration data, and none was given: "
                           "biases are not corrected")
            return False
        # block reconstruction's integers, and GPTQ's rounded toward the float model's output, already answer
        # for the shift of the layers before them: a per-layer correction would undo that (digit CNN, 3-bit
        # weights, reconstructed: held-out error 0.23 -> 0.90 with it; EfficientNet-Lite0, 4-bit weight-only
        # toward the float output: 1 - cosine 0.120 -> 0.158, 0.160 corrected against the weight approximated)
        self.job = plan_correction([layer for name, layer in state.float_layers.items()
                                    if correctable(layer.node) and name not in state.reconstructed
                                    and name not in state.rounded_toward_float])
        return bool(self.job.layers)

    def samples(self, state: QuantState) -> Samples:
        return Samples(limit=state.config.bias_correction_samples)

    def run(self, state: QuantState) -> CorrectionOutcome:
        metric = state.config.bias_correction_metric
        if metric is None or not state.held_back:
            if metric is not None:
                state.note(f"bias_correction_metric={metric} compares on the samples the range search holds back, "
                           "and this job has none (one range method, or too few samples): biases are corrected "
                           "without the check")
            return CorrectionOutcome(correct_biases(state.model, self.job, self.samples_seen, self.started))
        uncorrected = self._score(state, metric)
        saved = _BiasSnapshot([layer.node for layer, _ in self.job.layers])
        report = correct_biases(state.model, self.job, self.samples_seen, self.started)
        corrected = self._score(state, metric)
        kept = METRICS[metric].best([corrected, uncorrected]) == 0  # ties keep the correction
        if not kept:
            saved.restore()
        return CorrectionOutcome(report, Verdict(metric, len(state.held_back), uncorrected, corrected, kept))

    @staticmethod
    def _score(state: QuantState, metric: str) -> float:
        stats = state.engine.score(ir.serde.serialize_model(state.model), state.held_back, state.held_back_outputs,
                                   state.held_back_references)
        return METRICS[metric].value(stats)

    def describe(self, outcome: CorrectionOutcome) -> list[str]:
        report, verdict = outcome.report, outcome.verdict
        if not report.layers:
            return []
        lines = [f"  bias correction: {report.layers} layers on {report.samples} samples, largest shift "
                 f"{report.largest_shift:.4g}, {report.seconds:.1f} s"]
        if verdict is not None:
            lines.append(f"    {verdict.metric} on {verdict.samples} held-back samples: {verdict.uncorrected:.6g} "
                         f"uncorrected, {verdict.corrected:.6g} corrected: "
                         + ("kept" if verdict.kept else "worse, the biases are restored"))
        return lines


class _BiasSnapshot:
    """The bias inputs of some nodes (and their integer constants, which correction rewrites in place)."""

    def __init__(self, nodes: list[ir.Node]):
        self.inputs = [(node, node.inputs[2] if len(node.inputs) > 2 else None) for node in nodes]
        self.constants = []
        for _, bias in self.inputs:
            producer = bias.producer() if bias is not None else None
            if producer is not None and producer.op_type == "DequantizeLinear":
                self.constants.append((producer.inputs[0], producer.inputs[0].const_value))

    def restore(self) -> None:
        for node, bias in self.inputs:
            if bias is None:
                node.resize_inputs(2)
            else:
                node.replace_input_with(2, bias)
        for value, tensor in self.constants:
            value.const_value = tensor
