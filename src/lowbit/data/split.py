"""Setting calibration samples aside for the search, while the rest streams into the statistics.

A search compares candidates on samples that the statistics did not see (a held-back
set), and the per-op tuning of AUTO_TUNE / layer-wise search runs on a few samples the
statistics did see. Both are small lists filled on the fly as the calibration stream
goes by; everything else passes through without being kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from ..errors import LowbitError

MAX_SET_ASIDE = 32


def default_count(total: int | None) -> int:
    """1 sample in 8, between 1 and 32 (8 when the number of samples is unknown)."""
    return 8 if total is None else max(1, min(MAX_SET_ASIDE, total // 8))


class SampleSplit:
    """Iterate over the samples for the statistics; ``held_back`` and ``tuning`` fill up meanwhile.

    Held-back samples are spread evenly over the stream (every ``total // count``-th)
    when its length is known, else they are every other one until there are enough.
    """

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]], total: int | None, count: int | None,
                 hold_back: bool, keep_for_tuning: bool):
        self.feeds = feeds
        self.count = count if count is not None else default_count(total)
        self.hold_back = self.count if hold_back else 0
        self.keep = self.count if keep_for_tuning else 0
        if total is not None and self.hold_back and total - self.hold_back < 1:
            raise LowbitError(f"the activation search holds back {self.hold_back} of the {total} calibration "
                              "samples to compare candidates, which leaves none for the statistics; give more "
                              "samples, lower search_samples, or set one activation_quant_method")
        self.stride = max(1, total // self.hold_back) if total is not None and self.hold_back else 2
        self.statistics_total = None if total is None else total - self.hold_back
        self.held_back: list[dict[str, np.ndarray]] = []
        self.tuning: list[dict[str, np.ndarray]] = []

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for index, feed in enumerate(self.feeds):
            if len(self.held_back) < self.hold_back and index % self.stride == self.stride - 1:
                self.held_back.append(feed)
                continue
            if len(self.tuning) < self.keep:
                self.tuning.append(feed)
            yield feed
        if self.hold_back and not self.held_back:
            raise LowbitError("the activation search needs calibration samples held back to compare "
                              "candidates, and there were too few; give more samples or set one "
                              "activation_quant_method")
