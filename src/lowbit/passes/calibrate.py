"""Observe every activation tensor of the plan on the float model: one streaming pass over the data.

Reads: the plan's activation tensors and the candidates. Needs: one observer per tensor
on the float model, a histogram when any candidate clips (KL, percentile, MSE, ACIQ,
AUTO_TUNE), else min/max. The samples are split as the searches need (every 8th held back
to compare candidates, or for accuracy_target to score; a few kept for per-op tuning).
Sets: the observers, the number of samples they saw, the held-back and tuning samples, and
the distinct values of the quantized graph inputs while they are few (8-bit pixels), which keep
those inputs off the rounding ties of their grid (:mod:`lowbit.quantizers.ties`).
"""

from __future__ import annotations

from ..calibration.histogram import HistogramObserver
from ..calibration.observers import MinMaxObserver, ValueCountsObserver
from ..data.split import SampleSplit
from ..pipeline.engine import Request, SplitSettings
from ..pipeline.passes import FLOAT, Pass, Samples
from ..pipeline.state import QuantState
from ..search.modelwise import candidates
from .candidates import too_few_to_search
from .evaluate import holds_back_for_goal
from .search_precisions import tensors_to_observe


def compares(state: QuantState) -> bool:
    """Whether the candidates are compared on held-back samples (the model-wise search)."""
    return len(state.candidates) > 1


class Calibrate(Pass):
    name = "calibrate"
    requires = ("plan", "candidates", "data")
    provides = ("observers",)

    def applies(self, state: QuantState) -> bool:
        return bool(state.plan.activations) and state.config.calibration_table is None

    def measures(self, state: QuantState) -> str:
        return FLOAT

    def requests(self, state: QuantState) -> list[Request]:
        histograms = any(c.method != "MAX_MIN" for c in state.candidates)
        names = [*state.plan.activations, *sorted(tensors_to_observe(state))]  # the accuracy search's rungs too
        self.observers = {name: HistogramObserver(state.config.max_num_bin) if histograms else MinMaxObserver()
                          for name in names}
        inputs = {value.name for value in state.model.graph.inputs}
        self.value_counts = {name: ValueCountsObserver() for name in state.plan.activations if name in inputs}
        return [Request(self.observers)] + ([Request(self.value_counts)] if self.value_counts else [])

    def samples(self, state: QuantState) -> Samples:
        config = state.config
        tune = any(c.method == "AUTO_TUNE" for c in state.candidates) or (config.layerwise_search and compares(state))
        hold_back = compares(state) or holds_back_for_goal(state)
        return Samples(split=SplitSettings(config.search_samples, hold_back=hold_back, keep_for_tuning=tune))

    def served(self, state: QuantState, samples: int, split: SampleSplit) -> None:
        state.calibration_samples, state.held_back, state.tuning = samples, split.held_back, split.tuning
        if compares(state) and not split.held_back:  # a stream of unknown length turned out short
            if state.config.activation_quant_method is not None:
                split.require_held_back()
            state.search_fallback = too_few_to_search(samples)
            state.candidates = candidates(("MAX_MIN",), state.config.num_bin, state.config.max_percentile)

    def run(self, state: QuantState) -> None:
        state.observers = self.observers
        state.input_values = {name: (observer.values, observer.counts) for name, observer in self.value_counts.items()
                              if observer.values is not None}
        if state.search_fallback:  # said once the data has proved readable, so that it never precedes an error
            state.note(state.search_fallback)
