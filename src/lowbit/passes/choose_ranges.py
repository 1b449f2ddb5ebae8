"""Turn the observers into one activation range per tensor: the configured method, or the best of several.

Reads: the observers, the candidates, the held-back and tuning samples. Needs, when
candidates are compared: the float model's outputs on the held-back samples (measured in
the calibration run, see :mod:`lowbit.pipeline.engine`). Sets: the ranges and the other
candidates' ranges (which an accuracy search tries next), the float outputs on the held-back
samples (what bias_correction_metric compares with later); with ``per_channel`` /
``asymmetric`` lists, the target, options and plan of the scheme that won.
The search itself is :func:`lowbit.search.modelwise.choose_ranges`; each candidate's model
runs in the data engine.
"""

from __future__ import annotations

from dataclasses import replace

import onnx
import onnx_ir as ir

from ..calibration.observers import Observer, OutputsObserver
from ..calibration.ranges import Range
from ..graph.loading import copy_model
from ..pipeline.engine import HELD_BACK, Request
from ..pipeline.passes import FLOAT, Pass
from ..pipeline.state import QuantState
from ..quantizers.plan import PlanOptions, QuantPlan, plan_quantization
from ..quantizers.qdq import activation_qparams, apply_plan
from ..quantizers.targets import TARGETS, Target
from ..search.metrics import PairStats
from ..search.modelwise import Scheme, SearchOptions, SearchReport, choose_ranges
from .calibrate import compares


class ChooseRanges(Pass):
    name = "choose_ranges"
    requires = ("plan", "observers", "candidates")
    provides = ("ranges",)
    # per_channel / asymmetric lists: the plan of the winning scheme replaces the job's
    # (the same activation tensors, other weight granularity or activation schemes)

    def applies(self, state: QuantState) -> bool:
        return bool(state.plan.activations) and state.config.calibration_table is None

    def measures(self, state: QuantState) -> str | None:
        return FLOAT if compares(state) else None

    def requests(self, state: QuantState) -> list[Request]:
        self.outputs = [value.name for value in state.model.graph.outputs if value.dtype == ir.DataType.FLOAT]
        self.references = {name: OutputsObserver() for name in self.outputs}
        return [Request(self.references, samples=HELD_BACK)]

    def run(self, state: QuantState) -> SearchReport:
        config = state.config

        def collect_tuning(model: onnx.ModelProto, observers: dict[str, Observer]) -> None:
            state.engine.run(model, [Request(observers)], what="per-op scoring", model_label="scoring model",
                             feeds=state.tuning)

        if compares(state):
            state.held_back_outputs = self.outputs
            state.held_back_references = [[self.references[name].arrays[i] for name in self.outputs]
                                          for i in range(len(state.held_back))]

        variants: dict[Scheme, tuple[Target, PlanOptions, QuantPlan]] = {}

        def variant(scheme: Scheme) -> tuple[Target, PlanOptions, QuantPlan]:
            """The target, options and plan of a candidate's scheme (the job's own when it names none)."""
            if scheme not in variants:
                target, options = state.target, state.weight_options
                if scheme.asymmetric is not None:
                    target = TARGETS[config.target].with_symmetric_activations(not scheme.asymmetric)
                if scheme.per_channel is not None:
                    options = replace(options, per_channel=scheme.per_channel)
                same = target == state.target and options == state.weight_options
                variants[scheme] = (target, options, state.plan if same else
                                    plan_quantization(state.model, target, options))
            return variants[scheme]

        def score(candidates: list[tuple[Scheme, dict[str, Range]]]) -> list[PairStats]:
            models = [_quantized_copy(state, ranges, *variant(scheme)[:2]) for scheme, ranges in candidates]
            return state.engine.score_all(models, state.held_back, self.outputs, state.held_back_references)

        state.ranges, scheme, report = choose_ranges(
            state.model, lambda s: variant(s)[2], state.observers,
            SearchOptions(config.search_metric, config.layerwise_search, config.tune_num, config.layerwise_metric),
            state.candidates, collect_tuning, score, len(state.held_back))
        state.target, state.weight_options, state.plan = variant(scheme)  # per_channel / asymmetric chosen
        state.range_alternatives = report.alternatives
        return report

    def describe(self, report: SearchReport) -> list[str]:
        tuned = f", {report.tuned_tensors} tensors tuned per op" if report.tuned_tensors else ""
        if report.dead_zone_clipped:
            tuned += (f", {report.dead_zone_clipped} ranges clipped where their readers stop telling values apart "
                      "(HardSwish, HardSigmoid, Relu, Clip, SiLU)")
        if not report.rows:
            return [f"  activation ranges: {report.chosen}{tuned}"]
        lines = [f"  activation ranges: search by {report.metric} on {report.samples} held-back samples, "
                 f"kept {report.chosen}{tuned}"]
        if report.best_mean:
            lines.append(f"    ({report.best_mean} scored best, by less than the samples can tell apart: a tie, "
                         f"which {report.chosen} takes)")
        for row in report.rows:
            mark = "*" if row.label == report.chosen else " "
            lines.append(f"   {mark} {row.label:<40} {row.score:.6g}")
        return lines


def _quantized_copy(state: QuantState, ranges: dict[str, Range], target: Target,
                    options: PlanOptions) -> onnx.ModelProto:
    """The model quantized with ``ranges``, as a new proto; the state's model is left float."""
    copy = copy_model(state.model)
    plan = plan_quantization(copy, target, options)
    apply_plan(copy, plan, activation_qparams(plan, ranges, state.input_values))
    return ir.serde.serialize_model(copy)
