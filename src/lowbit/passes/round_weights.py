"""GPTQ: re-round each int8 weight against its layer's input second moments, on the same grid.

Reads: the rewritten model and the float weights before the rewrite. Needs: the second
moment of every re-rounded layer's input, measured on the quantized model (its first 64
calibration samples, a subset of each one's patches). Changes the model: which integer
each weight gets (scales, zero points and file size stay). The rule and its fallbacks are
:mod:`lowbit.recovery.gptq`'s.
"""

from __future__ import annotations

from ..pipeline.state import QuantState
from ..recovery.gptq import (
    RoundingLayer,
    RoundingReport,
    compensable,
    compensate_rounding,
    plan_rounding,
)
from .layer_inputs import LayerInputsPass


class RoundWeights(LayerInputsPass):
    name = "round_weights"
    setting = "weight_rounding=GPTQ"
    requires = ("plan", "float_layers")
    changes_model = True

    def applies(self, state: QuantState) -> bool:
        if state.config.weight_rounding != "GPTQ" or not state.plan.activations:
            return False
        if not state.data.given:  # ranges from a calibration table, and no data
            state.note("weight_rounding=GPTQ measures the layers' inputs on calibration data, and none was given: "
                       "weights are rounded to nearest")
            return False
        self.job = plan_rounding([
            RoundingLayer(slot.node, state.float_layers[slot.node.name].float_weight, slot.scheme.qmin,
                          slot.scheme.qmax)
            for slot in state.plan.weights
            if slot.index == 1 and slot.node.name in state.float_layers and compensable(slot.node)])
        return bool(self.job.layers)

    def run(self, state: QuantState) -> RoundingReport:
        return compensate_rounding(self.job, self.samples_seen, self.started)

    def describe(self, report: RoundingReport) -> list[str]:
        lines = [] if not report.layers else [
            f"  weight rounding: GPTQ on {report.layers} layers from {report.samples} samples, mean layer output "
            f"error {report.error_nearest:.3g} (nearest) -> {report.error_compensated:.3g}, {report.seconds:.1f} s"]
        lines += [f"    fallback: {fallback}" for fallback in report.fallbacks]
        return lines
