"""How many bits each weight gets: ``bit_num`` for all, or the mixed-bit search (``bit_num=0``).

Reads: the weight-only plan, and the probe when there is calibration data. Sets: the
width per weight. The search (errors per width, the budget ``init_scale``, ``auto_tune``)
is :mod:`lowbit.search.mixed_bits`'s; with data, every candidate runs in the data engine.

``auto_tune`` with GPTQ rounding: the search's cosine rounds each layer alone on the float
model's inputs, which runs a little high below 8 bits (EfficientNet-Lite0: 0.995 estimated,
0.9927 written), so the chosen allocation is built as the pipeline will write it and scored
on the probe; while it misses the target, init_scale is halved (at most
:data:`CHECKED_BUILDS` builds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..accuracy.latency import latencies, latency_line
from ..accuracy.widths import WidthSearch, search_init_scale
from ..errors import LowbitError
from ..graph.loading import copy_model
from ..graph.saving import save_atomically
from ..pipeline.passes import Pass, run_pipeline
from ..pipeline.state import QuantState
from ..quantizers.weight_only import plan_weight_only
from ..search.metrics import METRICS
from ..search.mixed_bits import (
    AUTO_TUNE_COSINE,
    LayerBits,
    MixedBitReport,
    OutputProbe,
    WeightRounding,
    allocate,
    output_errors,
    shares_of,
    tune_init_scale,
    weight_errors,
    widths,
)
from .evaluate import candidate_folder, describe_evaluator

CHECKED_BUILDS = 4  # auto_tune with GPTQ: builds of the allocation (init_scale halved after each miss)


@dataclass
class WidthSearchReport:
    """The mixed-bit search with an evaluator: its tries, and what a rerun without it needs."""

    evaluator: str
    original: float
    search: WidthSearch
    latency_ms: tuple[float, float] | None = None  # float model, kept model (ONNX Runtime CPU, one sample)

    @property
    def evaluations(self) -> int:
        return 1 + sum(not t.repeated for t in self.search.tries)  # the float model's included

    def rerun_config(self) -> tuple[dict, dict]:
        return {}, {"init_scale": self.search.init_scale}


class ChooseWidths(Pass):
    name = "choose_widths"
    requires = ("plan", "weight_options")
    provides = ("bits",)

    def __init__(self, build: Callable[[], list[Pass]]):
        self.build = build  # the passes that write an allocation into the model (pipeline.weight)

    def run(self, state: QuantState) -> MixedBitReport | None:
        config, plan = state.config, state.plan
        if config.bit_num != 0:
            state.bits = {name: config.bit_num for name in plan.tensors}
            return None
        choices = widths(state.weight_options.opset21)
        output_probe, rounded, where = None, None, "weights"
        if state.probe is None:
            errors = weight_errors(plan, choices)
        else:
            probe = state.probe

            def score(session, overrides):
                return state.engine.score(session, probe.samples, probe.outputs, probe.references, overrides)

            output_probe = OutputProbe(state.model, plan, score, probe.input_means)
            rounded = WeightRounding(plan, probe.second_moments)
            with tqdm(total=len(plan.tensors) * (len(choices) - 1), desc="measuring layer errors", unit="run",
                      disable=None if state.progress else True) as bar:
                errors = output_errors(plan, output_probe, choices, step=lambda: bar.update(1), rounded=rounded)
            where = f"model outputs on {len(probe.samples)} calibration samples" \
                + (f", {len(rounded.layers)} weights rounded by GPTQ" if rounded.compensates else "")
        if state.evaluator is not None:
            return self._search(state, errors, choices, where)
        if config.auto_tune:  # PlanWeightOnly made sure there is data, hence a probe
            init_scale, state.bits, cosine, tries = tune_init_scale(plan, output_probe, errors, choices,
                                                                    rounded=rounded)
            checked = []
            if rounded.compensates:
                init_scale, state.bits, cosine, checked = self._checked(state, errors, choices, init_scale,
                                                                        state.bits)
            report = _report(plan, init_scale, where, errors, state.bits)
            report.auto_tuned, report.cosine, report.tries, report.checked = True, cosine, tries, checked
            return report
        state.bits = allocate(errors, shares_of(plan), config.init_scale, choices)
        return _report(plan, config.init_scale, where, errors, state.bits)

    def _build(self, state: QuantState, bits: dict[str, int]) -> QuantState:
        """A fork of the state with the model as the pipeline writes it for this allocation."""
        model = copy_model(state.model)  # planned again: the plan's readers are the nodes it rewrites
        fork = state.fork(model=model, plan=plan_weight_only(model, state.weight_options), bits=bits, stored=None,
                          float_layers=None)
        run_pipeline(self.build(), fork)
        return fork

    def _checked(self, state: QuantState, errors, choices, init_scale: float, bits: dict[str, int]):
        """auto_tune's allocation, built and scored on the probe; init_scale halved while it misses the target.
        Returns (init_scale, bits, the written model's cosine, [(init_scale, cosine) per build])."""
        probe, shares, checked = state.probe, shares_of(state.plan), []
        for build in range(CHECKED_BUILDS):
            if build:  # the last one missed the target
                init_scale /= 2
                bits = allocate(errors, shares, init_scale, choices)
            fork = self._build(state, bits)
            stats = state.engine.score(fork.model, probe.samples, probe.outputs, probe.references)
            cosine = METRICS["cosine-similarity"].value(stats)
            checked.append((init_scale, cosine))
            if cosine >= AUTO_TUNE_COSINE or init_scale == 0.0:
                break
        return init_scale, bits, cosine, checked

    def _search(self, state: QuantState, errors, choices, where: str) -> MixedBitReport:
        """The largest init_scale the evaluator accepts (accuracy.widths); each allocation built and evaluated."""
        plan, evaluator = state.plan, state.evaluator
        shares = shares_of(plan)
        with candidate_folder(state) as folder:
            paths: dict[tuple, Path] = {}

            def evaluate(bits: dict[str, int], label: str):
                fork = self._build(state, bits)
                path = paths[tuple(sorted(bits.items()))] = folder / f"candidate-{len(paths)}{state.output_path.suffix}"
                save_atomically(fork.model, path)
                return evaluator.evaluate(path, label)

            search = None
            for family in _families(choices):
                earlier = search.tries if search is not None else []
                search = search_init_scale(lambda scale: allocate(errors, shares, scale, family),
                                           lambda bits: sum(bits[n] * shares[n] for n in bits), evaluate,
                                           lambda: evaluator.left, {name: family[-1] for name in errors})
                search.tries = earlier + search.tries
                if search.bits is not None:
                    break
            report = WidthSearchReport(describe_evaluator(evaluator), evaluator.original, search)
            if search.bits is not None and state.probe is not None:
                report.latency_ms = latencies(state.model_path, paths[tuple(sorted(search.bits.items()))],
                                              state.probe.samples[0])
        state.accuracy = report
        if search.bits is None:
            raise LowbitError(f"the evaluator was not satisfied ({state.accuracy.evaluator}): {search.stopped}; "
                              f"float {evaluator.original:.6g}, the highest "
                              f"{max(e.metric for e in evaluator.history[1:]):.6g} after {len(evaluator.history)} "
                              "evaluations; nothing was written"
                              + ("; raise max_evaluations" if "max_evaluations" in search.stopped else ""))
        state.bits = search.bits
        report = _report(plan, search.init_scale, where, errors, state.bits)
        report.searched = state.accuracy
        return report

    def describe(self, report: MixedBitReport | None) -> list[str]:
        if report is None:
            return []
        if report.searched is not None:
            return _describe_search(report.searched) + self._layers(report, "the evaluator chose")
        return self._layers(report, "auto_tune chose" if report.auto_tuned else "with")

    @staticmethod
    def _layers(report: MixedBitReport, how: str) -> list[str]:
        lines = [f"  mixed bit: {how} init_scale={report.init_scale:.4g}, errors measured on {report.measured_on}"]
        if report.checked:
            lines.append("    auto_tune's allocation built and scored: " + ", ".join(
                f"init_scale={scale:.4g} cosine {cosine:.5f}" for scale, cosine in report.checked))
        for layer in sorted(report.layers, key=lambda layer: -layer.elements)[:12]:
            errors = ", ".join(f"{bits}b {error:.3g}" for bits, error in sorted(layer.errors.items()))
            lines.append(f"    {layer.bits:2d} bits  {layer.elements:>9}  {layer.nodes[0]}  (error {errors})")
        if len(report.layers) > 12:
            lines.append(f"    ... {len(report.layers) - 12} smaller weights (result.mixed_bits lists them all)")
        return lines


def _families(choices: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The widths the evaluator's search tries, narrowest family first: up to 8 bits, where every allocation is at
    most the 8-bit file (a sensitive layer at 16 bits can cost more than the 4-bit layers save), then all widths
    when even every weight at 8 bits fails the evaluator."""
    capped = tuple(w for w in choices if w <= 8)
    return [capped, choices] if capped and capped != choices else [choices]


def _describe_search(report: WidthSearchReport) -> list[str]:
    lines = [f"  accuracy search: {report.evaluator}, init_scale by bisection",
             f"       1  {'float model':<34} {report.original:.6g}"]
    number = 1
    for attempt in report.search.tries:
        number += not attempt.repeated
        mark = "*" if attempt.init_scale == report.search.init_scale and attempt.evaluation.satisfied else " "
        verdict = "satisfied" if attempt.evaluation.satisfied else "not satisfied"
        lines.append(f"    {mark} {'-' if attempt.repeated else number:>3}  init_scale={attempt.init_scale:<10.4g} "
                     f"{attempt.average_bits:5.2f} bits  {attempt.evaluation.metric:<10.6g} {verdict}"
                     + ("  (an allocation tried before)" if attempt.repeated else ""))
    lines.append(f"  {report.evaluations} evaluations; {report.search.stopped}")
    if report.latency_ms is not None:
        lines.append(latency_line(*report.latency_ms))
    return lines


def _report(plan, init_scale: float, where: str, errors, bits) -> MixedBitReport:
    layers = [LayerBits(name, tuple(node.name for node, _ in tensor.readers), tensor.size, bits[name],
                        errors[name]) for name, tensor in plan.tensors.items()]
    return MixedBitReport(init_scale, where, layers)
