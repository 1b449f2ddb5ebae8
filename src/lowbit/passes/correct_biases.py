"""Bias correction: take each int8 layer's output shift out of its bias.

Reads: the quantized model (after weight rounding, when that ran) and the float weights
and biases before the rewrite. Needs: per layer, the mean patch of its input, measured on
the quantized model as weight rounding left it (its first 64 calibration samples).
Changes the model: the biases (int32 where the input is quantized, float32 otherwise).
The rule is :mod:`lowbit.recovery.bias_correction`'s.
"""

from __future__ import annotations

from ..pipeline.state import QuantState
from ..recovery.bias_correction import (
    BiasCorrectionReport,
    correct_biases,
    correctable,
    plan_correction,
)
from .layer_inputs import LayerInputsPass


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
        self.job = plan_correction([layer for layer in state.float_layers.values() if correctable(layer.node)])
        return bool(self.job.layers)

    def run(self, state: QuantState) -> BiasCorrectionReport:
        return correct_biases(state.model, self.job, self.samples_seen, self.started)

    def describe(self, report: BiasCorrectionReport) -> list[str]:
        if not report.layers:
            return []
        return [f"  bias correction: {report.layers} layers on {report.samples} samples, largest shift "
                f"{report.largest_shift:.4g}, {report.seconds:.1f} s"]
