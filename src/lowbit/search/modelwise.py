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
  float model's by ``search_metric``, and the best is kept; where MSE differs from the best by
  less than the held-back samples can tell, MSE is kept (:func:`choose_candidate`). Candidates are compared
  before bias correction, which is then applied to the winner only. Horizon's
  ``per_channel`` and ``asymmetric`` lists multiply the candidates: each method is also
  tried per tensor / per channel and with symmetric / asymmetric activations (a
  :class:`Scheme`), and the winner's scheme is the job's. The other candidates of that scheme,
  best score first, stay at hand: an accuracy search with the user's evaluator tries them
  before it moves any node off int8 (:mod:`lowbit.passes.search_precisions`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..calibration.dead_zones import clamped, live_intervals, reaches_beyond, restrict
from ..calibration.histogram import HistogramObserver
from ..calibration.observers import RangeObserver
from ..calibration.ranges import RANGE_METHODS, Range, RangeSettings, kl, max_min
from ..quantizers.plan import QuantPlan
from .layerwise import Collect, score_candidates, widest_choice
from .metrics import METRICS, Metric, PairStats, pooled

DEFAULT_SEARCH = ("MAX_MIN", "REMOVAL_OUTLIER", "KL", "MSE")


@dataclass(frozen=True)
class Scheme:
    """Horizon's per_channel / asymmetric lists: which weight granularity and activation symmetry a
    candidate quantizes with (None: the plan's own)."""

    per_channel: bool | None = None
    asymmetric: bool | None = None

    @property
    def label(self) -> str:
        parts = [] if self.per_channel is None else ["per channel" if self.per_channel else "per tensor"]
        parts += [] if self.asymmetric is None else ["asymmetric" if self.asymmetric else "symmetric"]
        return ", ".join(parts)


@dataclass(frozen=True)
class Candidate:
    method: str
    settings: RangeSettings = field(default_factory=RangeSettings)
    scheme: Scheme = field(default_factory=Scheme)

    @property
    def label(self) -> str:
        if self.method in ("KL", "AUTO_TUNE"):
            label = f"{self.method} num_bin={self.settings.num_bin}"
        elif self.method == "REMOVAL_OUTLIER":
            label = f"{self.method} max_percentile={self.settings.max_percentile:g}"
        else:
            label = self.method
        return f"{label} ({self.scheme.label})" if self.scheme.label else label


def candidates(methods: Sequence[str] | None, num_bins: Sequence[int], percentiles: Sequence[float],
               per_channel: Sequence[bool] = (True,), asymmetric: Sequence[bool] | None = None) -> list[Candidate]:
    """The candidate list: each method once, times its own parameter lists (Horizon's lists), times
    the per_channel and asymmetric values when they are lists of both (named in the labels then)."""
    schemes = [Scheme(p if len(per_channel) > 1 else None, a if asymmetric and len(asymmetric) > 1 else None)
               for p in per_channel for a in (asymmetric or (None,))]
    schemes = list(dict.fromkeys(schemes))
    out = []
    for scheme in schemes:
        for method in methods or DEFAULT_SEARCH:
            if method in ("KL", "AUTO_TUNE"):
                out += [Candidate(method, RangeSettings(num_bin=n), scheme) for n in num_bins]
            elif method == "REMOVAL_OUTLIER":
                out += [Candidate(method, RangeSettings(max_percentile=p), scheme) for p in percentiles]
            else:
                out.append(Candidate(method, scheme=scheme))
    return out


TIE_STANDARD_ERRORS = 2.0  # a mean difference within this many standard errors is not told apart
MIN_SAMPLES_FOR_TIES = 16  # fewer held-back samples spread too little to judge by: the best score is kept
PREFERRED_IN_A_TIE = "MSE"  # the method kept when it is within noise of the best (see choose_candidate)


@dataclass(frozen=True)
class SearchRow:
    label: str
    score: float  # the metric over all held-back samples together
    seconds: float
    per_sample: tuple[float, ...] = ()  # the metric on each held-back sample alone


@dataclass
class SearchReport:
    """What the search tried and what it kept."""

    metric: str
    samples: int  # held-back samples the candidates were scored on (0: nothing to compare)
    chosen: str
    rows: list[SearchRow] = field(default_factory=list)
    best_mean: str = ""  # the candidate with the best score over all samples, when a tie kept another
    tuned_tensors: int = 0  # tensors whose range AUTO_TUNE / layer-wise changed
    layerwise_ranges: dict[str, Range] = field(default_factory=dict)  # the layer-wise candidate's per-op choices
    dead_zone_clipped: int = 0  # tensors seen beyond where their readers tell values apart, clipped there
    # the other candidates of the kept scheme, best score first: what an accuracy search tries next
    alternatives: dict[str, dict[str, Range]] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchOptions:
    metric: str = "cosine-similarity"
    layerwise: bool = False
    tune_num: int = 10
    layerwise_metric: str | None = None  # how the layer-wise search scores each op (default: metric)


def choose_ranges(
    model: ir.Model,
    plan_for: Callable[[Scheme], QuantPlan],
    observers: dict[str, RangeObserver],
    options: SearchOptions,
    candidate_list: list[Candidate],
    collect_tuning: Collect,
    score: Callable[[list[tuple[Scheme, dict[str, Range]]]], list[list[PairStats]]],
    held_back: int,
) -> tuple[dict[str, Range], Scheme, SearchReport]:
    """The activation ranges to quantize with, the scheme they go with, and how they were chosen.

    ``plan_for(scheme)`` is the plan with a candidate's weight granularity and activation
    symmetry; ``collect_tuning`` runs a scoring model over the tuning samples (AUTO_TUNE,
    layer-wise); ``score([(scheme, ranges), ...])`` compares each model quantized with a range per
    tensor with the float model on the ``held_back`` samples (model-wise; per candidate, the
    sums of each sample), all at once so that workers can score them side by side. The layer-wise mix is
    made among the candidates of the first scheme. Every candidate's ranges end where all of a tensor's
    readers output a constant (:mod:`lowbit.calibration.dead_zones`).
    """
    tuned = 0
    chosen: dict[str, Range] = {}
    options_by_label: dict[str, dict[str, Range]] = {}
    scheme_by_label: dict[str, Scheme] = {}
    intervals = live_intervals(model.graph, observers)  # where the readers stop telling values apart
    clipped = {name for name, interval in intervals.items() if reaches_beyond(observers[name], interval)}
    observers = {name: clamped(observer, intervals[name]) if name in intervals else observer
                 for name, observer in observers.items()}
    for candidate in candidate_list:
        plan = plan_for(candidate.scheme)
        if candidate.method == "AUTO_TUNE":
            ranges, changed = _auto_tune(model, plan, observers, candidate.settings, options.tune_num, collect_tuning)
            tuned += changed
        else:
            method = RANGE_METHODS[candidate.method]
            ranges = {name: _as_range(observer, method, plan.activation_scheme(name), candidate.settings)
                      for name, observer in observers.items()}
        options_by_label[candidate.label] = restrict(ranges, intervals)
        scheme_by_label[candidate.label] = candidate.scheme
    first_scheme = candidate_list[0].scheme
    mixable = {label: r for label, r in options_by_label.items() if scheme_by_label[label] == first_scheme}
    if options.layerwise and len(mixable) > 1:
        per_tensor = {name: _distinct([r[name] for r in mixable.values()]) for name in observers}
        per_tensor = {name: rs for name, rs in per_tensor.items() if len(rs) > 1}
        chosen = widest_choice(score_candidates(model, plan_for(first_scheme), per_tensor, collect_tuning,
                                                options.layerwise_metric or options.metric), per_tensor)
        first = next(iter(mixable.values()))
        options_by_label["layerwise"] = {**first, **chosen}
        scheme_by_label["layerwise"] = first_scheme
        tuned += len(chosen)
    if len(options_by_label) == 1:
        label, ranges = next(iter(options_by_label.items()))
        return ranges, scheme_by_label[label], SearchReport(options.metric, 0, label, tuned_tensors=tuned,
                                                            dead_zone_clipped=len(clipped))
    rows = _score_models(options_by_label, scheme_by_label, score, options.metric)
    metric = METRICS[options.metric]
    best_mean = rows[metric.best([row.score for row in rows])].label
    kept = rows[choose_candidate(rows, metric)].label
    alternatives = {row.label: options_by_label[row.label] for row in _best_first(rows, metric)
                    if row.label != kept and scheme_by_label[row.label] == scheme_by_label[kept]}
    report = SearchReport(options.metric, held_back, kept, rows, best_mean if kept != best_mean else "", tuned, chosen,
                          len(clipped), alternatives)
    return options_by_label[kept], scheme_by_label[kept], report


def choose_candidate(rows: Sequence[SearchRow], metric: Metric) -> int:
    """The index of the candidate to keep: the best score over all held-back samples, unless an MSE
    candidate is within noise of it, and then that one.

    32 held-back samples tell two candidates apart only when they differ by more than the
    spread of their per-sample differences allows: a candidate whose mean paired difference
    from the best is within TIE_STANDARD_ERRORS standard errors is as good as far as the
    samples show. Among such candidates the best score is a coin toss, and neither is the
    better median sample (measured: on EfficientNet-Lite0 and Lite1 both orders of
    REMOVAL_OUTLIER and MSE by score and by median came up in two runs of the same
    search). MSE is the prior that decides a tie: its ranges minimise each tensor's own
    rounding and clipping error. Measured on data the search had not seen, in the ties of the
    bench models (held-out 1 - cosine of the default job): better on EfficientNet-Lite0
    (0.00161 against REMOVAL_OUTLIER's 0.00198), Lite1 (0.00236 against 0.00344) and magika
    (0.0181 against 0.0242), as good on the digit CNN, worse on PP-OCRv4 rec (0.0456 against
    0.0424, 16 held-back samples). Rows without per-sample values, or with
    fewer than MIN_SAMPLES_FOR_TIES or non-finite ones, keep the best score.
    """
    best = metric.best([row.score for row in rows])
    values = [np.asarray(row.per_sample, dtype=np.float64) for row in rows]
    count = len(values[best])
    if count < MIN_SAMPLES_FOR_TIES or any(len(v) != count or not np.all(np.isfinite(v)) for v in values):
        return best
    sign = 1.0 if metric.higher_is_better else -1.0
    tied_preferred = []
    for index, v in enumerate(values):
        if rows[index].label.split()[0] != PREFERRED_IN_A_TIE:
            continue
        gain = sign * (v - values[best])  # > 0 where this candidate is better on a sample
        standard_error = gain.std(ddof=1) / np.sqrt(count)
        if -gain.mean() <= TIE_STANDARD_ERRORS * standard_error:
            tied_preferred.append(index)
    return max(tied_preferred, key=lambda index: sign * rows[index].score) if tied_preferred else best


def _best_first(rows: Sequence[SearchRow], metric: Metric) -> list[SearchRow]:
    """The rows by score, best first (NaN last; equal scores keep their order)."""
    def compare(a: SearchRow, b: SearchRow) -> int:
        return -1 if metric.better(a.score, b.score) else 1 if metric.better(b.score, a.score) else 0
    return sorted(rows, key=functools.cmp_to_key(compare))


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


def _score_models(options_by_label, scheme_by_label,
                  score: Callable[[list[tuple[Scheme, dict[str, Range]]]], list[list[PairStats]]],
                  metric: str) -> list[SearchRow]:
    """Each candidate's quantized model against the float model on the held-back samples."""
    start = time.perf_counter()
    labels = list(options_by_label)
    per_candidate = score([(scheme_by_label[label], options_by_label[label]) for label in labels])
    seconds = (time.perf_counter() - start) / len(labels)  # scored side by side: the mean per candidate
    value = METRICS[metric].value
    return [SearchRow(label, value(pooled(samples)), seconds, tuple(value(s) for s in samples))
            for label, samples in zip(labels, per_candidate)]


def _as_range(observer: RangeObserver, method, scheme, settings: RangeSettings) -> Range:
    if isinstance(observer, HistogramObserver):
        return method(observer, scheme, settings)
    if method is not max_min:
        raise TypeError(f"{type(observer).__name__} keeps no histogram for {method.__name__}")
    lo, hi = observer.range()
    return float(lo), float(hi)


def _distinct(ranges: list[Range]) -> list[Range]:
    return list(dict.fromkeys((float(lo), float(hi)) for lo, hi in ranges))
