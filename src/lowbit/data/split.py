"""Setting calibration samples aside for the search, while the rest streams into the statistics.

A search compares candidates on samples that the statistics did not see (a held-back
set), and the per-op tuning of AUTO_TUNE / layer-wise search runs on a few samples the
statistics did see. Both are small lists filled on the fly as the calibration stream
goes by; everything else passes through without being kept.

The rule depends only on the stream, never on knowing its length, so a list, a folder
and a generator of the same samples split the same way: every 8th sample (the 8th, 16th,
...) is held back until ``search_samples`` (default 32) are; with fewer than 8 samples
none is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from ..errors import LowbitError

HOLD_BACK_EVERY = 8
MAX_SET_ASIDE = 32


def held_back_positions(total: int, count: int) -> list[int]:
    """The positions the split holds back from a stream of ``total`` samples: every 8th, the first ``count``."""
    return list(range(HOLD_BACK_EVERY - 1, total, HOLD_BACK_EVERY))[:count]


def held_back_count(total: int, count: int | None) -> int:
    """How many of ``total`` samples the split holds back (``count``: search_samples, or None)."""
    return min(count if count is not None else MAX_SET_ASIDE, total // HOLD_BACK_EVERY)


class SampleSplit:
    """Iterate over the samples for the statistics; ``held_back`` and ``tuning`` fill up meanwhile."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]], total: int | None, count: int | None,
                 hold_back: bool, keep_for_tuning: bool):
        self.feeds = feeds
        self.count = count if count is not None else MAX_SET_ASIDE
        self.hold_back = self.count if hold_back else 0
        self.keep = self.count if keep_for_tuning else 0
        held = held_back_count(total, self.count) if total is not None and hold_back else 0
        self.statistics_total = None if total is None else total - held
        self.held_back: list[dict[str, np.ndarray]] = []
        self.tuning: list[dict[str, np.ndarray]] = []
        if total is not None and total < HOLD_BACK_EVERY:
            self.require_held_back()  # known to be short: say so before reading anything

    @classmethod
    def from_positions(cls, held_back: list[dict[str, np.ndarray]], tuning: list[dict[str, np.ndarray]],
                       count: int, hold_back: bool, statistics: int) -> SampleSplit:
        """The split of a stream that was not streamed here (the workers read the statistics samples)."""
        split = cls([], None, count, hold_back, bool(tuning))
        split.held_back, split.tuning, split.statistics_total = held_back, tuning, statistics
        return split

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for index, feed in enumerate(self.feeds):
            if len(self.held_back) < self.hold_back and index % HOLD_BACK_EVERY == HOLD_BACK_EVERY - 1:
                self.held_back.append(feed)
                continue
            if len(self.tuning) < self.keep:
                self.tuning.append(feed)
            yield feed

    def require_held_back(self) -> None:
        """Raise when a search needed held-back samples and the stream was too short to give any."""
        if self.hold_back and not self.held_back:
            raise LowbitError(f"the activation search compares candidates on held-back calibration samples "
                              f"(every {HOLD_BACK_EVERY}th), and there were fewer than {HOLD_BACK_EVERY} samples; "
                              "give more samples or set one activation_quant_method")
