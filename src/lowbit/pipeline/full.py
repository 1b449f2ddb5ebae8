"""FULL_QUANT: int8 weights and activations, calibrated on data."""

from __future__ import annotations

from ..passes.analysis_report import CheckReportPath, WriteAnalysisReport
from ..passes.calibrate import Calibrate
from ..passes.calibration_table import ReadCalibrationTable, WriteCalibrationTable
from ..passes.candidates import ActivationCandidates
from ..passes.check_settings import CheckSettings
from ..passes.check_speed import CheckSpeed
from ..passes.choose_ranges import ChooseRanges
from ..passes.correct_biases import CorrectBiases
from ..passes.debug_reports import WriteDebugReports
from ..passes.equalize import EqualizeLayers
from ..passes.evaluate import CheckGoal, LoadEvaluator
from ..passes.guard_pairs import GuardWeightPairs
from ..passes.order_channels import OrderChannels
from ..passes.plan import PlanFull
from ..passes.prepare import Prepare
from ..passes.quant_config_out import WriteQuantConfig
from ..passes.reconstruct_blocks import ReconstructBlocks
from ..passes.rewrite import RewriteQDQ
from ..passes.round_weights import RoundWeights
from ..passes.save import Save
from ..passes.search_levels import SearchLevels
from ..passes.search_precisions import SearchPrecisions
from .passes import Pass


def build_passes(final: bool = False) -> list[Pass]:
    """From ranges and a plan to the quantized graph: what the accuracy search repeats for each candidate
    (``final``: the kept model, which also gets block reconstruction, too slow to repeat per candidate)."""
    return [
        RewriteQDQ(),  # Q/DQ pairs, integer weights, int32 biases
        RoundWeights(),  # quantized model, 64 samples (D patches each): GPTQ's second moments; weights re-rounded
        *([ReconstructBlocks()] if final else []),  # block_reconstruction: 128 samples, block by block, in torch
        CorrectBiases(),  # quantized model, 64 samples: each layer's input mean; biases corrected
        GuardWeightPairs(),  # saturation_safe_weights: int8 weight pairs within 128 (AVX2 without VNNI)
    ]


def full_quant() -> list[Pass]:
    return [
        Prepare(),  # load, fold BatchNormalization and pads, name every node
        EqualizeLayers(),  # cross_layer_equalization: channels rescaled, same outputs
        CheckReportPath(),  # report: its folder and libraries, before any work
        PlanFull(),  # per node: int8 or float (and why); per tensor: Q/DQ or not
        OrderChannels(),  # saturation_safe_weights: channels between layers reordered, same outputs
        ReadCalibrationTable(),  # calibration_table: the ranges from a file (then no calibration run)
        ActivationCandidates(),  # the range methods to try
        CheckSettings(),  # warn of every setting that has no effect
        LoadEvaluator(),  # evaluator / accuracy_target: loaded, and the float model evaluated, before any work
        Calibrate(),  # float model, all samples: a histogram (or min/max) per activation
        ChooseRanges(),  # float model, held-back samples: the search's references; ranges chosen
        OrderChannels(after_range_search=True),  # the same, when the range search chose per_channel from a list
        SearchPrecisions(build_passes),  # evaluator: candidates built and evaluated; the plan of the one kept
        *build_passes(final=True),
        SearchLevels(),  # weight_levels=AUTO: the fewest levels per layer the evaluator accepts
        CheckGoal(),  # evaluator, nothing to search (no node quantized): the model evaluated
        Save(),  # checked, then moved into place
        CheckSpeed(),  # speed_check: the saved model timed beside the float one, a warning if it is no faster
        WriteQuantConfig(),  # after a search: the configuration it kept, as Horizon's quant_config JSON
        WriteDebugReports(),  # debug_info_save_path: MindSpore's CSV reports on the saved model
        WriteCalibrationTable(),  # calibration_table_out: the ranges for tpu-mlir, TensorRT or lowbit
        WriteAnalysisReport(),  # report: lowbit analyze on the saved model
    ]
