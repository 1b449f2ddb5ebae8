"""Ray workers: statistics over shards of the calibration files, candidates scored at once, nodes ranked in shares.

``workers=N`` starts a local Ray with N CPUs (``ray_address`` joins a running cluster
instead); lowbit never schedules work itself, it hands Ray one task per shard or per
candidate and merges what comes back.

What travels, per run over the data:

* out: the model once (``ray.put``), and per shard the list of its sample files and the
  observers, still empty. Workers read the files themselves: sample arrays do not go
  through the driver (the held-back and tuning samples, at most 32 + 32, are read by the
  driver, which needs them);
* back: each observer's state (:meth:`lowbit.calibration.observers.Observer.state`: a
  min/max pair, a histogram of at most ``max_num_bin`` bins, a layer's second-moment
  matrix), merged in shard order; and the warnings of skipped files.

Shards are contiguous runs of the statistics samples, cut at multiples of the batch size,
and each worker's observers start counting batches where a single process would be at
that sample, so the histograms' per-batch subsampling takes the same values: the merged
statistics are a single process's (histograms merge exactly; sums add in another order,
which moves their last bits only).

A worker that dies is replaced and its shard run again (Ray's task retries,
``MAX_RETRIES``); a sample that is bad raises the same :class:`~lowbit.errors.LowbitError`
as in one process, naming the file, and the job stops before anything is written.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ..data.feeds import batched
from ..errors import LowbitError
from ..graph.runtime import make_session
from ..search.metrics import PairStats

MAX_RETRIES = 3


class Workers:
    """A Ray cluster to run on: local (``count`` CPUs) or joined at ``address``."""

    def __init__(self, ray: Any, count: int):
        self.ray, self.count = ray, count
        self._observe = ray.remote(max_retries=MAX_RETRIES)(_observe_shard)
        self._score = ray.remote(max_retries=MAX_RETRIES)(_score_model)
        self._sensitivities = ray.remote(max_retries=MAX_RETRIES)(_node_sensitivities)

    def observe(self, model: onnx.ModelProto, fetched: list[str], observers: list[dict[str, Any]],
                shards: list[Shard], done: Callable[[int], None]) -> list[tuple[list[dict[str, dict]], list[str]]]:
        """Per shard, in shard order: the states of its copies of ``observers`` (one dict per request, tensor
        name to observer) and its warnings; ``done(samples)`` is called as each shard ends."""
        model_ref = self.ray.put(model.SerializeToString())
        empty = copy.deepcopy(observers)
        tasks = [self._observe.remote(model_ref, fetched, empty, shard) for shard in shards]
        return self._in_order(tasks, lambda index: done(len(shards[index].samples)))

    def score(self, models: Sequence[onnx.ModelProto], feeds: Sequence[dict[str, np.ndarray]], names: Sequence[str],
              references: Sequence[Sequence[np.ndarray]]) -> list[Any]:
        """Each model's comparison sums (:class:`~lowbit.search.metrics.PairStats`) of each feed, one Ray task per
        model."""
        feeds_ref, references_ref = self.ray.put(list(feeds)), self.ray.put([list(r) for r in references])
        tasks = [self._score.remote(model.SerializeToString(), feeds_ref, list(names), references_ref)
                 for model in models]
        return [self._get(task) for task in tasks]

    def sensitivities(self, error: Any, full_error: float, alone: bool, step: Callable[[], None]) -> list[Any]:
        """:func:`lowbit.analysis.sensitivity.node_sensitivities` of every switched node, a share per worker.

        ``error`` is the driver's :class:`~lowbit.analysis.sensitivity.OutputError`: its switched
        model goes out once, with the batches; each task measures its nodes in a session of its own.
        """
        switched = error.switched
        model_ref = self.ray.put(ir.serde.serialize_model(switched.model).SerializeToString())
        batches_ref = self.ray.put(list(error.batches))
        names = [node.name for node in switched.nodes]
        share = -(-len(names) // self.count)
        shares = [names[i:i + share] for i in range(0, len(names), share)]
        tasks = [self._sensitivities.remote(model_ref, switched.nodes, batches_ref, error.outputs, part, full_error,
                                            alone) for part in shares]

        def done(index: int) -> None:
            for _ in shares[index]:
                step()
        return [row for rows in self._in_order(tasks, done) for row in rows]

    def _in_order(self, tasks: list, done: Callable[[int], None]) -> list[Any]:
        """The tasks' results in the tasks' order; ``done(index)`` as each one finishes (for a progress bar)."""
        pending = {task: index for index, task in enumerate(tasks)}
        results: dict[int, Any] = {}
        while pending:
            ready, _ = self.ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready[0])
            results[index] = self._get(ready[0])
            done(index)
        return [results[i] for i in range(len(tasks))]

    def _get(self, task) -> Any:
        try:
            return self.ray.get(task)
        except self.ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, LowbitError):  # the user's data: the same one line as in one process
                raise LowbitError(str(cause)) from None
            raise


class Shard:
    """A run of consecutive statistics samples, and where it starts in the stream.

    ``samples`` is a :class:`~lowbit.data.sources.FileSamples` (files the worker reads and
    batches by ``batch_size``) or a list of feeds, each run as it is (the few samples a
    search keeps in memory, such as the per-op scoring's tuning samples).
    """

    def __init__(self, samples: Any, specs: list, first_sample: int, first_batch: int, batch_size: int, what: str):
        self.samples, self.specs, self.first_sample, self.first_batch = samples, specs, first_sample, first_batch
        self.batch_size, self.what = batch_size, what

    def batches(self):
        if isinstance(self.samples, list):
            return iter(self.samples)
        return batched(iter(self.samples), self.specs, self.batch_size)


def _observe_shard(model_bytes: bytes, fetched: list[str], observers: list[dict[str, Any]], shard: Shard
                   ) -> tuple[list[dict[str, dict]], list[str]]:
    """On a worker: run the model over the shard's samples into ``observers``; return their states."""
    from ..pipeline.engine import STATISTICS, Request, _Runner  # the engine imports this module

    model = onnx.load_from_string(model_bytes)
    warnings: list[str] = []
    if not isinstance(shard.samples, list):
        shard.samples.warn = warnings.append
    every = [observer for group in observers for observer in group.values()]
    for observer in every:
        observer.batches = shard.first_batch  # as a single process would count at this sample
    requests = [Request(group) for group in observers]
    runner = _Runner(make_session(model, fetched), fetched, model, requests, shard.what)
    runner.samples = shard.first_sample
    for batch in shard.batches():
        runner.feed(batch, STATISTICS)
    for observer in every:
        observer.batches -= shard.first_batch
    return [{name: observer.state() for name, observer in group.items()} for group in observers], warnings


def _score_model(model_bytes: bytes, feeds: list[dict[str, np.ndarray]], names: list[str],
                 references: list[list[np.ndarray]]):
    """On a worker: the comparison sums of one candidate model on each held-back sample."""
    session = make_session(onnx.load_from_string(model_bytes))
    per_feed = []
    for feed, expected in zip(feeds, references):
        stats = PairStats()
        for actual, wanted in zip(session.run(names, feed), expected):
            stats.update(actual, wanted)
        per_feed.append(stats)
    return per_feed


def _node_sensitivities(model_bytes: bytes, nodes: list[Any], batches: list[dict[str, np.ndarray]],
                        outputs: list[str], names: list[str], full_error: float, alone: bool) -> list[Any]:
    """On a worker: the sensitivity figures of the switched nodes ``names``."""
    from ..analysis.sensitivity import OutputError, node_sensitivities  # analysis imports this module
    from ..analysis.switches import SwitchedModel

    session = make_session(onnx.load_from_string(model_bytes))
    error = OutputError(session, SwitchedModel(None, nodes), batches, outputs)
    return node_sensitivities(error, full_error, names=names, alone=alone)


@contextmanager
def start_workers(count: int | None, address: str | None, where: str):
    """Workers for the job (None without ``workers`` / ``ray_address``); a local Ray is shut down afterwards."""
    if count is None and address is None:
        yield None
        return
    try:
        import ray
    except ImportError:
        raise LowbitError(f"{where}: running on workers needs Ray: pip install 'lowbit[ray]'") from None
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        try:
            if address is not None:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=count, include_dashboard=False, log_to_driver=False)
        except Exception as exc:  # Ray's own errors (no cluster at the address, ...)
            raise LowbitError(f"{where}: Ray did not start: {str(exc).splitlines()[0]}") from None
    cpus = int(ray.cluster_resources().get("CPU", 1))
    try:
        yield Workers(ray, count if count is not None else cpus)
    finally:
        if started:
            ray.shutdown()
