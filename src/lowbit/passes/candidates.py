"""Which activation-range candidates calibration serves: one method, a list to search, or the default search.

Reads: the configuration and the number of calibration samples when it is known. Sets:
the candidate list (:func:`lowbit.search.modelwise.candidates`). The default search
holds back every 8th sample to compare methods; with fewer than 8 samples it falls back
to MAX_MIN, and says so once the data has been read.
"""

from __future__ import annotations

from ..data.split import HOLD_BACK_EVERY
from ..pipeline.passes import Pass
from ..pipeline.state import QuantState
from ..search.modelwise import candidates


def too_few_to_search(total: int) -> str:
    return (f"with {total} calibration samples lowbit does not search activation_quant_method (it holds "
            f"back every {HOLD_BACK_EVERY}th sample to compare methods, so it needs {HOLD_BACK_EVERY}): "
            "using MAX_MIN")


class ActivationCandidates(Pass):
    name = "candidates"
    requires = ("plan", "data")
    provides = ("candidates",)

    def applies(self, state: QuantState) -> bool:
        return bool(state.plan.activations) and state.config.calibration_table is None

    def run(self, state: QuantState) -> None:
        config = state.config
        methods, total = config.activation_quant_method, state.data.count()
        if methods is None and total is not None and total < HOLD_BACK_EVERY:
            state.search_fallback = too_few_to_search(total)
            methods = ("MAX_MIN",)
        state.candidates = candidates(methods, config.num_bin, config.max_percentile, config.per_channel,
                                      config.asymmetric)
        if config.layerwise_search and len(state.candidates) < 2:
            state.note("layerwise_search chooses among several activation_quant_method candidates; with one there "
                       "is nothing to choose")
