"""Keep the written int8 weights from saturating x86 CPUs without VNNI (:mod:`lowbit.quantizers.saturation`).

Reads: the plan, the float weights.
Changes the model: after every pass that writes integers (the rewrite and GPTQ keep the
pairs within the bound as they round; AdaRound's, block reconstruction's and bias
correction's integers may not), each guarded weight's pairs are fitted once more. Reports
how many pairs of the float weights rounded to nearest on their own grid were over the
bound, how many channels took a wider grid, and how many weights this last fit moved.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..graph.query import constant_array
from ..pipeline.passes import Pass
from ..pipeline.state import QuantState
from ..quantizers.levels import PACKED_TAG
from ..quantizers.saturation import PAIR_BOUND, KernelPairs, fit_weight, guarded, kernel_pairs
from ..recovery.layers import as_rows, integer_weight, per_row


@dataclass
class PairsReport:
    layers: int = 0  # weights guarded
    pairs: int = 0  # pairs in those weights
    over_at_nearest: int = 0  # pairs over the bound when the float weight is rounded to nearest on its own grid
    channels: int = 0  # output channels of those weights
    widened: int = 0  # channels whose grid is coarser than |w|max / 127
    moved: int = 0  # weights this pass changed


class GuardWeightPairs(Pass):
    name = "saturation_safe_weights"
    requires = ("plan",)
    changes_model = True

    def applies(self, state: QuantState) -> bool:
        return state.plan.saturation_safe and bool(state.plan.weights)

    def run(self, state: QuantState) -> PairsReport:
        report = PairsReport()
        for slot in state.plan.weights:
            dq = integer_weight(slot.node) if slot.index == 1 else None
            if dq is None or PACKED_TAG in dq.metadata_props or \
                    not guarded(slot.node, slot.scheme.qtype, True):
                continue
            stored = constant_array(dq.inputs[0])
            pairs = kernel_pairs(slot.node, stored.shape)
            if pairs is None:
                continue
            rows_shape = as_rows(slot.node, stored).shape
            report.layers += 1
            report.pairs += rows_shape[0] * rows_shape[1] * len(pairs.first)
            report.channels += rows_shape[0] * rows_shape[1]
            layer = (state.float_layers or {}).get(slot.node.name)
            if layer is not None:
                over, widened = _against_own_grid(slot.node, layer.float_weight, dq, pairs)
                report.over_at_nearest += over
                report.widened += widened
            fitted, moved = fit_weight(slot.node, stored)
            if moved:
                dq.inputs[0].const_value = ir.tensor(fitted.astype(stored.dtype), name=dq.inputs[0].name)
                report.moved += moved
        return report

    def describe(self, report: PairsReport) -> list[str]:
        if not report.layers:
            return []
        return [f"  {report.layers} int8 weights kept within |a + b| <= {PAIR_BOUND} for each pair that x86 CPUs "
                f"without VNNI add in 16 bits: {report.over_at_nearest} of {report.pairs} pairs were over at round to "
                f"nearest; {report.widened} of {report.channels} channels on a wider grid"
                + (f"; {report.moved} weights moved after rounding" if report.moved else "")]


def _against_own_grid(node: ir.Node, float_weight: np.ndarray, dq: ir.Node, pairs: KernelPairs) -> tuple[int, int]:
    """How many pairs of ``float_weight`` rounded to nearest on its own symmetric grid (|w|max / 127 per
    channel) would go over the bound, and how many channels ``dq``'s grid widened beyond it."""
    rows = as_rows(node, float_weight).astype(np.float64)
    own = np.maximum(np.abs(rows).max(axis=-1), 1e-30) / 127
    written = per_row(constant_array(dq.inputs[1]), rows.shape[:2])
    nearest = np.rint(rows / own[..., None])
    over = int(np.count_nonzero(pairs.sums(nearest) > PAIR_BOUND))
    return over, int(np.count_nonzero(written > own * (1 + 1e-6)))
