"""weight_levels=AUTO: the fewest levels per layer that the evaluator accepts (AMCT's automatic mode).

Reads: the layers GPTQ rounded and their input second moments (``state.level_job``, kept by
:class:`~lowbit.passes.round_weights.RoundWeights`), from which each layer's integers on 16,
32, 64 and 128 levels are computed with their layer output errors; the model as the build
passes left it (uniform grid); and the evaluator. An error
budget gives every layer the fewest levels whose output error is within it (256, the uniform
grid, when none is): one number orders every allocation from the uniform model to 16 levels
everywhere. The budget is searched as the mixed-bit search searches ``init_scale``
(:func:`lowbit.accuracy.widths.search_init_scale`: bisection over log10 in [-5, 0], an
allocation already evaluated not evaluated again, within ``max_evaluations``), each
candidate written packed and evaluated; every layer uniform is tried last when no budget
passes, and when even that fails the goal cannot be met and nothing is written.

Sets: the kept integers and each layer's levels tag (Save packs them), and the search's
report. Bias correction ran before, on the uniform weights: what the evaluator accepted is
exactly what is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_ir as ir

from ..accuracy.widths import WidthSearch, search_init_scale
from ..errors import LowbitError
from ..graph.loading import copy_model
from ..graph.saving import save_atomically
from ..pipeline.passes import Pass
from ..pipeline.state import QuantState
from ..quantizers.levels import AUTO, AUTO_COUNTS, PACKED_TAG, pack_model
from ..recovery.gptq import level_options
from ..recovery.layers import integer_weight
from .evaluate import candidate_folder, describe_evaluator, evaluate_float_model
from .round_weights import fixed_levels

UNIFORM = 256


@dataclass(frozen=True)
class LevelSearch:
    evaluator: str
    original: float
    search: WidthSearch
    counts: dict[str, int]  # per node: the levels kept (256: the uniform grid)
    bytes_uniform: int
    bytes_kept: int
    packed: bool  # pack_weight_levels


class SearchLevels(Pass):
    name = "search_levels"
    setting = "weight_levels"
    requires = ("model",)
    changes_model = True

    def applies(self, state: QuantState) -> bool:
        # without an evaluator CheckSettings has stopped the job before any work
        return state.config.weight_levels == AUTO and state.level_job is not None and state.evaluator is not None

    def run(self, state: QuantState) -> LevelSearch | None:
        evaluate_float_model(state)
        fixed = fixed_levels(state.level_job, state.config)  # node_config / op_config entries keep their K
        options = level_options(state.level_job, AUTO_COUNTS, state.config.weight_rounding != "NEAREST", set(fixed))
        if not options:
            state.note("weight_levels=AUTO: every layer has its levels from node_config or op_config; nothing to "
                       "search")
            return None
        sizes = {name: choices[0].integers.size for name, choices in options.items()}

        def allocate(budget: float) -> dict[str, int]:
            return {name: min((o.count for o in choices if o.output_error <= budget), default=UNIFORM)
                    for name, choices in options.items()}

        def average_bits(counts: dict[str, int]) -> float:
            return sum(math.log2(counts[name]) * size for name, size in sizes.items()) / sum(sizes.values())

        with candidate_folder(state) as folder:
            def evaluate(counts: dict[str, int], label: str):
                candidate = copy_model(state.model)
                _apply(candidate, counts, options)
                if state.config.pack_weight_levels:
                    pack_model(candidate)
                path = folder / f"levels-{average_bits(counts):.3f}-{state.output_path.name}"
                save_atomically(candidate, path)
                return state.evaluator.evaluate(path, f"{label} ({average_bits(counts):.2f} bits a weight)")

            search = search_init_scale(allocate, average_bits, evaluate, lambda: state.evaluator.left,
                                       {name: UNIFORM for name in options}, budget_name="error budget")
        if search.bits is None and not search.stopped.startswith("max_evaluations"):
            raise LowbitError(f"weight_levels=AUTO: the evaluator ({describe_evaluator(state.evaluator)}) is not "
                              "satisfied even with every layer on the uniform grid; nothing was written")
        counts = search.bits or {name: UNIFORM for name in options}
        if search.bits is None:
            state.note("weight_levels=AUTO: max_evaluations ran out before any allocation was accepted; every layer "
                       "keeps the uniform grid")
        _apply(state.model, counts, options)
        report = LevelSearch(describe_evaluator(state.evaluator), state.evaluator.original, search, counts,
                             sum(choices[0].integers.nbytes for choices in options.values()),
                             sum(_kept_bytes(choices, counts[name]) for name, choices in options.items()),
                             state.config.pack_weight_levels)
        if state.accuracy is None:
            state.accuracy = report
        return report

    def describe(self, report: LevelSearch | None) -> list[str]:
        if report is None:
            return []
        histogram = {}
        for count in report.counts.values():
            histogram[count] = histogram.get(count, 0) + 1
        spread = ", ".join(f"{n} at {k}" for k, n in sorted(histogram.items()))
        evaluations = sum(not attempt.repeated for attempt in report.search.tries)
        stored = "packed" if report.packed else "once packed (pack_weight_levels=false: stored as integers)"
        lines = [f"  weight levels (AUTO), evaluator {report.evaluator}: float {report.original:.6g}; "
                 f"{evaluations} evaluations in {len(report.search.tries)} tries ({report.search.stopped}); "
                 f"layers: {spread}; weights {report.bytes_uniform / 1e6:.2f} -> {report.bytes_kept / 1e6:.2f} MB "
                 f"{stored}"]
        for attempt in report.search.tries:
            verdict = "satisfied" if attempt.evaluation.satisfied else "not satisfied"
            again = " (an allocation already evaluated)" if attempt.repeated else ""
            budget = "every layer uniform" if attempt.init_scale == 0 else f"error budget {attempt.init_scale:.3g}"
            lines.append(f"    {budget} ({attempt.average_bits:.2f} bits a weight): {attempt.evaluation.metric:.6g}, "
                         f"{verdict}{again}")
        return lines


def _apply(model: ir.Model, counts: dict[str, int], options: dict[str, list]) -> None:
    """Give each named layer the integers of its allocated levels (tagged for packing), or leave it uniform."""
    for node in model.graph:
        count = counts.get(node.name)
        if count is None or count == UNIFORM:
            continue
        dq = integer_weight(node)
        option = next(o for o in options[node.name] if o.count == count)
        dq.inputs[0].const_value = ir.tensor(option.integers, name=dq.inputs[0].name)
        dq.metadata_props[PACKED_TAG] = str(count)


def _kept_bytes(choices: list, count: int) -> int:
    return choices[0].integers.nbytes if count == UNIFORM else next(o.bytes_packed for o in choices
                                                                     if o.count == count)
