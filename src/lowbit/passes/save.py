"""Write the model atomically: checked by onnx.checker and loaded by ONNX Runtime before it appears.

Reads: the model. Sets: the bytes written. Says so when nothing could be quantized. With
``weight_levels`` (and ``pack_weight_levels``), the file stores each non-uniform weight as
bit-planes of level indices and a decoder (:mod:`lowbit.quantizers.levels`).
"""

from __future__ import annotations

from ..graph.loading import copy_model
from ..graph.saving import save_atomically
from ..pipeline.passes import Pass
from ..pipeline.state import QuantState
from ..quantizers.levels import PACKED_TAG, pack_model


class Save(Pass):
    name = "save"
    requires = ("model", "plan")
    provides = ("output_bytes",)

    def run(self, state: QuantState) -> None:
        if not state.plan.quantized_nodes and not state.plan.float16_nodes:
            state.note(f"nothing in {state.model_path} can be quantized for target {state.target_name}; "
                       "the output is the float model")
        model = state.model
        if state.config.pack_weight_levels and any(PACKED_TAG in n.metadata_props for n in model.graph):
            model = copy_model(model)  # the passes after this one read the integer tensors
            pack_model(model)
        state.output_bytes = save_atomically(model, state.output_path)
