"""Store the channels between two layers in an order that keeps large int8 weights out of one kernel pair.

Reads: the target (int8 weights read with 8-bit activations) and the plan's options (per channel or not).
Changes the model, keeping its outputs: the channels of each chain that
:mod:`lowbit.quantizers.pair_order` finds (1x1 expand -> depthwise -> 1x1 project, ...)
are permuted, so the weight-pair guard (:mod:`lowbit.quantizers.saturation`) needs a
wider grid for fewer channels. Everything measured later (calibration, GPTQ, reports) sees
the reordered model. With a ``per_channel`` list (Horizon's, a search between per-channel
and per-tensor weights) the order waits for the range search's choice, since it depends on
the grid (an activation's range does not depend on the order of its channels): a rerun from
the JSON an accuracy search wrote, which names the kept granularity alone, then orders the
same way. The reordered chains are written into the output model's metadata
(``lowbit.channel_order``), from which ``lowbit analyze`` reorders the original float model
the same way before it compares the two tensor by tensor.
"""

from __future__ import annotations

import json

from ..graph.loading import copy_model
from ..pipeline.passes import Pass
from ..pipeline.state import QuantState
from ..quantizers.pair_order import CHANNEL_ORDER_KEY, OrderReport, order_channels
from ..quantizers.saturation import PAIR_BOUND


class OrderChannels(Pass):
    name = "order_channels"
    setting = "saturation_safe_weights"
    requires = ("model", "plan", "target", "weight_options")
    changes_model = True
    keeps_outputs = True

    def __init__(self, after_range_search: bool = False):
        self.after_range_search = after_range_search  # True: the place for a per_channel list

    def applies(self, state: QuantState) -> bool:
        weight, activation = state.target.weight.qtype, state.target.activation.qtype
        granularity_searched = len(state.config.per_channel or ()) > 1
        return (state.plan.saturation_safe and weight.bits == 8 and weight.signed and activation.bits == 8
                and granularity_searched == self.after_range_search)

    def run(self, state: QuantState) -> OrderReport:
        # Every chain is reordered, whatever precision the plan gives its last layer: a float or int16 layer
        # computes the same in any order, and the order then depends on the float weights and the target alone,
        # so that a rerun from the configuration an accuracy search wrote (other nodes float) writes the same model.
        report = order_channels(state.model.graph, state.weight_options.per_channel)
        if report.orders:
            state.model.metadata_props[CHANNEL_ORDER_KEY] = json.dumps(report.orders, separators=(",", ":"))
            state.rewritten_float = copy_model(state.model)
        return report

    def describe(self, report: OrderReport) -> list[str]:
        if not report.reordered:
            return []
        return [f"  channel order: {report.reordered} of {report.chains} layer chains store their channels so that "
                f"fewer int8 weight pairs go over {PAIR_BOUND}: {report.over_before} -> {report.over_after} of "
                f"{report.channels} output channels of their last layers need a wider grid (same float outputs)"]
