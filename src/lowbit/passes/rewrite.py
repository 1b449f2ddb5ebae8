"""Rewrite the float graph into the QDQ model that the plan and the ranges describe.

Reads: the plan, the activation ranges (none when no activation is quantized) and the
distinct values of the graph inputs. Sets: the scales and zero points of the activations
(graph inputs kept off the rounding ties of their grid, :mod:`lowbit.quantizers.ties`; the
report names those moved), and the float weight and bias of every layer as they were before
the rewrite (what weight rounding and bias correction start from). Changes the model: Q/DQ
pairs on the planned activations, integer weights and int32 biases (:func:`lowbit.quantizers.qdq.apply_plan`).
"""

from __future__ import annotations

from ..graph.query import constant_array
from ..pipeline.passes import Pass
from ..pipeline.state import QuantState
from ..quantizers.qdq import activation_qparams, apply_plan
from ..quantizers.ties import tied_share
from ..recovery.layers import Layer


class RewriteQDQ(Pass):
    name = "rewrite"
    requires = ("plan",)
    provides = ("qparams", "float_layers")
    changes_model = True

    def run(self, state: QuantState) -> list[str]:
        state.qparams = activation_qparams(state.plan, state.ranges or {}, state.input_values, state.recorded_scales)
        state.float_layers = {}
        compensated = {id(node) for node, _ in state.plan.compensated}
        for slot in state.plan.weights:
            node = slot.node
            if slot.index == 1 and id(node) not in compensated:  # ec's residual is of the weight as rounded here
                bias = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
                state.float_layers[node.name] = Layer(node, constant_array(node.inputs[1]), bias)
        apply_plan(state.model, state.plan, state.qparams)
        return self._moved_off_ties(state)

    def describe(self, report: list[str]) -> list[str]:
        return [f"  {line}" for line in report]

    @staticmethod
    def _moved_off_ties(state: QuantState) -> list[str]:
        """The inputs whose scale was widened off the rounding ties, and by how much."""
        plain = activation_qparams(state.plan, state.ranges or {}) if state.input_values else {}
        lines = []
        for name, (values, counts) in state.input_values.items():
            if name not in state.qparams:  # a candidate of the accuracy search that reads this input in float
                continue
            before, after = plain[name], state.qparams[name]
            if after.scale != before.scale:
                lines.append(f"{name}: {tied_share(before, values, counts):.0%} of its calibration values lie on "
                             f"rounding ties of the grid; scale widened by {float(after.scale / before.scale) - 1:.2%}"
                             " so that they all round one way")
        return lines
