"""The data engine: every run of a model over calibration samples goes through here.

A pass never loops over the data itself. It declares what it needs as :class:`Request`
objects (observers keyed by tensor name, and which samples they see), and the engine
runs the model once in ONNX Runtime, with every requested tensor exposed as an output,
feeding each batch to the observers that asked for it. Requests of several passes on the
same model share one run (the pipeline groups them, see :mod:`lowbit.pipeline.passes`),
and every run is recorded in :attr:`DataEngine.passes`, which the result reports.

Memory stays at one batch of activations plus the observers' running aggregates,
whatever the number of samples (ONNX Runtime's own calibrators keep every batch).

What it checks: after each batch, every observer says whether the tensor it saw was
finite; the first NaN or infinity stops the job with one line naming the tensor, the
node that computed it, and the sample, before anything is written.

Samples come in two parts when a search is on (:class:`~lowbit.data.split.SampleSplit`):
the *statistics* samples, batched, and the *held-back* ones, set aside as the stream goes
by and run after it, one by one, for the observers that asked for them (the float
model's outputs that the search compares candidates with). Both parts run in the same
session, so the float model is still read once per sample.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from tqdm import tqdm

from ..calibration.observers import Observer
from ..data.calibration import CalibrationData
from ..data.feeds import InputSpec, batched, batches_freely
from ..data.split import MAX_SET_ASIDE, SampleSplit, held_back_positions
from ..distributed.workers import Shard, Workers
from ..errors import LowbitError
from ..graph.runtime import make_session
from ..search.metrics import PairStats

STATISTICS = "statistics"  # the samples that feed the statistics (all of them when nothing is held back)
HELD_BACK = "held back"  # samples set aside by the split, for comparing candidates

Feed = dict[str, np.ndarray]


@dataclass
class Request:
    """What a pass needs from one run: an observer per tensor name, fed the samples of one part."""

    observers: Mapping[str, Observer]
    samples: str = STATISTICS


@dataclass(frozen=True)
class DataPass:
    """One run of one model over samples, as the result reports it."""

    what: str  # the passes it served, e.g. "calibrate + choose_ranges"
    model: str  # "float model", "quantized model" ...
    samples: int
    seconds: float
    over_calibration_data: bool  # False: a few samples kept from an earlier run (per-op scoring)


@dataclass(frozen=True)
class SplitSettings:
    """How the calibration stream is split (see :class:`~lowbit.data.split.SampleSplit`)."""

    search_samples: int | None
    hold_back: bool
    keep_for_tuning: bool


class DataEngine:
    """Runs models over the calibration data (or a small list of kept samples) for the passes."""

    def __init__(self, data: CalibrationData, specs: list[InputSpec], batch_size: int, progress: bool,
                 workers: Workers | None = None):
        self.data = data
        self.specs = specs
        self.batch_size = batch_size
        self.progress = progress
        self.workers = workers  # Ray workers (lowbit.distributed); None: everything runs in this process
        self.passes: list[DataPass] = []

    def run(self, model: ir.Model | onnx.ModelProto, requests: Sequence[Request], *, what: str, model_label: str,
            limit: int | None = None, split: SplitSettings | None = None,
            feeds: Sequence[Feed] | None = None) -> tuple[int, SampleSplit | None]:
        """Run ``model`` once over the samples and feed every request's observers.

        The samples are the calibration data (its first ``limit``, split as ``split`` says),
        or the given ``feeds``. Returns the statistics samples run and the split used.
        """
        start = time.perf_counter()
        if self.workers is not None and feeds is None and self.data.on_files:
            return self._run_on_workers(model, requests, what, model_label, limit, split, start)
        if self.workers is not None and feeds is not None and len(feeds) > 1:
            return self._run_feeds_on_workers(model, requests, what, model_label, feeds, start)
        names = dict.fromkeys(name for request in requests for name in request.observers)
        graph_inputs = _graph_inputs(model)
        fetched = [name for name in names if name not in graph_inputs]  # inputs come from the feed itself
        runner = _Runner(make_session(model, fetched), fetched, model, requests, what)
        sample_split = None
        if feeds is not None:
            stream, total = iter(feeds), len(feeds)
        else:
            stream, total = self.data.open(limit)
            if split is not None:
                sample_split = SampleSplit(stream, total, split.search_samples, split.hold_back,
                                           split.keep_for_tuning)
                stream, total = sample_split, sample_split.statistics_total
        with tqdm(total=total, desc=what, unit="sample", disable=None if self.progress else True) as bar:
            for batch in (batched(stream, self.specs, self.batch_size) if feeds is None else stream):
                bar.update(runner.feed(batch, STATISTICS))
        statistics = runner.samples
        for feed in sample_split.held_back if sample_split is not None else []:
            runner.feed(feed, HELD_BACK)
        if runner.samples == 0:
            raise LowbitError("the calibration data holds no samples")
        self.passes.append(DataPass(what, model_label, runner.samples, time.perf_counter() - start,
                                    feeds is None))
        return statistics, sample_split

    def _run_on_workers(self, model, requests: Sequence[Request], what: str, model_label: str, limit: int | None,
                        split: SplitSettings | None, start: float) -> tuple[int, SampleSplit | None]:
        """:meth:`run` with the statistics samples in shards on the workers (see :mod:`lowbit.distributed`).

        The split is the one :class:`~lowbit.data.split.SampleSplit` makes, by position: the
        driver reads the held-back and tuning samples; the rest go to the workers as file lists.
        """
        files = self.data.files(limit)
        held, keep, count = [], 0, MAX_SET_ASIDE
        if split is not None:
            count = split.search_samples if split.search_samples is not None else MAX_SET_ASIDE
            if split.hold_back:
                held = held_back_positions(len(files), count)
            keep = count if split.keep_for_tuning else 0
        held_set = set(held)
        statistics = [i for i in range(len(files)) if i not in held_set]
        if not statistics:
            raise LowbitError("the calibration data holds no samples")

        def read(positions: list[int]) -> list[Feed]:
            """The samples at ``positions``, read here (checked as every file is)."""
            return list(replace(files, rows=[files.rows[i] for i in positions]))

        self._observe_on_workers(model, requests, self._shards(files, statistics, what), len(statistics), what)
        sample_split = None
        if split is not None:
            sample_split = SampleSplit.from_positions(read(held), read(statistics[:keep]), count, split.hold_back,
                                                      len(statistics))
        local = [r for r in requests if r.samples != STATISTICS]  # the float outputs on the held-back samples
        if local and sample_split is not None and sample_split.held_back:
            names = [n for n in dict.fromkeys(n for r in local for n in r.observers) if n not in _graph_inputs(model)]
            runner = _Runner(make_session(model, names), names, model, local, what)
            for feed in sample_split.held_back:
                runner.feed(feed, HELD_BACK)
        self.passes.append(DataPass(what, model_label, len(statistics) + len(held), time.perf_counter() - start, True))
        return len(statistics), sample_split

    def _run_feeds_on_workers(self, model, requests: Sequence[Request], what: str, model_label: str,
                              feeds: Sequence[Feed], start: float) -> tuple[int, None]:
        """:meth:`run` over a few samples kept in memory (a search's), a share of them per worker."""
        share = -(-len(feeds) // self.workers.count)
        shards = [Shard(list(feeds[begin:begin + share]), self.specs, begin, begin, 0, what)
                  for begin in range(0, len(feeds), share)]
        samples = self._observe_on_workers(model, requests, shards, len(feeds), what)
        self.passes.append(DataPass(what, model_label, samples, time.perf_counter() - start, False))
        return samples, None

    def _observe_on_workers(self, model, requests: Sequence[Request], shards: list[Shard], total: int,
                            what: str) -> int:
        """Run the statistics requests' observers over ``shards`` on the workers; merge them in shard order."""
        proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
        observers = [dict(r.observers) for r in requests if r.samples == STATISTICS]
        fetched = [name for name in dict.fromkeys(name for group in observers for name in group)
                   if name not in _graph_inputs(model)]
        with tqdm(total=total, desc=what, unit="sample", disable=None if self.progress else True) as bar:
            results = self.workers.observe(proto, fetched, observers, shards, bar.update)
        for states, warnings in results:
            for message in warnings:
                self.data.warn(message)
            for group, group_states in zip(observers, states):
                for name, state in group_states.items():
                    group[name].merge(type(group[name]).from_state(state))
        return total

    def _shards(self, files, positions: list[int], what: str) -> list[Shard]:
        """Contiguous runs of ``positions``, one per worker, cut at multiples of the batch size."""
        rows = self.batch_size if batches_freely(self.specs) else 1
        per_shard = -(-len(positions) // max(1, self.workers.count))
        per_shard = -(-per_shard // rows) * rows
        return [Shard(replace(files, rows=[files.rows[i] for i in positions[begin:begin + per_shard]]), self.specs,
                      begin, begin // rows, self.batch_size, what)
                for begin in range(0, len(positions), per_shard)]

    def score(self, model, feeds: Sequence[Feed], names: Sequence[str], references: Sequence[Sequence[np.ndarray]],
              overrides: Mapping[str, np.ndarray] | None = None) -> PairStats:
        """Sums comparing the model's outputs ``names`` with ``references``, feed by feed.

        ``model`` is a model or a ready ONNX Runtime session (the mixed-bit probe's, whose
        weights are inputs); ``overrides`` are extra inputs given with every feed.
        """
        session = model if isinstance(model, ort.InferenceSession) else make_session(model)
        stats = PairStats()
        extra = dict(overrides or {})
        for feed, expected in zip(feeds, references):
            for actual, wanted in zip(session.run(list(names), {**feed, **extra}), expected):
                stats.update(actual, wanted)
        return stats


    def score_all(self, models: Sequence[onnx.ModelProto], feeds: Sequence[Feed], names: Sequence[str],
                  references: Sequence[Sequence[np.ndarray]]) -> list[list[PairStats]]:
        """:meth:`score` for several models, feed by feed (each model's sums of each feed, so that a search can
        tell a real difference from noise): one Ray task each with workers, else one after another."""
        if self.workers is not None and len(models) > 1:
            return self.workers.score(models, feeds, names, references)
        return [[self.score(session, [feed], names, [expected]) for feed, expected in zip(feeds, references)]
                for session in map(make_session, models)]


class _Runner:
    """One session, the observers that read it, and the count of samples run so far."""

    def __init__(self, session, fetched: list[str], model, requests: Sequence[Request], what: str):
        self.session, self.fetched, self.model, self.requests, self.what = session, fetched, model, requests, what
        self.samples = 0

    def feed(self, batch: Feed, part: str) -> int:
        try:
            arrays = dict(zip(self.fetched, self.session.run(self.fetched, batch))) if self.fetched else {}
        except Exception as exc:  # ORT raises its own exception types for bad feeds
            raise LowbitError(f"{self.what}: the batch from sample {self.samples + 1} failed in ONNX Runtime: "
                              f"{str(exc).splitlines()[0]}") from None
        rows = next(iter(batch.values())).shape[0] if batch else 1
        for request in self.requests:
            if request.samples != part:
                continue
            for name, observer in request.observers.items():
                observer.update(arrays[name] if name in arrays else batch[name])
                if not observer.finite():
                    raise LowbitError(self._not_finite(name, rows))
        self.samples += rows
        return rows

    def _not_finite(self, name: str, rows: int) -> str:
        first = self.samples + 1
        where = f"sample {first}" if rows == 1 else f"samples {first} to {first + rows - 1}"
        return (f"tensor '{name}' ({_producer(self.model, name)}) is NaN or infinite on calibration {where} "
                f"({self.what}); check the data and the model's weights")


def _graph_inputs(model: ir.Model | onnx.ModelProto) -> set[str]:
    if isinstance(model, onnx.ModelProto):
        return {v.name for v in model.graph.input}
    return {v.name for v in model.graph.inputs}


def _producer(model: ir.Model | onnx.ModelProto, name: str) -> str:
    """'output of node N (Op)' or 'a model input' for an error message."""
    nodes: Iterable = model.graph.node if isinstance(model, onnx.ModelProto) else model.graph
    for node in nodes:
        outputs = node.output if isinstance(node, onnx.NodeProto) else [v.name for v in node.outputs if v is not None]
        if name in outputs:
            return f"output of node '{node.name}', {node.op_type}"
    return "a model input"
