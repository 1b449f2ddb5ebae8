"""FULL_QUANT with an evaluator: move the fewest nodes up the precision ladder that satisfy it.

Reads: the calibrated ranges (and the range search's other candidates), the plan, the
evaluator. Each candidate is built by the pipeline's own build passes (rewrite, weight
rounding, bias correction) on a fork of the state, and written to a temporary file that
the evaluator reads; so the model kept is exactly one the evaluator accepted. The steps:

1. the float model, then the planned model (int8 where the configuration says nothing
   else; int4 weights with weight_bit_num=4) are evaluated; if the evaluator is satisfied,
   nothing moves;
2. the range search's other candidates (same scheme), best held-back score first, each
   with every node as planned: the range search judges the whole output by
   ``search_metric``, the evaluator by what the user cares about (a detector's scores
   rather than its box coordinates), and a model with other ranges costs no speed. The
   first one the evaluator accepts is kept and nothing moves (at most half of the
   evaluations left go to them); if none is, the nodes move
   from the ranges whose metric came closest to the float model's (the range search's
   own on a tie);
3. the nodes are ranked on a few samples (accuracy_target's eval_data when given, else
   calibration samples) by how much leaving each float lowers the output error
   (:func:`lowbit.analysis.sensitivity.ranked_nodes`, on the switched model of the int8
   candidate with those ranges: one session, no evaluator call);
4. :func:`lowbit.accuracy.climb.climb` moves prefixes of the ranking up the ladder.

Nodes that op_config or node_config name keep what the user gave them. Sets: the plan and
options of the kept candidate (the build passes after this one write it), the ranges when
another candidate's were kept, and the search's report, which the summary shows and from
which the quant_config JSON (with the ranges' calibration table) is written.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..accuracy.climb import Assignment, Trial, climb
from ..accuracy.evaluator import Evaluation
from ..accuracy.goals import GoalEvaluator, NearTies
from ..accuracy.latency import WHY_NOT_FASTER, latencies, latency_line
from ..analysis.sensitivity import OutputError, ranked_nodes
from ..analysis.switches import OUTPUT_ROUNDING, switched_model
from ..config.precision import FLOAT16, FLOAT32, INT4, INT8, INT16, NodePrecision
from ..data.feeds import batched
from ..errors import LowbitError
from ..graph.loading import copy_model, with_opset
from ..graph.passes import typed
from ..graph.query import is_float32
from ..graph.runtime import make_session
from ..graph.saving import save_atomically
from ..pipeline.passes import Pass, PipelineError, run_pipeline
from ..pipeline.state import QuantState
from ..quantizers.plan import plan_quantization
from .evaluate import candidate_folder, describe_evaluator, evaluate_float_model
from .plan import INT4_OPSET

LADDERS = {"CPU": (INT8, FLOAT32), "DSP": (INT8, INT16, FLOAT32), "NVGPU": (INT8, FLOAT16, FLOAT32)}
INT4_LADDER = (INT4, INT8, FLOAT32)  # weight_bit_num=4 (ONNX Runtime CPU): a weight goes to int8 before the node floats
RANKING_SAMPLES = 16  # calibration samples the sensitivity ranking runs on
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class PrecisionSearch:
    evaluator: str
    ladder: tuple[str, ...]
    original: float
    first: Evaluation  # the planned model, before any node moved
    range_trials: list[Trial] = field(default_factory=list)  # the range search's other candidates, as planned
    ranges_kept: str = ""  # the one whose ranges the kept model has ("": the range search's own choice)
    trials: list[Trial] = field(default_factory=list)  # nodes moved up the ladder
    near_ties: NearTies | None = None  # an agreement or accuracy-drop goal the planned model missed: how near
    kept: Assignment = field(default_factory=dict)  # node -> precision, the fused activations left out
    ranks: dict[str, int] = field(default_factory=dict)  # node -> place in the ranking (1 = most sensitive)
    op_types: dict[str, str] = field(default_factory=dict)
    stopped: str = ""
    ranking_seconds: float = 0.0
    node_config: dict[str, NodePrecision] = field(default_factory=dict)  # the user's and the search's
    weighted: tuple[int, int] = (0, 0)  # weighted nodes int8 (int4 weights included), weighted nodes
    int4_weights: int = 0  # of those, the nodes whose weights are int4
    latency_ms: tuple[float, float] | None = None  # float model, kept model (ONNX Runtime CPU, one sample)

    @property
    def evaluations(self) -> int:
        return 2 + len(self.range_trials) + len(self.trials)  # and the float model and the planned one

    @property
    def final(self) -> Evaluation:
        if self.kept:
            return [t.evaluation for t in self.trials if t.assignment == self.kept][-1]
        if self.ranges_kept:
            return next(t.evaluation for t in self.range_trials if t.label == self.ranges_kept)
        return self.first

    def rerun_config(self) -> tuple[dict[str, NodePrecision], dict]:
        """What a rerun without the search needs beyond the job's settings: the node_config."""
        return self.node_config, {}


class SearchPrecisions(Pass):
    name = "search_precisions"
    requires = ("plan", "evaluator")

    def __init__(self, build: Callable[[], list[Pass]]):
        self.build = build  # the passes that turn ranges and a plan into the model (pipeline.full)

    def applies(self, state: QuantState) -> bool:
        return state.evaluator is not None and bool(state.plan.quantized_nodes)

    def run(self, state: QuantState) -> PrecisionSearch:
        evaluate_float_model(state)
        evaluator = state.evaluator
        rules = state.weight_options.precisions
        ladder = ladder_of(state)
        base_model = state.model
        if INT16 in ladder and base_model.opset_imports.get("", 1) < INT4_OPSET:
            base_model = with_opset(state.model, INT4_OPSET)
            if base_model is None:
                state.note(f"precision_ladder: int16 needs opset {INT4_OPSET}, which onnx's converter could not "
                           "reach; the search skips int16")
                ladder, base_model = tuple(p for p in ladder if p != INT16), state.model
        samples = _ranking_samples(state)
        with candidate_folder(state) as folder:
            candidates = _Candidates(state, base_model, rules, self.build, folder)
            first_model, first_path = candidates.build({})
            report = PrecisionSearch(describe_evaluator(evaluator), ladder, evaluator.original,
                                     evaluator.evaluate(first_path, "as planned"))
            report.stopped = "the planned model satisfied the evaluator"
            if not report.first.satisfied and isinstance(evaluator.evaluator, GoalEvaluator):
                report.near_ties = evaluator.evaluator.near_ties()
            kept_path = first_path
            if not report.first.satisfied:
                first_model, kept_path = self._try_other_ranges(state, candidates, report, first_model)
            if kept_path is None:
                start = time.perf_counter()
                ranking = self._rank(state, first_model, rules, samples)
                report.ranking_seconds = time.perf_counter() - start
                report.ranks = {name: i + 1 for i, name in enumerate(ranking)}
                int4_nodes = _int4_weight_nodes(state)
                outcome = climb(ranking, ladder, candidates.evaluate, lambda: evaluator.left,
                                moves=lambda name, rung: rung != INT8 or ladder[0] != INT4 or name in int4_nodes)
                report.trials, report.stopped = outcome.trials, outcome.stopped
                if outcome.kept is None:
                    raise LowbitError(self._failure(report, evaluator.history))
                report.kept = outcome.kept
                kept_path = candidates.paths[frozenset(report.kept.items())]
            report.latency_ms = latencies(state.model_path, kept_path, samples[0])
        report.node_config = candidates.node_config(report.kept)
        report.op_types = {node.name: node.op_type for node in state.model.graph}
        if report.kept:
            state.model = base_model
            state.weight_options = replace(state.weight_options,
                                           precisions=replace(rules, nodes=report.node_config))
            state.plan = plan_quantization(state.model, state.target, state.weight_options)
            for message in state.plan.notes:
                state.note(message)
        report.weighted = _weighted_int8(state)
        report.int4_weights = len(_int4_weight_nodes(state))
        state.accuracy = report
        return report

    @staticmethod
    def _try_other_ranges(state: QuantState, candidates: _Candidates, report: PrecisionSearch, planned: ir.Model
                          ) -> tuple[ir.Model, Path | None]:
        """The range search's other candidates as planned, best held-back score first, until the evaluator accepts
        one, on at most half of the evaluations left. Returns the model the nodes move from and, when one was
        accepted, its file.

        Whichever is kept, its ranges become the job's. When none is accepted the nodes move from the one whose
        metric came closest to the float model's (the planned model on a tie): lowbit does not know which way
        the user's metric improves, but the float model's metric is the one every candidate approaches as nodes
        leave int8.
        """
        closest, gap, accepted = planned, abs(report.first.metric - report.original), None
        affordable = state.evaluator.left // 2  # the other half for moving nodes
        for label, ranges in list(state.range_alternatives.items())[:affordable]:
            model, path = candidates.build({}, ranges)
            evaluation = state.evaluator.evaluate(path, f"the ranges of {label}")
            report.range_trials.append(Trial(label, {}, evaluation))
            if evaluation.satisfied:
                closest, accepted, report.ranges_kept = model, path, label
                report.stopped = f"the ranges of {label} satisfied the evaluator"
                break
            if abs(evaluation.metric - report.original) < gap:
                closest, gap, report.ranges_kept = model, abs(evaluation.metric - report.original), label
        if report.ranges_kept:
            state.ranges = state.range_alternatives[report.ranges_kept]
        return closest, accepted

    def _rank(self, state: QuantState, quantized: ir.Model, rules, samples: list[dict[str, np.ndarray]]
              ) -> list[str]:
        """The movable nodes, most sensitive first, from the switched form of the planned candidate."""
        batches = list(batched(samples, state.specs, 8))
        outputs = [v.name for v in state.model.graph.outputs if is_float32(v)]
        switched = switched_model(typed(copy_model(quantized)), state.model)
        error = OutputError(make_session(switched.model), switched, batches, outputs)
        everything = {node.name for node in switched.nodes}
        nodes, _ = ranked_nodes(error, error(everything), workers=state.workers, alone=False)
        graph_nodes = {node.name: node for node in state.model.graph}
        return [n.name for n in nodes if n.op_type != OUTPUT_ROUNDING and n.name in graph_nodes
                and not rules.explicit(graph_nodes[n.name])]

    @staticmethod
    def _failure(report: PrecisionSearch, history: list[Evaluation]) -> str:
        best = max(history[1:], key=lambda e: e.metric)
        return (f"the evaluator was not satisfied ({report.evaluator}): {report.stopped}; float {report.original:.6g}, "
                f"as planned {report.first.metric:.6g}, the highest {best.metric:.6g} ({best.what}) after "
                f"{len(history)} evaluations; nothing was written"
                + ("; raise max_evaluations" if "max_evaluations" in report.stopped else ""))

    def describe(self, report: PrecisionSearch) -> list[str]:
        lines = [f"  accuracy search: {report.evaluator}, ladder {' -> '.join(report.ladder)}",
                 _row(False, 1, "float model", report.original),
                 _row(False, 2, "as planned", report.first.metric, report.first)]
        for i, trial in enumerate(report.range_trials, start=3):
            lines.append(_row(trial.label == report.ranges_kept, i, f"ranges of {trial.label}",
                              trial.evaluation.metric, trial.evaluation))
        for i, trial in enumerate(report.trials, start=3 + len(report.range_trials)):
            lines.append(_row(trial.assignment == report.kept, i, trial.label, trial.evaluation.metric,
                              trial.evaluation))
        if report.near_ties is not None:
            lines.append(report.near_ties.line())
        if report.ranges_kept and not report.kept:
            lines.append(f"  kept the ranges of {report.ranges_kept}, every node as planned, after "
                         f"{report.evaluations} evaluations (the range search had kept another: see above)")
        elif not report.kept:
            lines.append(f"  kept the planned model after {report.evaluations} evaluations")
        else:
            by_precision = Counter(report.kept.values())
            lines.append(f"  kept {report.final.metric:.6g} after {report.evaluations} evaluations (ranking "
                         f"{report.ranking_seconds:.1f} s; {report.stopped}): "
                         + ", ".join(f"{n} node{'s' if n > 1 else ''} {p}" for p, n in by_precision.items()))
            if report.ranges_kept:
                lines.append(f"    from the ranges of {report.ranges_kept}, whose metric came closest to the float "
                             "model's (the range search had kept another: see above)")
            for name, precision in sorted(report.kept.items(), key=lambda item: report.ranks.get(item[0], 0)):
                lines.append(f"    {name} ({report.op_types.get(name, '?')}): {precision}, "
                             f"{_ordinal(report.ranks.get(name, 0))} by sensitivity")
        int8, weighted = report.weighted
        if weighted:
            lines.append(f"  weighted nodes (Conv, Gemm, MatMul) in int8: {int8} of {weighted}"
                         + (f" ({report.int4_weights} with int4 weights)" if INT4 in report.ladder else ""))
        if report.latency_ms is not None:
            lines.append(latency_line(*report.latency_ms))
            if report.latency_ms[1] >= report.latency_ms[0] and report.kept:
                lines.append("  the kept model is no faster than the float model: the goal needs more nodes float "
                             "than int8 can pay for here (lowbit analyze shows where the error comes from)")
            elif report.latency_ms[1] >= report.latency_ms[0]:
                lines.append(f"  the kept model is the planned one, and int8 itself is no faster than float on "
                             f"this CPU ({WHY_NOT_FASTER})")
        return lines


def ladder_of(state: QuantState) -> tuple[str, ...]:
    """precision_ladder, else the target's ladder (from int4 with weight_bit_num=4)."""
    if state.config.precision_ladder:
        return tuple(state.config.precision_ladder)
    return INT4_LADDER if state.config.weight_bit_num == 4 else LADDERS[state.config.target]


def tensors_to_observe(state: QuantState) -> set[str]:
    """The activations the search's candidates may quantize beyond the plan's: each rung's, every node on it.

    Calibrate observes these too when an evaluator is set, so that a candidate never quantizes
    a tensor the calibration did not see.
    """
    if state.evaluator is None or state.config.quant_type != "FULL_QUANT":
        return set()
    rules = state.weight_options.precisions
    names: set[str] = set()
    for rung in ladder_of(state):
        if rung in (INT4, INT8, FLOAT32):  # the plan's own activations, or fewer
            continue
        model = state.model if rung != INT16 else with_opset(state.model, INT4_OPSET)
        if model is None:
            continue
        options = replace(state.weight_options, precisions=replace(rules, model=rung))
        names |= set(plan_quantization(model, state.target, options).activations)  # planning only reads
    return names - set(state.plan.activations)


class _Candidates:
    """Builds the candidate of an assignment with the pipeline's build passes on a fork, into ``folder``."""

    def __init__(self, state: QuantState, base_model: ir.Model, rules, build: Callable[[], list[Pass]],
                 folder: Path):
        self.state, self.base_model, self.rules, self.build_passes, self.folder = (state, base_model, rules, build,
                                                                                   folder)
        self.paths: dict[frozenset, Path] = {}  # assignment -> its candidate file (with the job's ranges)
        self.built = itertools.count(1)  # numbers the candidate files
        self.fused: dict[str, list[str]] = {}  # a node -> the activations fused into it
        for decision in state.plan.quantized_nodes:
            if decision.fused_into:
                self.fused.setdefault(decision.fused_into, []).append(decision.node.name)

    def node_config(self, assignment: Assignment) -> dict[str, NodePrecision]:
        """The node_config of an assignment. A float node takes its fused activation along (else the
        activation would be planned int8 on its own, reading an output no range was calibrated for);
        an int16 one leaves it unnamed, so that it stays fused and 16-bit with the node."""
        moved = {name: NodePrecision(precision, where="accuracy search")
                 for node, precision in assignment.items()
                 for name in (node, *(self.fused.get(node, ()) if precision in (FLOAT16, FLOAT32) else ()))}
        return {**moved, **self.rules.nodes}  # the user's node_config wins

    def build(self, assignment: Assignment, ranges: dict[str, tuple[float, float]] | None = None
              ) -> tuple[ir.Model, Path]:
        """The candidate of ``assignment``, with the job's ranges or ``ranges`` (only the former's files are
        remembered by assignment, in ``paths``)."""
        state = self.state
        remember = ranges is None
        ranges = state.ranges if remember else ranges
        options = replace(state.weight_options, precisions=replace(self.rules, nodes=self.node_config(assignment)))
        model = copy_model(self.base_model)
        plan = plan_quantization(model, state.target, options)
        missing = sorted(set(plan.activations) - set(ranges or {}))
        if missing:
            raise PipelineError(f"a candidate quantizes {missing[0]}, which has no range")
        fork = state.fork(model=model, plan=plan, weight_options=options, qparams=None, float_layers=None,
                          ranges=ranges)
        run_pipeline(self.build_passes(), fork)
        path = self.folder / f"candidate-{next(self.built)}{state.output_path.suffix}"
        save_atomically(fork.model, path)
        if remember:
            self.paths[frozenset(assignment.items())] = path
        return fork.model, path

    def evaluate(self, assignment: Assignment, label: str) -> Evaluation:
        return self.state.evaluator.evaluate(self.build(assignment)[1], label)


def _ranking_samples(state: QuantState) -> list[dict[str, np.ndarray]]:
    """The goal's own samples when lowbit holds them (accuracy_target's eval_data); else samples the statistics
    did not see (the held-back ones); else the first calibration ones."""
    goal = state.evaluator.evaluator
    if isinstance(goal, GoalEvaluator) and goal.samples is not None and state.config.eval_data is not None:
        rows = [{name: array[i:i + 1] for name, array in feed.items()}
                for feed in goal.samples.feeds for i in range(len(next(iter(feed.values()))))]
        return rows[:RANKING_SAMPLES]
    if state.held_back:
        return state.held_back[:RANKING_SAMPLES]
    stream, _ = state.data.open(None)
    return [feed for _, feed in zip(range(RANKING_SAMPLES), stream)]


def _weighted_int8(state: QuantState) -> tuple[int, int]:
    weighted = [d for d in state.plan.decisions.values() if d.node.op_type in WEIGHTED and not d.fused_into]
    int8 = [d for d in weighted if d.quantized and d.precision in (INT8, "")]
    return len(int8), len(weighted)


def _int4_weight_nodes(state: QuantState) -> set[str]:
    """The nodes whose weights the plan stores as int4."""
    return {slot.node.name for slot in state.plan.weights if slot.scheme.qtype.bits == 4}


def _row(kept: bool, number: int, label: str, metric: float, evaluation: Evaluation | None = None) -> str:
    """One line of the search's table: ``*`` marks the candidate kept."""
    verdict = "" if evaluation is None else f" {'satisfied' if evaluation.satisfied else 'not satisfied'}"
    return f"    {'*' if kept else ' '} {number:>3}  {label:<28} {metric:<10.6g}{verdict}".rstrip()


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
