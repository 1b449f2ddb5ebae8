"""Rewrite the float graph into the QDQ model that the plan and the ranges describe.

Reads: the plan and the activation ranges (none when no activation is quantized). Sets:
the scales and zero points of the activations, and the float weight and bias of every
layer as they were before the rewrite (what weight rounding and bias correction start
from). Changes the model: Q/DQ pairs on the planned activations, integer weights and
int32 biases (:func:`lowbit.quantizers.qdq.apply_plan`).
"""

from __future__ import annotations

from ..graph.query import constant_array
from ..pipeline.passes import Pass
from ..pipeline.state import QuantState
from ..quantizers.qdq import activation_qparams, apply_plan
from ..recovery.layers import Layer


class RewriteQDQ(Pass):
    name = "rewrite"
    requires = ("plan",)
    provides = ("qparams", "float_layers")
    changes_model = True

    def run(self, state: QuantState) -> None:
        state.qparams = activation_qparams(state.plan, state.ranges or {})
        state.float_layers = {}
        compensated = {id(node) for node, _ in state.plan.compensated}
        for slot in state.plan.weights:
            node = slot.node
            if slot.index == 1 and id(node) not in compensated:  # ec's residual is of the weight as rounded here
                bias = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
                state.float_layers[node.name] = Layer(node, constant_array(node.inputs[1]), bias)
        apply_plan(state.model, state.plan, state.qparams)
