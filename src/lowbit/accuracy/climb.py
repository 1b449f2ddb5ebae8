"""Which nodes leave their planned precision (int8; int4 weights with weight_bit_num=4), and for which
precision: the least that satisfies the evaluator.

The nodes come ranked, most sensitive first (by the cheap proxy of :mod:`lowbit.analysis`:
how much leaving each one float lowers the output error). A candidate is the first ``k``
of the ranking one rung up the precision ladder, the rest where they were; the evaluator
(the user's metric, the expensive part) says yes or no. With ``N`` ranked nodes:

1. every node one rung up: if the evaluator still says no, that rung becomes the floor of
   every node and the next rung is tried (when the top rung fails too, the goal cannot be
   met);
2. bisection on ``k`` between 0 (the floor, known to fail) and ``N`` (known to pass): about
   log2(N) evaluations for the smallest passing prefix, if the metric grows with ``k``;
3. moving back down: the prefix may hold nodes the goal does not need (the proxy ranks by
   output error, the evaluator judges its own metric). Groups of them, least sensitive
   first, are tried back at the floor; a group that breaks the goal is split in halves,
   and each half tried again (adaptive group testing), while evaluations are left.

A rung that changes only some nodes (int8 after int4: the nodes with int4 weights) ranks
only those; the others climb on the rungs after it.

Every evaluation counts against ``max_evaluations``; when it runs out, the best passing
candidate so far is kept (none: nothing is written).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .evaluator import Evaluation

Assignment = dict[str, str]  # node name -> precision; a node not named stays as planned


@dataclass(frozen=True)
class Trial:
    label: str  # what was tried, e.g. "first 12 float32"
    assignment: Assignment
    evaluation: Evaluation


@dataclass
class Climb:
    kept: Assignment | None  # None: no candidate satisfied the evaluator
    trials: list[Trial]
    stopped: str  # why the search ended


Evaluate = Callable[[Assignment, str], Evaluation]


def climb(ranking: Sequence[str], ladder: Sequence[str], evaluate: Evaluate, evaluations_left: Callable[[], int],
          moves: Callable[[str, str], bool] = lambda node, rung: True) -> Climb:
    """Search as the module docstring says; the planned candidate (every node on ``ladder[0]``) has been evaluated
    (and failed) before. ``moves(node, rung)``: whether the rung changes the node (int8 changes only the nodes
    whose weights the plan made int4); the others keep their place on that rung."""
    trials: list[Trial] = []

    def attempt(assignment: Assignment, label: str) -> bool | None:
        """The evaluator's verdict, or None when no evaluation is left."""
        if evaluations_left() <= 0:
            return None
        evaluation = evaluate(assignment, label)
        trials.append(Trial(label, dict(assignment), evaluation))
        return evaluation.satisfied

    floor: Assignment = {}
    for rung in ladder[1:]:
        moving = [name for name in ranking if moves(name, rung)]
        if not moving:
            continue

        def prefix(k: int, rung: str = rung, floor: Assignment = floor, moving: list[str] = moving) -> Assignment:
            return {**floor, **{name: rung for name in moving[:k]}}

        verdict = attempt(prefix(len(moving)), f"every node {rung}")
        if verdict is None:
            return Climb(None, trials, "max_evaluations reached before any candidate met the goal")
        if not verdict:
            floor = prefix(len(moving))
            continue
        low, high = 0, len(moving)
        while high - low > 1:
            middle = (low + high) // 2
            verdict = attempt(prefix(middle), f"first {middle} {rung}")
            if verdict is None:
                break
            low, high = (low, middle) if verdict else (middle, high)
        kept, stopped = _move_back(prefix(high), moving[:high], floor, attempt)
        return Climb(kept, trials, stopped)
    return Climb(None, trials, f"not met even with every node {ladder[-1]}")


def _move_back(kept: Assignment, moved: list[str], floor: Assignment,
               attempt: Callable[[Assignment, str], bool | None]) -> tuple[Assignment, str]:
    """Try the moved nodes back at their floor, in groups, least sensitive first (see the module docstring)."""
    if len(moved) < 2:  # one node: without it is the floor, known to fail
        return kept, "smallest passing set found"
    least_first = moved[::-1]
    half = len(least_first) // 2
    groups = deque([least_first[:half], least_first[half:]])
    while groups:
        group = groups.popleft()
        trial = dict(kept)
        for name in group:
            if name in floor:
                trial[name] = floor[name]
            else:
                trial.pop(name, None)
        label = f"{group[0]} back" if len(group) == 1 else f"{len(group)} nodes back"
        verdict = attempt(trial, label)
        if verdict is None:
            return kept, "max_evaluations reached while moving nodes back down"
        if verdict:
            kept = trial
        elif len(group) > 1:
            half = len(group) // 2
            groups.extendleft([group[half:], group[:half]])  # the less sensitive half first
    return kept, "every moved node checked"
