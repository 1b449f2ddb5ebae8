"""DYNAMIC_QUANT: int8 weights, activation scales computed at run time; no calibration data."""

from __future__ import annotations

from ..passes.check_settings import CheckSettings
from ..passes.equalize import EqualizeLayers
from ..passes.evaluate import CheckGoal, LoadEvaluator
from ..passes.plan import PlanDynamic
from ..passes.prepare import Prepare
from ..passes.rewrite_dynamic import RewriteDynamic
from ..passes.save import Save
from .passes import Pass


def dynamic_quant() -> list[Pass]:
    return [
        Prepare(),
        EqualizeLayers(),
        PlanDynamic(),  # MatMul / Gemm / Gather with constant weights
        CheckSettings(),
        LoadEvaluator(),  # evaluator / accuracy_target: loaded, and the float model evaluated, before any work
        RewriteDynamic(),  # int8 weights; per-token or per-tensor run-time activation scales
        CheckGoal(),  # evaluator: the model evaluated; not satisfied, nothing is written
        Save(),
    ]
