"""What the passes of one job share: the model, the configuration, the data, and what each pass found.

A pass reads the fields its ``requires`` names and sets those its ``provides`` names;
the pipeline checks both, so a pass placed before what it needs fails at once with the
missing field's name instead of with an AttributeError deep inside.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from ..config import QuantConfig
from ..data.calibration import CalibrationData
from ..data.feeds import InputSpec
from ..graph.loading import copy_model, load_model
from ..graph.passes import prepare
from ..quantizers.plan import Decisions
from ..quantizers.targets import Target
from .engine import DataEngine


@dataclass
class Section:
    """One pass's part of the result: its name, its time, its own report, and its summary lines."""

    name: str
    seconds: float
    report: Any = None
    lines: list[str] = field(default_factory=list)


@dataclass
class QuantState:
    config: QuantConfig
    model_path: Path
    output_path: Path
    note: Callable[[str], None]
    progress: bool
    user_data: Any = None  # the data argument of lowbit.quantize, read through ``data``
    workers: Any = None  # Ray workers (lowbit.distributed.workers.Workers) when workers / ray_address is set
    sections: list[Section] = field(default_factory=list)

    # load and prepare
    model: ir.Model | None = None
    float_bytes: int | None = None
    rewritten_float: ir.Model | None = None  # the float model as equalization / channel order left it, if changed
    specs: list[InputSpec] | None = None
    data: CalibrationData | None = None
    engine: DataEngine | None = None

    # plan: what each mode decided per node (and, for full quantization, per tensor)
    target: Target | None = None
    target_name: str | None = None
    plan: Decisions | None = None
    weight_options: Any = None  # the mode's options (selection of weights, storage)

    # full quantization: activation ranges
    candidates: list | None = None
    search_fallback: str = ""  # why the default search fell back to MAX_MIN, said once the data has been read
    observers: dict[str, Any] | None = None
    input_values: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # distinct values, counts
    calibration_samples: int = 0
    held_back: list[dict[str, np.ndarray]] = field(default_factory=list)
    held_back_outputs: list[str] = field(default_factory=list)  # the float outputs compared on them ...
    held_back_references: list[list[np.ndarray]] = field(default_factory=list)  # ... and their float values
    tuning: list[dict[str, np.ndarray]] = field(default_factory=list)
    ranges: dict[str, tuple[float, float]] | None = None
    # the range search's other candidates (label -> ranges), best held-back score first: the accuracy search's next
    range_alternatives: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    recorded_scales: dict[str, float] = field(default_factory=dict)  # a lowbit calibration table's scales
    qparams: dict[str, Any] | None = None
    float_layers: dict[str, np.ndarray] | None = None  # float weights (and biases) as they were before the rewrite
    reconstructed: set[str] = field(default_factory=set)  # layers whose integers block reconstruction learned
    rounded_toward_float: set[str] = field(default_factory=set)  # layers GPTQ rounded toward the float model's output
    level_job: Any = None  # weight_levels=AUTO: GPTQ's layers and input moments (recovery.layers.LayerJob)

    # weight-only quantization
    probe: Any = None  # samples, float references and input means (see passes.probe)
    bits: dict[str, int] | None = None
    stored: list | None = None

    # the accuracy search
    user_evaluator: Any = None  # an evaluator object given to lowbit.quantize (the API's evaluator=)
    evaluator: Any = None  # the job's guarded evaluator (accuracy.evaluator.GuardedEvaluator), when there is one
    accuracy: Any = None  # what the search or the final check found (its report)
    width_errors: Any = None  # WEIGHT_QUANT bit_num=0: each weight's error per width, what allocations start from

    # save
    output_bytes: int | None = None

    def float_reference(self) -> ir.Model:
        """The prepared float model the quantized one is compared with, tensor by tensor (the reports): the
        rewritten one when equalization rescaled channels or the channel order permuted them, whose tensors
        the quantized model computes."""
        if self.rewritten_float is not None:
            return copy_model(self.rewritten_float)
        return prepare(load_model(self.model_path)[0])

    def fork(self, **changes: Any) -> QuantState:
        """A copy that builds a candidate model (the accuracy search's): quiet, with its own data engine.

        Its model is the caller's to give (a copy: the passes change it in place); what it
        shares (the data, observers, ranges, samples) the build passes only read.
        """
        engine = DataEngine(self.data, self.specs, self.engine.batch_size, progress=False, workers=self.workers)
        return replace(self, note=lambda message: None, progress=False, sections=[], engine=engine, **changes)
