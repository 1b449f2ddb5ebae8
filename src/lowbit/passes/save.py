"""Write the model atomically: checked by onnx.checker and loaded by ONNX Runtime before it appears.

Reads: the model. Sets: the bytes written. Says so when nothing could be quantized.
"""

from __future__ import annotations

from ..graph.saving import save_atomically
from ..pipeline.passes import Pass
from ..pipeline.state import QuantState


class Save(Pass):
    name = "save"
    requires = ("model", "plan")
    provides = ("output_bytes",)

    def run(self, state: QuantState) -> None:
        if not state.plan.quantized_nodes and not state.plan.float16_nodes:
            state.note(f"nothing in {state.model_path} can be quantized for target {state.target_name}; "
                       "the output is the float model")
        state.output_bytes = save_atomically(state.model, state.output_path)
