"""Store each planned weight as integers of its width behind a DequantizeLinear (or as MatMulNBits).

Reads: the weight-only plan and the width per weight. Sets: how each weight was stored,
and the float weight and bias of every layer before the rewrite (what bias correction
starts from). Changes the model (:func:`lowbit.quantizers.weight_only.apply_weight_only`).
"""

from __future__ import annotations

from collections import Counter

from ..graph.query import constant_array
from ..pipeline.passes import Pass
from ..pipeline.state import QuantState
from ..quantizers.weight_only import StoredWeight, apply_weight_only
from ..recovery.layers import Layer


class WriteWeights(Pass):
    name = "rewrite"
    requires = ("plan", "bits", "weight_options")
    provides = ("stored", "float_layers")
    changes_model = True

    def run(self, state: QuantState) -> list[StoredWeight]:
        state.float_layers = {}
        for tensor in state.plan.tensors.values():
            for node, index in tensor.readers:
                if index == 1:
                    bias = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
                    state.float_layers[node.name] = Layer(node, tensor.array, bias)
        state.stored = apply_weight_only(state.model, state.plan, state.bits, state.weight_options)
        return state.stored

    def describe(self, stored: list[StoredWeight]) -> list[str]:
        if not stored:
            return []
        elements = sum(w.elements for w in stored)
        by_kind: Counter = Counter()
        for w in stored:
            by_kind[(w.bits, w.storage)] += w.elements
        average = sum(w.bits * w.elements for w in stored) / elements
        return [f"  weights: {len(stored)} tensors, {elements} values, average {average:.2f} bits ("
                + ", ".join(f"{bits} bits as {storage}: {100 * n / elements:.1f}%"
                            for (bits, storage), n in sorted(by_kind.items())) + ")",
                "  run it at float speed with lowbit.inference_session(path): ONNX Runtime then dequantizes the "
                "weights once, at load (session.disable_quant_qdq=1)"]
