"""Compare the written weight-only model with the float model on the probe samples.

Reads: the final model and the probe (samples and float outputs). Sets nothing; reports
the cosine similarity of the outputs, which the summary prints and ``result.output_cosine`` holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..pipeline.passes import Pass
from ..pipeline.state import QuantState
from ..search.metrics import METRICS


@dataclass(frozen=True)
class OutputCheck:
    cosine: float
    samples: int


class CheckOutputs(Pass):
    name = "output_check"
    requires = ("model",)

    def applies(self, state: QuantState) -> bool:
        return state.probe is not None

    def run(self, state: QuantState) -> OutputCheck:
        probe = state.probe
        stats = state.engine.score(state.model, probe.samples, probe.outputs, probe.references)
        return OutputCheck(METRICS["cosine-similarity"].value(stats), len(probe.samples))

    def describe(self, report: OutputCheck) -> list[str]:
        return [f"  output cosine similarity to the float model: {report.cosine:.5f} "
                f"(on {report.samples} calibration samples)"]
