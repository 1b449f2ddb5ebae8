"""WEIGHT_QUANT: integer weights of 1 to 16 bits behind DequantizeLinear, float ops; data optional."""

from __future__ import annotations

from ..passes.analysis_report import CheckReportPath, WriteAnalysisReport
from ..passes.check_settings import CheckSettings
from ..passes.choose_widths import ChooseWidths
from ..passes.correct_biases import CorrectBiases
from ..passes.debug_reports import WriteDebugReports
from ..passes.equalize import EqualizeLayers
from ..passes.evaluate import CheckGoal, LoadEvaluator
from ..passes.output_check import CheckOutputs
from ..passes.plan import PlanWeightOnly
from ..passes.prepare import Prepare
from ..passes.probe import KeepProbe
from ..passes.quant_config_out import WriteQuantConfig
from ..passes.reconstruct_blocks import ReconstructBlocks
from ..passes.round_weights import RoundWeights
from ..passes.save import Save
from ..passes.search_levels import SearchLevels
from ..passes.write_weights import WriteWeights
from .passes import Pass


def build_passes(final: bool = False) -> list[Pass]:
    """From a width per weight to the model: what the evaluator's mixed-bit search repeats per allocation
    (``final``: the kept model, which also gets block reconstruction)."""
    return [
        WriteWeights(),  # integers + DequantizeLinear (or MatMulNBits)
        RoundWeights(),  # weight_rounding=GPTQ with data: quantized model, 64 samples; weights re-rounded
        *([ReconstructBlocks()] if final else []),  # block_reconstruction: 128 samples, block by block, in torch
        CorrectBiases(),  # quantized model, 64 samples (when data is given)
    ]


def weight_quant() -> list[Pass]:
    return [
        Prepare(),
        EqualizeLayers(),
        CheckReportPath(),  # report: its folder and libraries, before any work
        PlanWeightOnly(),  # which weights, and opset 21 when int4 / int16 may be stored
        CheckSettings(),
        LoadEvaluator(),  # evaluator / accuracy_target: loaded, and the float model evaluated, before any work
        KeepProbe(),  # float model, first 16 samples: the samples, float outputs, input means
        ChooseWidths(build_passes),  # bit_num, or the mixed-bit search on the probe (and the evaluator)
        *build_passes(final=True),
        SearchLevels(),  # weight_levels=AUTO: the fewest levels per layer the evaluator accepts
        CheckOutputs(),  # output cosine against the float outputs of the probe
        CheckGoal(),  # evaluator with a fixed bit_num: the model evaluated; not satisfied, nothing is written
        Save(),
        WriteQuantConfig(),  # after the evaluator's search: its init_scale, as Horizon's quant_config JSON
        WriteDebugReports(),
        WriteAnalysisReport(),  # report: lowbit analyze on the saved model
    ]
