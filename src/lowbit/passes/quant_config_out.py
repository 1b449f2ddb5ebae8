"""After an accuracy search: the configuration it settled on, as a Horizon quant_config JSON beside the model.

Rerunning lowbit with it (``--config OUT.quant_config.json``, and the same data) writes the
same model without searching: the job's settings, the node_config the precision search
chose, or the init_scale the mixed-bit search chose (:mod:`lowbit.config.horizon_writer`).
Written after the model, so a failed job leaves neither.
"""

from __future__ import annotations

from pathlib import Path

from ..config.horizon_writer import horizon_document, write_horizon_json
from ..pipeline.passes import Pass
from ..pipeline.state import QuantState
from ..quantizers.levels import AUTO


def quant_config_path(output: Path) -> Path:
    """``model_int8.onnx`` -> ``model_int8.quant_config.json``."""
    return output.with_name(f"{output.stem}.quant_config.json")


class WriteQuantConfig(Pass):
    name = "write_quant_config"
    requires = ("output_bytes",)

    def applies(self, state: QuantState) -> bool:
        return hasattr(state.accuracy, "rerun_config")

    def run(self, state: QuantState) -> Path:
        node_config, settings = state.accuracy.rerun_config()
        document = horizon_document(state.config, node_config)
        if settings:
            document.setdefault("lowbit", {}).update(settings)
        # weight_levels=AUTO would search again, and the rerun has no evaluator: its choice is not written
        self.levels_left_out = document.get("lowbit", {}).get("weight_levels") == AUTO
        if self.levels_left_out:
            del document["lowbit"]["weight_levels"]
        path = quant_config_path(state.output_path)
        write_horizon_json(document, path)
        return path

    def describe(self, path: Path) -> list[str]:
        lines = [f"  wrote {path}: the same model again without the search: --config {path.name}"]
        if self.levels_left_out:
            lines.append("    without weight_levels=AUTO's per-layer levels (not written yet): the rerun keeps uniform "
                         "weights")
        return lines
