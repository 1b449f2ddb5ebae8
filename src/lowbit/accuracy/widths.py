"""WEIGHT_QUANT, mixed bit, with an evaluator: the largest ``init_scale`` whose model the evaluator accepts.

``init_scale`` is the error budget of the mixed-bit allocation
(:func:`lowbit.search.mixed_bits.allocate`): the larger, the more weights narrow to 4 bits
and the smaller the file. An allocation's model is built and evaluated; the search is a
bisection over log10(init_scale) in [-5, 0], as ``auto_tune``'s, with the user's verdict
in place of the output cosine. Many init_scales give the same allocation: one already
evaluated is not evaluated again (it costs no evaluation), and the bisection stops at a
resolution of 0.05 decades (12%). When no allocation passes, every weight at the widest
width is tried last; when even that fails, the goal cannot be met. The mixed-bit pass runs
it on widths up to 8 bits first (every allocation then at most the 8-bit file), and on all
widths (16 bits too) only when every weight at 8 bits fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .evaluator import Evaluation

LOW, HIGH = -5.0, 0.0  # log10(init_scale)
RESOLUTION = 0.05


@dataclass(frozen=True)
class WidthTry:
    init_scale: float
    average_bits: float
    evaluation: Evaluation
    repeated: bool  # the allocation of an earlier try: its verdict, no new evaluation


@dataclass
class WidthSearch:
    init_scale: float | None  # None: nothing passed
    bits: dict[str, int] | None
    tries: list[WidthTry] = field(default_factory=list)
    stopped: str = ""


def search_init_scale(allocate: Callable[[float], dict[str, int]], average_bits: Callable[[dict[str, int]], float],
                      evaluate: Callable[[dict[str, int], str], Evaluation], evaluations_left: Callable[[], int],
                      widest: dict[str, int], budget_name: str = "init_scale") -> WidthSearch:
    result = WidthSearch(None, None)
    seen: dict[tuple, Evaluation] = {}

    def attempt(init_scale: float, bits: dict[str, int], label: str) -> bool | None:
        key = tuple(sorted(bits.items()))
        repeated = key in seen
        if not repeated:
            if evaluations_left() <= 0:
                return None
            seen[key] = evaluate(bits, label)
        result.tries.append(WidthTry(init_scale, average_bits(bits), seen[key], repeated))
        if seen[key].satisfied:
            result.init_scale, result.bits = init_scale, bits
        return seen[key].satisfied

    low, high = LOW, HIGH
    result.stopped = "resolution reached"
    while high - low > RESOLUTION:
        middle = (low + high) / 2
        verdict = attempt(10**middle, allocate(10**middle), f"{budget_name}={10**middle:.4g}")
        if verdict is None:
            result.stopped = "max_evaluations reached"
            break
        low, high = (middle, high) if verdict else (low, middle)
    if result.bits is None:
        verdict = attempt(0.0, widest, "every weight at the widest width")
        if verdict is not None:
            result.stopped = ("no allocation passed; every weight at the widest width" if verdict
                              else "not met even with every weight at the widest width")
    return result
