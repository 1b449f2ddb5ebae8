"""WEIGHT_QUANT: integer weights of 1 to 16 bits behind DequantizeLinear, float ops; data optional."""

from __future__ import annotations

from ..passes.analysis_report import CheckReportPath, WriteAnalysisReport
from ..passes.check_settings import CheckSettings
from ..passes.choose_widths import ChooseWidths
from ..passes.correct_biases import CorrectBiases
from ..passes.debug_reports import WriteDebugReports
from ..passes.output_check import CheckOutputs
from ..passes.plan import PlanWeightOnly
from ..passes.prepare import Prepare
from ..passes.probe import KeepProbe
from ..passes.save import Save
from ..passes.write_weights import WriteWeights
from .passes import Pass


def weight_quant() -> list[Pass]:
    return [
        Prepare(),
        CheckReportPath(),  # report: its folder and libraries, before any work
        PlanWeightOnly(),  # which weights, and opset 21 when int4 / int16 may be stored
        CheckSettings(),
        KeepProbe(),  # float model, first 16 samples: the samples, float outputs, input means
        ChooseWidths(),  # bit_num, or the mixed-bit search on the probe
        WriteWeights(),  # integers + DequantizeLinear (or MatMulNBits)
        CorrectBiases(),  # quantized model, 64 samples (when data is given)
        CheckOutputs(),  # output cosine against the float outputs of the probe
        Save(),
        WriteDebugReports(),
        WriteAnalysisReport(),  # report: lowbit analyze on the saved model
    ]
