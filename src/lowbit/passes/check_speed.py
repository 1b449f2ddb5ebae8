"""Time the written model beside the float one on this CPU, and say so when int8 is no faster.

Reads: the saved output, the float model's file and one calibration sample. Sets nothing;
reports both latencies, which the summary prints, with a warning when the quantized model
is not faster. int8 is not faster everywhere: ONNX Runtime runs ops without integer kernels
in float between Q/DQ pairs, and on small convolutions (PP-OCR's direction classifier, a
MobileNetV3 with 1 x 1 squeeze-and-excitation tensors) the conversions cost more than the
integer arithmetic saves. Only for the ONNX Runtime CPU target (the one this machine runs),
and not after the accuracy search over precisions, whose report already times its kept model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..accuracy.latency import WHY_NOT_FASTER, latencies, latency_line
from ..pipeline.passes import Pass
from ..pipeline.state import QuantState

BUDGET_SECONDS = 2.0  # of timed runs, both models together; at least one block of runs each, at most 20


@dataclass(frozen=True)
class SpeedCheck:
    float_ms: float
    quantized_ms: float


class CheckSpeed(Pass):
    name = "speed_check"
    setting = "speed_check"
    requires = ("model", "plan", "output_bytes")

    def applies(self, state: QuantState) -> bool:
        readable = bool(state.held_back) or (state.data.given and state.data.rereadable)
        timed = getattr(state.accuracy, "latency_ms", None) is not None  # the precision search timed its kept model
        return (state.config.speed_check and state.config.target == "CPU" and bool(state.plan.quantized_nodes)
                and not timed and readable)

    def run(self, state: QuantState) -> SpeedCheck | None:
        try:
            float_ms, quantized_ms = latencies(state.model_path, state.output_path, _one_sample(state),
                                               budget_seconds=BUDGET_SECONDS)
        except Exception as exc:  # the model is written and checked; a timing that cannot run is only not shown
            state.note(f"speed_check: the two models could not be timed side by side ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''})")
            return None
        if quantized_ms >= float_ms:
            state.note(f"the quantized model is no faster than the float model on this CPU (ONNX Runtime, one "
                       f"sample: {quantized_ms:.3g} ms against {float_ms:.3g} ms); {WHY_NOT_FASTER}: "
                       "skip_quant_node can leave such nodes float, or keep the float model (speed_check=false turns "
                       "this measurement off)")
        return SpeedCheck(float_ms, quantized_ms)

    def describe(self, report: SpeedCheck | None) -> list[str]:
        if report is None:
            return []
        return [latency_line(report.float_ms, report.quantized_ms)]


def _one_sample(state: QuantState) -> dict[str, np.ndarray]:
    """A sample the statistics held back, else the first calibration sample (the data can be read again)."""
    if state.held_back:
        return state.held_back[0]
    stream, _ = state.data.open(1)
    return next(iter(stream))
