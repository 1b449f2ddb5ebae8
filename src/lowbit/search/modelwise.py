"""Choosing activation ranges: the configured candidates, AUTO_TUNE, layer-wise and model-wise search.

A *candidate* is a range method with its parameters (``KL num_bin=1024``,
``REMOVAL_OUTLIER max_percentile=0.9999`` ...). Every candidate reads the same statistics
(one histogram per tensor, collected in one pass), so trying several costs no extra pass
over the calibration data:

* AUTO_TUNE (tpu-mlir): start from KL, then per tensor try ``tune_num`` ranges from the
  KL range to the seen range and keep, per reading op, the one with the least squared
  (Euclidean) distance to the float output; the widest choice wins for a shared tensor.
* layer-wise search: the same per-op scoring, among the candidates' ranges, by ``search_metric``;
  its per-tensor mix becomes one more candidate.
* model-wise search (several candidates): each candidate's quantized model runs on
  calibration samples held back from the statistics, its outputs are compared with the
  float model's by ``search_metric``, and the best is kept. Candidates are compared
  before bias correction, which is then applied to the winner only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..calibration.histogram import HistogramObserver
from ..calibration.observers import RangeObserver
from ..calibration.ranges import RANGE_METHODS, Range, RangeSettings, kl, max_min
from ..quantizers.plan import QuantPlan
from .layerwise import Collect, score_candidates, widest_choice
from .metrics import METRICS, PairStats

DEFAULT_SEARCH = ("MAX_MIN", "REMOVAL_OUTLIER", "KL", "MSE")


@dataclass(frozen=True)
class Candidate:
    method: str
    settings: RangeSettings = field(default_factory=RangeSettings)

    @property
    def label(self) -> str:
        if self.method in ("KL", "AUTO_TUNE"):
            return f"{self.method} num_bin={self.settings.num_bin}"
        if self.method == "REMOVAL_OUTLIER":
            return f"{self.method} max_percentile={self.settings.max_percentile:g}"
        return self.method


def candidates(methods: Sequence[str] | None, num_bins: Sequence[int], percentiles: Sequence[float]) -> list[Candidate]:
    """The candidate list: each method once, times its own parameter lists (Horizon's lists)."""
    out = []
    for method in methods or DEFAULT_SEARCH:
        if method in ("KL", "AUTO_TUNE"):
            out += [Candidate(method, RangeSettings(num_bin=n)) for n in num_bins]
        elif method == "REMOVAL_OUTLIER":
            out += [Candidate(method, RangeSettings(max_percentile=p)) for p in percentiles]
        else:
            out.append(Candidate(method))
    return out


@dataclass(frozen=True)
class SearchRow:
    label: str
    score: float
    seconds: float


@dataclass
class SearchReport:
    """What the search tried and what it kept."""

    metric: str
    samples: int  # held-back samples the candidates were scored on (0: nothing to compare)
    chosen: str
    rows: list[SearchRow] = field(default_factory=list)
    tuned_tensors: int = 0  # tensors whose range AUTO_TUNE / layer-wise changed
    layerwise_ranges: dict[str, Range] = field(default_factory=dict)  # the layer-wise candidate's per-op choices


@dataclass(frozen=True)
class SearchOptions:
    metric: str = "cosine-similarity"
    layerwise: bool = False
    tune_num: int = 10
    layerwise_metric: str | None = None  # how the layer-wise search scores each op (default: metric)


def choose_ranges(
    model: ir.Model,
    plan: QuantPlan,
    observers: dict[str, RangeObserver],
    options: SearchOptions,
    candidate_list: list[Candidate],
    collect_tuning: Collect,
    score: Callable[[dict[str, Range]], PairStats],
    held_back: int,
) -> tuple[dict[str, Range], SearchReport]:
    """The activation ranges to quantize with, and the report of how they were chosen.

    ``collect_tuning`` runs a scoring model over the tuning samples (AUTO_TUNE, layer-wise);
    ``score`` compares the model quantized with a range per tensor with the float model on
    the ``held_back`` samples (model-wise).
    """
    tuned = 0
    chosen: dict[str, Range] = {}
    options_by_label: dict[str, dict[str, Range]] = {}
    for candidate in candidate_list:
        if candidate.method == "AUTO_TUNE":
            ranges, changed = _auto_tune(model, plan, observers, candidate.settings, options.tune_num, collect_tuning)
            tuned += changed
        else:
            method = RANGE_METHODS[candidate.method]
            ranges = {name: _as_range(observer, method, plan.activation_scheme(name), candidate.settings)
                      for name, observer in observers.items()}
        options_by_label[candidate.label] = ranges
    if options.layerwise and len(options_by_label) > 1:
        per_tensor = {name: _distinct([r[name] for r in options_by_label.values()]) for name in observers}
        per_tensor = {name: rs for name, rs in per_tensor.items() if len(rs) > 1}
        chosen = widest_choice(score_candidates(model, plan, per_tensor, collect_tuning,
                                                   options.layerwise_metric or options.metric), per_tensor)
        first = next(iter(options_by_label.values()))
        options_by_label["layerwise"] = {**first, **chosen}
        tuned += len(chosen)
    if len(options_by_label) == 1:
        label, ranges = next(iter(options_by_label.items()))
        return ranges, SearchReport(options.metric, 0, label, tuned_tensors=tuned)
    rows = _score_models(options_by_label, score, options.metric)
    best = METRICS[options.metric].best([row.score for row in rows])
    report = SearchReport(options.metric, held_back, rows[best].label, rows, tuned, chosen)
    return options_by_label[rows[best].label], report


def _auto_tune(model, plan, observers, settings: RangeSettings, tune_num: int,
               collect: Collect) -> tuple[dict[str, Range], int]:
    """KL ranges, each moved towards the seen range where that brings its readers closer to float."""
    ranges = {name: _as_range(obs, kl, plan.activation_scheme(name), settings) for name, obs in observers.items()}
    steps = np.linspace(0.0, 1.0, tune_num) if tune_num > 1 else np.zeros(1)
    per_tensor = {}
    for name, observer in observers.items():
        seen_lo, seen_hi = (float(v) for v in observer.range())
        lo, hi = ranges[name]
        options = _distinct([(lo + t * (seen_lo - lo), hi + t * (seen_hi - hi)) for t in steps])
        if len(options) > 1:
            per_tensor[name] = options
    if not per_tensor:
        return ranges, 0
    chosen = widest_choice(score_candidates(model, plan, per_tensor, collect, "mse"), per_tensor)
    changed = sum(1 for name, r in chosen.items() if r != ranges[name])
    ranges.update(chosen)
    return ranges, changed


def _score_models(options_by_label, score: Callable[[dict[str, Range]], PairStats], metric: str) -> list[SearchRow]:
    """Each candidate's quantized model against the float model on the held-back samples."""
    rows = []
    for label, ranges in options_by_label.items():
        start = time.perf_counter()
        rows.append(SearchRow(label, METRICS[metric].value(score(ranges)), time.perf_counter() - start))
    return rows


def _as_range(observer: RangeObserver, method, scheme, settings: RangeSettings) -> Range:
    if isinstance(observer, HistogramObserver):
        return method(observer, scheme, settings)
    if method is not max_min:
        raise TypeError(f"{type(observer).__name__} keeps no histogram for {method.__name__}")
    lo, hi = observer.range()
    return float(lo), float(hi)


def _distinct(ranges: list[Range]) -> list[Range]:
    return list(dict.fromkeys((float(lo), float(hi)) for lo, hi in ranges))
