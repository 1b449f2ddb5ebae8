"""Rewrite the planned MatMul / Gemm / Gather nodes for dynamic quantization (int8 weights, run-time scales).

Reads: the dynamic plan and its options. Changes the model
(:func:`lowbit.quantizers.dynamic.apply_dynamic`). No calibration data is read.
"""

from __future__ import annotations

from ..pipeline.passes import Pass
from ..pipeline.state import QuantState
from ..quantizers.dynamic import apply_dynamic


class RewriteDynamic(Pass):
    name = "rewrite"
    requires = ("plan", "weight_options")
    changes_model = True

    def run(self, state: QuantState) -> None:
        apply_dynamic(state.model, state.plan, state.weight_options)
