"""Decide, before any data is seen, what each mode quantizes: per node, and for full quantization per tensor.

Reads: the prepared graph and the configuration. Sets: the plan (a decision per node,
with the reason of every node kept float), the mode's options and the target's name.
The rules are the planners' (:mod:`lowbit.quantizers.plan`, ``weight_only``, ``dynamic``).
"""

from __future__ import annotations

from ..errors import LowbitError
from ..graph.loading import with_opset
from ..pipeline.passes import Pass
from ..pipeline.state import QuantState
from ..quantizers.dynamic import DynamicOptions, plan_dynamic
from ..quantizers.plan import PlanOptions, plan_quantization
from ..quantizers.precision import PrecisionRules
from ..quantizers.selection import WeightSelection
from ..quantizers.targets import TARGETS
from ..quantizers.weight_only import WeightOnlyOptions, plan_weight_only

INT4_OPSET = 21  # DequantizeLinear reads int4 and int16 from this opset on
PER_TOKEN_OPSET = 13  # QuantizeLinear quantizes along an axis (per-token scales) from this opset on


class PlanFull(Pass):
    """int8 weights and activations on the target's int8 ops (quantizers/plan.py), and the precisions
    that op_config / node_config / all_node_type / weight_bit_num ask for (quantizers/precision.py).

    int4 weights and int16 Q/DQ need opset 21, reached with onnx's converter before planning; a model it
    cannot convert is an error where int4 was asked, and stays int8 where int16 was (the summary says so).
    """

    name = "plan"
    requires = ("model",)
    provides = ("plan", "target", "weight_options")

    def run(self, state: QuantState) -> None:
        config = state.config
        state.target = TARGETS[config.target]
        if config.asymmetric is not None:  # with several, the first; the range search compares them
            state.target = state.target.with_symmetric_activations(not config.asymmetric[0])
        state.target_name = config.target
        rules = PrecisionRules.from_config(config, config.target)
        rules.check(state.model.graph)
        if rules.asks_int4:
            upgraded = with_opset(state.model, INT4_OPSET)
            if upgraded is None:
                where = config.source("weight_bit_num" if config.weight_bit_num == 4 else "node_config")
                raise LowbitError(f"{where}: int4 weights need opset {INT4_OPSET} (DequantizeLinear reads int4 from "
                                  "there on), and onnx's converter could not take the model there")
            state.model = upgraded
        if rules.asks_int16 and state.model.opset_imports.get("", 1) < INT4_OPSET:
            upgraded = with_opset(state.model, INT4_OPSET)
            if upgraded is not None:
                state.model = upgraded
            else:
                rules = rules.without_int16()
                state.note(f"int16 Q/DQ needs opset {INT4_OPSET}, and onnx's converter could not take the model "
                           "there: what was asked as int16 is int8")
        state.weight_options = PlanOptions(**WeightSelection.settings(config), precisions=rules,
                                           saturation_safe=config.saturation_safe_weights)
        state.plan = plan_quantization(state.model, state.target, state.weight_options)
        for message in state.plan.notes:
            state.note(message)


class PlanWeightOnly(Pass):
    """Integer weights of 1 to 16 bits, float ops; int4 and int16 need opset 21, reached with onnx's converter.

    The conversion keeps what the model computes, so it is part of planning, not a change of the model.
    """

    name = "plan"
    requires = ("model",)
    provides = ("plan", "weight_options")

    def run(self, state: QuantState) -> None:
        config = state.config
        if config.auto_tune and not state.data.given:
            raise LowbitError(f"{config.source('auto_tune')}: auto_tune measures the model's output cosine on "
                              "calibration data: give --data FOLDER (or calibrate_path / data_list)")
        if not state.data.given and not config.is_default("bias_correction") and config.bias_correction:
            raise LowbitError(f"{config.source('bias_correction')}: bias_correction is measured on calibration "
                              "data: give --data FOLDER (or calibrate_path / data_list), or leave it unset")
        opset21 = False
        if config.bit_num <= 4 or config.bit_num > 8:  # 0 (mixed) may choose 4 or 16 bits
            upgraded = with_opset(state.model, INT4_OPSET)
            if upgraded is not None:
                state.model, opset21 = upgraded, True
            elif config.bit_num > 8:
                raise LowbitError(f"bit_num={config.bit_num} stores weights in int16, which DequantizeLinear reads "
                                  f"from opset {INT4_OPSET} on, and onnx's converter could not take the model there")
            else:
                state.note(f"the model could not be converted to opset {INT4_OPSET}, which int4 and int16 weights "
                           "need: weights are stored in int8"
                           + (" (the mixed-bit search keeps 8 bits)" if config.bit_num == 0 else ""))
        state.target_name = "any runtime, weights only" if not config.matmul_nbits else "ONNX Runtime, weights only"
        state.weight_options = WeightOnlyOptions(**WeightSelection.settings(config), opset21=opset21,
                                                 matmul_nbits=config.matmul_nbits, block_size=config.block_size)
        state.plan = plan_weight_only(state.model, state.weight_options)


class PlanDynamic(Pass):
    """int8 weights, activations quantized at run time (quantizers/dynamic.py)."""

    name = "plan"
    requires = ("model",)
    provides = ("plan", "weight_options")

    def run(self, state: QuantState) -> None:
        config = state.config
        state.target_name = "CPU, dynamic"
        granularity = config.dynamic_quant_granularity
        if granularity != "TENSOR" and state.model.opset_imports.get("", 1) < PER_TOKEN_OPSET:
            upgraded = with_opset(state.model, PER_TOKEN_OPSET)
            if upgraded is not None:
                state.model = upgraded
            else:
                granularity = "TENSOR"
                state.note(f"dynamic_quant_granularity={config.dynamic_quant_granularity}: per-token scales need "
                           f"QuantizeLinear along an axis (opset {PER_TOKEN_OPSET}), and onnx's converter could not "
                           "take the model there: every activation gets one scale per tensor")
        state.weight_options = DynamicOptions(**WeightSelection.settings(config),
                                              activation_matmul=config.dynamic_quant_activation_matmul,
                                              granularity=granularity,
                                              saturation_safe=config.saturation_safe_weights)
        state.plan = plan_dynamic(state.model, state.weight_options)
