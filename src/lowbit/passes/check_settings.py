"""Say which settings have no effect in this job, so that none is ignored silently.

Reads: the configuration, the prepared graph, the kinds of calibration files, and for
full quantization the activation-range candidates. Sets nothing; each setting given (not
a default) that changes nothing gets one warning naming it and why:

* names that are not in the model: ``skip_quant_node`` nodes, ``input_shape`` inputs
  (with the closest names);
* image preprocessing keys when no calibration file is an image; ``input_shape`` and
  ``input_data_format`` when none is a ``.bin`` file (arrays given in memory are neither);
* range-method keys that the chosen methods do not read: ``num_bin`` (KL, AUTO_TUNE),
  ``max_percentile`` (REMOVAL_OUTLIER), ``max_num_bin`` (any method but MAX_MIN),
  ``tune_num`` (AUTO_TUNE), ``search_metric`` (a search), ``search_samples`` (a search or
  AUTO_TUNE);
* any calibration data with dynamic quantization, which computes scales at run time;
* the range keys when the ranges come from ``calibration_table``, and ``table_format``
  without ``calibration_table_out`` (whose folder is checked here, before any work);
* a calibration table written with ``cross_layer_equalization``, whose ranges are those of
  the equalized tensors (reading one is checked where it is read, :mod:`.calibration_table`).
"""

from __future__ import annotations

from pathlib import Path

from ..config.model import RANGE_KEYS
from ..errors import LowbitError, closest
from ..graph.saving import check_output_path
from ..pipeline.passes import Pass
from ..pipeline.state import QuantState
from ..quantizers.levels import AUTO
from .evaluate import holds_back_for_goal

IMAGE_KEYS = ("image_to_format", "normalize_mean", "normalize_std", "resize_width", "resize_height",
              "resize_method", "center_crop_width", "center_crop_height")
BIN_KEYS = ("input_shape", "input_data_format")


class CheckSettings(Pass):
    name = "check_settings"
    requires = ("model", "data")

    def run(self, state: QuantState) -> None:
        config = state.config
        if config.weight_levels == AUTO and state.user_evaluator is None and config.evaluator is None \
                and config.accuracy_target is None:
            raise LowbitError(f"weight_levels=AUTO ({config.source('weight_levels')}) searches the levels per layer "
                              "for an evaluator or accuracy_target; give one, or a fixed weight_levels")
        debug = config.debug_info_save_path
        if debug is not None and Path(debug).exists() and not Path(debug).is_dir():
            # checked before any work: the reports are written after the model, which must not be left behind
            raise LowbitError(f"debug_info_save_path={debug}: cannot create the folder (a file of that name exists)")
        for message in [*self._names(state), *self._data(state), *self._ranges(state)]:
            state.note(message)

    def _names(self, state: QuantState):
        nodes = [node.name for node in state.model.graph]
        for name in state.config.skip_quant_node:
            if name not in nodes:
                yield f"skip_quant_node names '{name}', which is not a node of the model" + _closest(name, nodes)
        inputs = [spec.name for spec in state.specs]
        for name in state.config.input_shape or {}:
            if name not in inputs:
                yield (f"input_shape names '{name}', which is not an input of the model, so it has no effect"
                       + _closest(name, inputs, "inputs"))

    def _data(self, state: QuantState):
        config = state.config
        if config.quant_type == "DYNAMIC_QUANT":
            if state.data.given:
                yield "DYNAMIC_QUANT computes activation scales at run time; the calibration data is not used"
            yield from _unused(config, ("workers", "ray_address"), "DYNAMIC_QUANT makes no run over data")
            return
        if not state.data.given:
            yield from _unused(config, ("workers", "ray_address"), "no calibration data is given")
        if not config.block_reconstruction:
            yield from _unused(config, ("block_reconstruction_iterations", "block_reconstruction_samples"),
                               "block_reconstruction=false")
        kinds = state.data.file_kinds() if state.data.given else set()
        where = "no calibration data is given" if not state.data.given else \
            "the calibration samples are arrays given in memory" if kinds is None else \
            f"the calibration files are {', '.join(sorted(kinds))}"
        kinds = kinds or set()
        if "IMAGE" not in kinds:
            yield from _unused(config, IMAGE_KEYS, f"it preprocesses images, and {where}")
        if "BIN" not in kinds:
            yield from _unused(config, BIN_KEYS, f"it is read with .bin files, and {where}")

    def _ranges(self, state: QuantState):
        config = state.config
        if config.quant_type != "FULL_QUANT":
            return
        if config.calibration_table_out is None:
            yield from _unused(config, ("table_format",), "no calibration_table_out is written")
        else:
            table = Path(config.calibration_table_out)
            check_output_path(table, Path(config.calibration_table or state.model_path))
            if table.resolve() == state.output_path.resolve():
                raise LowbitError(f"calibration_table_out {table} is the output model's path; choose another")
        if config.calibration_table is not None:
            yield from _unused(config, RANGE_KEYS, f"the ranges come from calibration_table "
                                                   f"({config.source('calibration_table')})")
        if config.cross_layer_equalization and config.calibration_table_out is not None:
            yield ("calibration_table_out with cross_layer_equalization: the table's ranges are those of the "
                   "equalized model (the output), not of the original float model; give a runtime the output "
                   "model with it")
        if not state.candidates:
            return
        methods = {c.method for c in state.candidates}
        searched = len(state.candidates) > 1
        chosen = f"activation_quant_method={','.join(sorted(methods))}"
        if not methods & {"KL", "AUTO_TUNE"}:
            yield from _unused(config, ("num_bin",), f"only KL and AUTO_TUNE read it ({chosen})")
        if "REMOVAL_OUTLIER" not in methods:
            yield from _unused(config, ("max_percentile",), f"only REMOVAL_OUTLIER reads it ({chosen})")
        if methods == {"MAX_MIN"}:
            yield from _unused(config, ("max_num_bin",), f"MAX_MIN keeps no histogram ({chosen})")
        if "AUTO_TUNE" not in methods:
            yield from _unused(config, ("tune_num",), f"only AUTO_TUNE reads it ({chosen})")
        if not config.bias_correction:
            yield from _unused(config, ("bias_correction_samples", "bias_correction_metric"), "bias_correction=false")
        if not config.layerwise_search:
            yield from _unused(config, ("layerwise_metric",), "layerwise_search=false")
        if not searched:
            yield from _unused(config, ("search_metric",), f"there is one candidate and no search ({chosen})")
            if "AUTO_TUNE" not in methods and not holds_back_for_goal(state):  # accuracy_target scores them
                yield from _unused(config, ("search_samples",),
                                   f"there is one candidate and no search ({chosen})")


def _unused(config, keys: tuple[str, ...], why: str):
    for key in keys:
        if not config.is_default(key):
            yield f"{key} ({config.source(key)}) has no effect: {why}"


def _closest(name: str, known: list[str], what: str = "node names") -> str:
    near = closest(name, known)
    return f"; closest {what}: {', '.join(near)}" if near else ""
