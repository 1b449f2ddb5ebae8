"""Passes and the pipeline that runs them.

A pass is one step of a quantization mode (prepare the graph, plan, calibrate, rewrite,
round weights, correct biases, save ...), written as a class with a declared contract,
in the manner of ``onnx_ir.passes`` (requires / call / ensures) and of NNCF's algorithms
(which declare the statistics they need):

* ``requires`` / ``provides``: the fields of :class:`~lowbit.pipeline.state.QuantState`
  it reads and sets. The pipeline checks them before and after the pass;
* ``measures(state)``: on which model its statistics are measured, :data:`FLOAT` (the
  prepared float model) or :data:`CURRENT` (the model as the passes before it left it),
  or None when it reads no data; ``requests(state)`` declares the observers, and
  ``samples(state)`` which samples (the first N, a split for the search);
* ``changes_model``: whether it rewrites the graph; ``keeps_outputs``: the rewrite leaves
  what the model computes unchanged (equalization), so the float model's statistics are
  measured after it;
* ``run(state)``: the step itself, returning its report; ``describe(report)`` gives the
  summary lines.

The pipeline makes as few runs over the data as the dependencies allow: every pending
pass that measures the float model is served by one run, made at the latest just before
the first pass that changes what the model computes; a pass that measures the current model gets a run
of its own, right before it. Each run is recorded in the result (``result.data_passes``).

Adding a pass is writing one module under :mod:`lowbit.passes` and naming it in a
pipeline (:mod:`lowbit.pipeline.full`, ``weight``, ``dynamic``).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .engine import Request, SplitSettings
from .state import QuantState, Section

FLOAT = "float model"
CURRENT = "current model"


@dataclass(frozen=True)
class Samples:
    """Which calibration samples a pass's statistics read: the first ``limit`` (all when None),
    split as ``split`` says (only the pass that calibrates activations splits)."""

    limit: int | None = None
    split: SplitSettings | None = None


class Pass(ABC):
    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    changes_model: ClassVar[bool] = False
    keeps_outputs: ClassVar[bool] = False
    # the setting that asks for the pass, named when an iterator's samples cannot be read again for it
    setting: ClassVar[str] = ""

    def applies(self, state: QuantState) -> bool:
        """Whether the pass has work in this job (one that does not apply adds no section and needs nothing).

        Called once at the pass's turn; for a pass that measures the float model, also when the
        float run is made, so there it must read only the plan and the configuration, and change nothing.
        """
        return True

    def measures(self, state: QuantState) -> str | None:
        return None

    def requests(self, state: QuantState) -> list[Request]:
        return []

    def samples(self, state: QuantState) -> Samples:
        return Samples()

    def measured_model(self, state: QuantState) -> Any:
        """The model a CURRENT pass's statistics run on (the state's model, or a measuring copy of it)."""
        return state.model

    def served(self, state: QuantState, samples: int, split: Any) -> None:
        """Called once the run that filled this pass's observers is over (``split``: the samples set aside).

        The pipeline also sets ``started`` (when the pass's turn began, its run included) on every pass it runs.
        """
        self.samples_seen = samples

    @abstractmethod
    def run(self, state: QuantState) -> Any:
        """Do the step; return its report (or None)."""

    def describe(self, report: Any) -> list[str]:
        """The summary lines for the report ``run`` returned."""
        return []


class PipelineError(RuntimeError):
    """A pipeline whose passes are in an order that breaks a contract: lowbit's bug, not the user's."""


def run_pipeline(passes: Sequence[Pass], state: QuantState) -> None:
    """Run the passes in order, serving their statistics with as few runs over the data as possible."""
    float_served = False
    for index, current in enumerate(passes):
        try:
            applies = current.applies(state)
        except AttributeError:  # it read a field no pass set yet: name the missing requirement
            _check(current, current.requires, state, "requires")
            raise
        if not applies:
            continue
        _check(current, current.requires, state, "requires")
        start = current.started = time.perf_counter()
        changes_outputs = current.changes_model and not current.keeps_outputs
        if not float_served and (changes_outputs or current.measures(state) == FLOAT):
            _serve_float(passes[index:], state)
            float_served = True
        if current.measures(state) == CURRENT:
            if not _readable(current, state):
                continue
            _serve(state, [current], current.measured_model(state), "quantized model")
        report = current.run(state)
        state.sections.append(Section(current.name, time.perf_counter() - start, report, current.describe(report)))
        _check(current, current.provides, state, "provides")


def _serve_float(pending: Sequence[Pass], state: QuantState) -> None:
    """One run of the float model for every pending pass that measures it."""
    group = [p for p in pending if p.measures(state) == FLOAT and p.applies(state)]
    if group and _readable(group[0], state):
        _serve(state, group, state.model, "float model")


def _serve(state: QuantState, group: list[Pass], model, label: str) -> None:
    samples = group[0].samples(state)
    if any(p.samples(state) != Samples(limit=samples.limit) for p in group[1:]):  # only the first may split
        raise PipelineError(f"passes {', '.join(p.name for p in group)} read different samples of one model")
    requests = [request for p in group for request in p.requests(state)]
    count, split = state.engine.run(model, requests, what=" + ".join(p.name for p in group), model_label=label,
                                    limit=samples.limit, split=samples.split)
    for p in group:
        p.served(state, count, split)


def _readable(current: Pass, state: QuantState) -> bool:
    """Whether the data can be read (again) for the pass; an iterator read once cannot, and the pass is skipped."""
    if state.data.rereadable:
        return True
    what = current.setting or current.name
    state.note(f"{what} needs another pass over the calibration data, and an iterator can be read once; "
               f"pass a list or a folder ({what} was skipped)")
    return False


def _check(current: Pass, fields: tuple[str, ...], state: QuantState, which: str) -> None:
    missing = [name for name in fields if getattr(state, name) is None]
    if missing:
        raise PipelineError(f"pass {current.name} {which} {', '.join(missing)}, which no pass before it set")
