"""The analysis report's figures, drawn with matplotlib and embedded in the page as PNG data URIs.

Each function takes plain numbers (what the JSON report holds) and returns a ``data:``
URI, so the HTML file needs nothing beside it and nothing from the network.
"""

from __future__ import annotations

import base64
import io
import itertools
import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display, whatever the user's environment says

import matplotlib.pyplot as plt

WIDE = (10, 3.2)
SMALL = (4.6, 2.6)


def _data_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=96)
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _finite(values: Sequence[float], cap: float) -> list[float]:
    """Values with infinities (exact agreement) drawn at ``cap``."""
    return [cap if math.isinf(v) and v > 0 else v for v in values]


def error_along_graph(computed_db: Sequence[float], rounded_db: Sequence[float | None], marked: Sequence[int]) -> str:
    """SQNR of each tensor in graph order: a line for the computed values, dots after rounding, marks at the
    suggested nodes."""
    figure, axes = plt.subplots(figsize=WIDE)
    finite = [v for v in list(computed_db) + [r for r in rounded_db if r is not None] if not math.isinf(v)]
    cap = (max(finite) + 5) if finite else 100.0
    x = range(len(computed_db))
    axes.plot(x, _finite(computed_db, cap), color="#3465a4", linewidth=1.4, label="as computed")
    rounded = [(i, v) for i, v in enumerate(_finite([r if r is not None else math.nan for r in rounded_db], cap))
               if not math.isnan(v)]
    if rounded:
        axes.scatter(*zip(*rounded), s=9, color="#cc0000", zorder=3, label="after its Q/DQ pair")
    for index in marked:
        axes.axvline(index, color="#f57900", linewidth=0.8, linestyle="--")
    axes.set_xlabel("tensor, in graph order")
    axes.set_ylabel("SQNR (dB, higher is better)")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize=8)
    return _data_uri(figure)


def node_gains(names: Sequence[str], gains: Sequence[float], alone: Sequence[float]) -> str:
    """Horizontal bars for the ranked nodes: the gain of leaving each float, and its error quantized alone."""
    figure, axes = plt.subplots(figsize=(10, 0.28 * len(names) + 1.0))
    y = range(len(names))[::-1]
    axes.barh([v + 0.2 for v in y], gains, height=0.4, color="#3465a4", label="gain if left float")
    axes.barh([v - 0.2 for v in y], alone, height=0.4, color="#f57900", label="error when quantized alone")
    axes.set_yticks(list(y), [_short(n) for n in names], fontsize=7)
    axes.set_xlabel("model-output error (1 - cosine)")
    axes.grid(axis="x", alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    return _data_uri(figure)


def suggestion_curve(quantized_error: float, errors: Sequence[float]) -> str:
    """The output error with none, then the first 1, 2 ... ranks left float."""
    figure, axes = plt.subplots(figsize=SMALL)
    axes.plot(range(len(errors) + 1), [quantized_error, *errors], marker="o", color="#3465a4")
    axes.set_xlabel("nodes left float")
    axes.set_ylabel("1 - cosine")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    return _data_uri(figure)


def histogram(title: str, edges: Sequence[float], counts: Sequence[float], low: float, high: float,
              clip_rate: float) -> str:
    """A tensor's float values (log counts) with the range its integers represent."""
    figure, axes = plt.subplots(figsize=SMALL)
    widths = [b - a for a, b in itertools.pairwise(edges)]
    axes.bar(edges[:-1], [max(c, 0.0) for c in counts], width=widths, align="edge", color="#729fcf")
    axes.set_yscale("log")
    for bound in (low, high):
        axes.axvline(bound, color="#cc0000", linewidth=1.2)
    axes.set_title(f"{_short(title)}\nclipped {clip_rate:.3%}", fontsize=8)
    axes.tick_params(labelsize=7)
    return _data_uri(figure)


def channel_ranges(title: str, low: Sequence[float], high: Sequence[float], range_low: Sequence[float],
                   range_high: Sequence[float]) -> str:
    """Per output channel: the float weights' min..max (bars) and the representable range (lines)."""
    figure, axes = plt.subplots(figsize=SMALL)
    x = range(len(low))
    axes.bar(x, [h - lo for lo, h in zip(low, high)], bottom=low, width=1.0, color="#8ae234", label="weights")
    axes.step(x, range_high, where="mid", color="#cc0000", linewidth=0.8, label="representable")
    axes.step(x, range_low, where="mid", color="#cc0000", linewidth=0.8)
    axes.set_xlabel("output channel", fontsize=7)
    axes.set_title(_short(title), fontsize=8)
    axes.tick_params(labelsize=7)
    axes.legend(fontsize=6, loc="upper right")
    return _data_uri(figure)


def _short(name: str, limit: int = 48) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]
