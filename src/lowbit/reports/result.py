"""What :func:`lowbit.quantize` returns: the written model, what was quantized, and each pass's section."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..pipeline.engine import DataPass
from ..pipeline.state import Section


@dataclass(frozen=True)
class NodeReport:
    name: str
    op_type: str
    reason: str = ""
    precision: str = ""  # int8 / int16 / ec (widest input) when quantized; float16, float32 or "" when float


@dataclass(frozen=True)
class TensorReport:
    """Calibrated range and quantization parameters of one activation tensor."""

    name: str
    min: float  # the values seen in calibration
    max: float
    range_min: float  # the range quantized (after clipping, before the group's union)
    range_max: float
    scale: float
    zero_point: int
    dtype: str


@dataclass
class QuantizeResult:
    """What :func:`quantize` did: where the model went, what was quantized, and what it cost.

    ``passes`` holds one :class:`~lowbit.pipeline.state.Section` per pass that ran, in
    order (name, seconds, report, summary lines); ``data_passes`` each run of a model over
    calibration samples. The attributes below it read the passes' reports.
    """

    output_path: Path
    target: str
    quantized_nodes: list[NodeReport]
    float_nodes: list[NodeReport]
    tensors: dict[str, TensorReport]
    calibration_samples: int
    float_bytes: int
    output_bytes: int
    passes: list[Section] = field(default_factory=list)
    data_passes: list[DataPass] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def report(self, name: str) -> Any:
        """The report of the pass ``name`` (None when it did not run or reports nothing)."""
        return next((s.report for s in self.passes if s.name == name), None)

    @property
    def bias_correction(self):
        """The bias correction's report (layers, samples, shifts); None when it did not run."""
        outcome = self.report("correct_biases")
        return outcome.report if outcome is not None else None

    @property
    def bias_correction_kept(self) -> bool | None:
        """Whether the corrected biases were kept: False when bias_correction_metric found them worse."""
        outcome = self.report("correct_biases")
        if outcome is None:
            return None
        return outcome.verdict is None or outcome.verdict.kept

    @property
    def weight_rounding(self):
        return self.report("round_weights")

    @property
    def block_reconstruction(self):
        """block_reconstruction's report: per block, its output error before and after; None when it did not run."""
        return self.report("reconstruct_blocks")

    @property
    def search(self):
        return self.report("choose_ranges")

    @property
    def accuracy(self):
        """With an evaluator: the search's report (precisions per node, or widths), or the final check's."""
        widths = self.mixed_bits
        searched = widths.searched if widths is not None else None
        return self.report("search_precisions") or searched or self.report("check_goal")

    @property
    def quant_config_path(self) -> Path | None:
        """After an accuracy search: the Horizon quant_config JSON that reruns it without searching."""
        return self.report("write_quant_config")

    @property
    def mixed_bits(self):
        return self.report("choose_widths")

    @property
    def weights(self) -> list:
        """WEIGHT_QUANT: how each weight is stored."""
        stored = self.report("rewrite")
        return stored if isinstance(stored, list) else []

    @property
    def output_cosine(self) -> float | None:
        """WEIGHT_QUANT with data: the output cosine against the float model on a few samples."""
        check = self.report("output_check")
        return None if check is None else check.cosine

    @property
    def output_cosine_samples(self) -> int:
        check = self.report("output_check")
        return 0 if check is None else check.samples

    @property
    def timings(self) -> dict[str, float]:
        return {s.name: s.seconds for s in self.passes}

    @property
    def size_ratio(self) -> float:
        return self.output_bytes / self.float_bytes if self.float_bytes else float("nan")

    def summary(self) -> str:
        from .summary import format_summary

        return format_summary(self)
