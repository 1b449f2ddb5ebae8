"""The evaluator of the job: loaded before any work, and the final check of modes that do not search.

``LoadEvaluator`` (every mode, early): the user's class (``evaluator``, or an object given to
the API) or the built-in goal (``accuracy_target``), wrapped so that every call is checked
and counted; the float model is evaluated at once when the evaluation data is known, so a
broken evaluator fails before the calibration, not after it. Sets: the evaluator.

``CheckGoal`` (before saving, when no search ran: DYNAMIC_QUANT, WEIGHT_QUANT with a fixed
``bit_num``): the model as it will be written, evaluated; when the evaluator is not
satisfied, nothing is written and the error says by how much.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..accuracy.evaluator import Evaluation, GuardedEvaluator, load_evaluator
from ..accuracy.goals import EvalSamples, GoalEvaluator, parse_goal, read_eval_data
from ..data.feeds import batched
from ..errors import LowbitError
from ..graph.saving import save_atomically
from ..pipeline.passes import Pass
from ..pipeline.state import QuantState

GOAL_SAMPLES = 32  # calibration samples a built-in goal scores when nothing is held back for it


class LoadEvaluator(Pass):
    name = "load_evaluator"
    requires = ("model", "data")
    provides = ("evaluator",)

    def applies(self, state: QuantState) -> bool:
        return state.config.evaluator is not None or state.config.accuracy_target is not None

    def run(self, state: QuantState) -> None:
        config = state.config
        if state.user_evaluator is not None:  # lowbit.quantize(evaluator=object): the configuration names it
            evaluator, name = state.user_evaluator, type(state.user_evaluator).__name__
        elif config.evaluator is not None:
            evaluator, name = load_evaluator(config.evaluator), config.evaluator
        else:
            goal = parse_goal(config.accuracy_target, config.source("accuracy_target"))
            samples = None
            if config.eval_data is not None:
                samples = read_eval_data(config.eval_data, state.specs, goal.needs_labels)
            elif not holds_back_for_goal(state):
                samples = first_samples(state)
            evaluator, name = GoalEvaluator(goal, samples), f"accuracy_target={goal}"
        state.evaluator = GuardedEvaluator(evaluator, name, config.eval_batch_num, config.max_evaluations)
        if not isinstance(evaluator, GoalEvaluator) or evaluator.samples is not None:
            state.evaluator.evaluate_float(state.model_path)


def holds_back_for_goal(state: QuantState) -> bool:
    """Whether the built-in goal scores held-back samples: FULL_QUANT's calibration sets them aside."""
    config = state.config
    return (config.accuracy_target is not None and config.eval_data is None and config.quant_type == "FULL_QUANT"
            and config.calibration_table is None)


def evaluate_float_model(state: QuantState) -> None:
    """Evaluate the float model (once); a built-in goal waiting for held-back samples gets them first."""
    evaluator = state.evaluator.evaluator
    if isinstance(evaluator, GoalEvaluator) and evaluator.samples is None:
        if not state.held_back:
            raise LowbitError(f"accuracy_target={evaluator.goal} scores calibration samples held back from the "
                              "statistics (every 8th), and there were fewer than 8 samples; give eval_data or "
                              "more calibration samples")
        feeds = list(batched(state.held_back, state.specs, 8))
        evaluator.samples = EvalSamples(feeds, None, f"{len(state.held_back)} held-back calibration samples")
    state.evaluator.evaluate_float(state.model_path)


def first_samples(state: QuantState) -> EvalSamples:
    if not state.data.given:
        raise LowbitError(f"accuracy_target={state.config.accuracy_target} needs samples: give eval_data (an .npz) "
                          "or calibration data")
    stream, _ = state.data.open(None)
    samples = [feed for _, feed in zip(range(GOAL_SAMPLES), stream)]
    if not samples:
        raise LowbitError("accuracy_target: the calibration data holds no samples to score")
    return EvalSamples(list(batched(samples, state.specs, 8)), None, f"the first {len(samples)} calibration samples")


@contextmanager
def candidate_folder(state: QuantState) -> Iterator[Path]:
    """A temporary folder beside the output for the candidates the evaluator reads; removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=".lowbit-candidates-", dir=state.output_path.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def describe_evaluator(evaluator: GuardedEvaluator) -> str:
    inner = evaluator.evaluator
    where = f" on {inner.samples.origin}" if isinstance(inner, GoalEvaluator) and inner.samples is not None else ""
    return f"{evaluator.name}{where}"


@dataclass
class GoalCheck:
    evaluator: str
    original: float
    evaluation: Evaluation


class CheckGoal(Pass):
    name = "check_goal"
    requires = ("model", "evaluator")

    def applies(self, state: QuantState) -> bool:
        return state.evaluator is not None and state.accuracy is None

    def run(self, state: QuantState) -> GoalCheck:
        evaluate_float_model(state)
        with candidate_folder(state) as folder:
            path = folder / state.output_path.name
            save_atomically(state.model, path)
            evaluation = state.evaluator.evaluate(path, "the quantized model")
        check = GoalCheck(describe_evaluator(state.evaluator), state.evaluator.original, evaluation)
        if not evaluation.satisfied:
            raise LowbitError(f"the evaluator is not satisfied ({check.evaluator}): metric {evaluation.metric:.6g} "
                              f"against {check.original:.6g} for the float model; nothing was written. "
                              f"{_how_to_search(state)}")
        state.accuracy = check
        return check

    def describe(self, check: GoalCheck) -> list[str]:
        return [f"  evaluator: {check.evaluator}: float {check.original:.6g}, quantized "
                f"{check.evaluation.metric:.6g}: satisfied"]


def _how_to_search(state: QuantState) -> str:
    if state.config.quant_type == "WEIGHT_QUANT":
        return "bit_num=0 searches the widths per layer for your evaluator"
    return "FULL_QUANT searches precisions per node for your evaluator; DYNAMIC_QUANT has no search"
