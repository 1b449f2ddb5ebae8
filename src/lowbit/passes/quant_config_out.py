"""After an accuracy search: the configuration it settled on, as a Horizon quant_config JSON beside the model.

Rerunning lowbit with it (``--config OUT.quant_config.json``, and the same data) writes the
same model without searching: the job's settings, the node_config the precision search
chose, or the init_scale the mixed-bit search chose (:mod:`lowbit.config.horizon_writer`).
Full quantization also writes the activation ranges the job used into a lowbit calibration
table beside it (``OUT.calibration_table.json``), which the JSON names: the rerun reads them
instead of searching the range methods again. It has to: that search scores its candidates
on the model as planned, and the rerun's plan (the search's node_config) is another model,
on which another method can win. The per_channel / asymmetric the range search kept from a
list are written as single values for the same reason.
Written after the model, so a failed job leaves neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config.horizon_writer import horizon_document, write_horizon_json
from ..config.model import RANGE_KEYS
from ..pipeline.passes import Pass
from ..pipeline.state import QuantState
from ..quantizers.levels import AUTO
from .calibration_table import write_ranges


def quant_config_path(output: Path) -> Path:
    """``model_int8.onnx`` -> ``model_int8.quant_config.json``."""
    return output.with_name(f"{output.stem}.quant_config.json")


def ranges_table_path(output: Path) -> Path:
    """``model_int8.onnx`` -> ``model_int8.calibration_table.json``."""
    return output.with_name(f"{output.stem}.calibration_table.json")


class WriteQuantConfig(Pass):
    name = "write_quant_config"
    requires = ("output_bytes",)

    def applies(self, state: QuantState) -> bool:
        return hasattr(state.accuracy, "rerun_config")

    def run(self, state: QuantState) -> Path:
        node_config, settings = state.accuracy.rerun_config()
        document = horizon_document(state.config, node_config)
        own = document.setdefault("lowbit", {})
        own.update(settings)
        # weight_levels=AUTO would search again, and the rerun has no evaluator: its choice is not written
        self.levels_left_out = own.get("weight_levels") == AUTO
        if self.levels_left_out:
            del own["weight_levels"]
        self.table = None
        if state.ranges and state.config.calibration_table is None:
            self.table = ranges_table_path(state.output_path)
            write_ranges(state, self.table, "json")
            for key in RANGE_KEYS:  # what chose the ranges: the rerun reads them instead
                own.pop(key, None)
            own.update(_ranges_from_table(state, self.table))
        if not own:
            del document["lowbit"]
        path = quant_config_path(state.output_path)
        write_horizon_json(document, path)
        return path

    def describe(self, path: Path) -> list[str]:
        lines = [f"  wrote {path}: the same model again without the search: --config {path.name}"]
        if self.table is not None:
            lines.append(f"    with the activation ranges in {self.table.name}, which it names")
        if self.levels_left_out:
            lines.append("    without weight_levels=AUTO's per-layer levels (not written yet): the rerun keeps uniform "
                         "weights")
        return lines


def _ranges_from_table(state: QuantState, table: Path) -> dict[str, Any]:
    """The settings that make the rerun read ``table`` with the weight and activation schemes the job kept."""
    settings: dict[str, Any] = {"calibration_table": str(table.resolve())}
    if state.config.per_channel is not None and len(state.config.per_channel) > 1:
        settings["per_channel"] = [state.weight_options.per_channel]
    if state.config.asymmetric is not None and len(state.config.asymmetric) > 1:
        settings["asymmetric"] = [not state.target.activation.symmetric]
    return settings
