"""What the passes that refine weights share: their statistics are a layer-input observer per layer.

GPTQ (round_weights) and bias correction (correct_biases) each plan a
:class:`~lowbit.recovery.layers.LayerJob` in ``applies`` and measure it on the quantized
model as the passes before them left it (weights stored dequantized), over the first
:data:`~lowbit.recovery.layers.SAMPLES` calibration samples.
"""

from __future__ import annotations

import onnx_ir as ir

from ..pipeline.engine import Request
from ..pipeline.passes import CURRENT, Pass, Samples
from ..pipeline.state import QuantState
from ..recovery.bias_correction import with_dequantized_constants
from ..recovery.layers import SAMPLES, LayerJob, by_tensor


class LayerInputsPass(Pass):
    """A pass whose ``job`` (set by ``applies``) holds the observers of its layers' inputs."""

    job: LayerJob

    def measures(self, state: QuantState) -> str:
        return CURRENT

    def measured_model(self, state: QuantState):
        # weights stored dequantized: ORT would otherwise dequantize every weight on every batch
        return with_dequantized_constants(ir.serde.serialize_model(state.model))

    def requests(self, state: QuantState) -> list[Request]:
        return [Request(observers) for observers in by_tensor(self.job.observers)]

    def samples(self, state: QuantState) -> Samples:
        return Samples(limit=SAMPLES)
