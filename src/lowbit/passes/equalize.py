"""Cross-layer equalization: rescale consecutive layers' channels before anything is measured.

Reads: the prepared float model. Sets: the model's metadata key
:data:`~lowbit.recovery.equalization.EQUALIZATION_KEY` (so that ``lowbit analyze`` can equalize the
original float model the same way); rewrites the model's weights and biases
(and a scaled Clip(0, hi) into Relu then a per-channel Min) so that it computes the same,
which is why every later statistic (calibration, GPTQ's moments) is measured after it. The
rule is :mod:`lowbit.recovery.equalization`'s; it needs no data.
"""

from __future__ import annotations

import json

from ..graph.loading import copy_model
from ..pipeline.passes import Pass
from ..pipeline.state import QuantState
from ..recovery.equalization import EQUALIZATION_KEY, EqualizationReport, equalize


class EqualizeLayers(Pass):
    name = "equalize_layers"
    setting = "cross_layer_equalization"
    requires = ("model",)
    changes_model = True
    keeps_outputs = True

    def applies(self, state: QuantState) -> bool:
        return state.config.cross_layer_equalization

    def run(self, state: QuantState) -> EqualizationReport:
        report = equalize(state.model.graph)
        if report.channels:
            state.model.metadata_props[EQUALIZATION_KEY] = json.dumps(report.signature(), separators=(",", ":"))
            state.rewritten_float = copy_model(state.model)
        if not report.pairs:
            state.note("cross_layer_equalization: no two Conv/Gemm/MatMul layers in a row (through Relu, LeakyRelu, "
                       "PRelu or Clip(0, hi), each output read by one node) to equalize")
        return report

    def describe(self, report: EqualizationReport) -> list[str]:
        if not report.pairs:
            return []
        lines = [f"  cross-layer equalization: {report.pairs} layer pairs, {report.channels} channels rescaled in "
                 f"{report.rounds} rounds; a typical layer's channels span {report.grid_share_before:.0%} -> "
                 f"{report.grid_share_after:.0%} of its largest channel's range"]
        if report.clips_rewritten:
            lines.append(f"    {report.clips_rewritten} Clip(0, hi) became Relu + a per-channel Min (the clip bound "
                         "scales with its channel)")
        lines += [f"    left alone: {count} pair(s), {why}" for why, count in report.skipped.items()]
        return lines
