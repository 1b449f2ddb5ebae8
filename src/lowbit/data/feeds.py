"""Model input specifications and the checks every calibration sample goes through.

Whatever the source (files, an in-memory iterable), a sample is a feed dict from input
name to array. Each is checked against the model's inputs before it reaches ONNX
Runtime, so a wrong file is reported by name instead of as a runtime failure.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..errors import LowbitError


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype and shape (a dim is an int, or None when free)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None

    def dims(self) -> str:
        """The shape as 1x3x224x224, with ? for free dimensions."""
        return "?" if self.shape is None else "x".join("?" if d is None else str(d) for d in self.shape)

    def describe(self) -> str:
        return f"{self.name} ({self.dtype}, {self.dims()})"


def input_specs(model: ir.Model) -> list[InputSpec]:
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        dtype = np.dtype(value.dtype.numpy()) if value.dtype is not None else np.dtype(np.float32)
        shape = None
        if value.shape is not None:
            shape = tuple(d if isinstance(d, int) and d > 0 else None for d in value.shape)
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


def check_sample(feed: dict[str, np.ndarray], specs: list[InputSpec], origin: str) -> dict[str, np.ndarray]:
    """Validate one feed dict; a sample missing the batch dimension gets one. Returns the feed to run."""
    names = [s.name for s in specs]
    unknown = [k for k in feed if k not in names]
    if unknown:
        raise LowbitError(f"{origin}: data for '{unknown[0]}', which is not a model input; "
                          f"model inputs: {', '.join(names)}")
    checked = {}
    for spec in specs:
        if spec.name not in feed:
            raise LowbitError(f"{origin}: no data for model input '{spec.name}'; model inputs: {', '.join(names)}")
        try:
            array = np.asarray(feed[spec.name])
        except (ValueError, TypeError) as exc:  # ragged nested lists, objects numpy cannot stack
            raise LowbitError(f"{origin}: input '{spec.name}' is not an array ({str(exc).splitlines()[0]})") from None
        if array.dtype == object:
            raise LowbitError(f"{origin}: input '{spec.name}' is not a numeric array (numpy made it dtype object)")
        checked[spec.name] = _check_array(array, spec, origin)
    return checked


def _check_array(array: np.ndarray, spec: InputSpec, origin: str) -> np.ndarray:
    if array.dtype != spec.dtype:
        hint = f" (convert it with .astype(np.{spec.dtype}))" if array.dtype.kind in "fiu" else ""
        raise LowbitError(f"{origin}: input '{spec.name}' has dtype {array.dtype}, the model expects "
                          f"{spec.dtype}{hint}")
    if spec.shape is not None:
        if array.ndim == len(spec.shape) - 1:
            array = array[np.newaxis]
        if array.ndim != len(spec.shape) or any(
            want is not None and want != got for want, got in zip(spec.shape, array.shape)
        ):
            raise LowbitError(f"{origin}: input '{spec.name}' has shape {list(array.shape)}, the model expects "
                              f"{spec.dims()}")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise LowbitError(f"{origin}: input '{spec.name}' contains NaN or infinite values")
    return array


def checked_feeds(feeds: Iterable[dict[str, np.ndarray]], specs: list[InputSpec]) -> Iterator[dict[str, np.ndarray]]:
    """Check samples of an in-memory iterable one by one, as they are consumed."""
    for i, feed in enumerate(feeds, start=1):
        if not isinstance(feed, dict):
            raise LowbitError(f"calibration sample {i}: expected a dict of input name to array, "
                              f"got {type(feed).__name__}")
        yield check_sample(feed, specs, f"calibration sample {i}")


def at_most(feeds: Iterable[dict[str, np.ndarray]], size: int | None, total: int | None,
            where: str = "the calibration data") -> Iterator[dict[str, np.ndarray]]:
    """The first ``size`` samples of ``feeds`` (all of them when ``size`` is None).

    Asking for more samples than there are is an error, as it is for folders: early when
    the number is known (``total``), else once the stream ends short.
    """
    if size is None:
        yield from feeds
        return
    if total is not None and size > total:
        raise too_few_samples(size, total, where)
    count = 0
    for feed in itertools.islice(feeds, size):  # never pulls a sample past the last one wanted
        count += 1
        yield feed
    if count < size:
        raise too_few_samples(size, count, where)


def too_few_samples(size: int, found: int, where: str) -> LowbitError:
    """The error for calibrate_size above the samples there are, whatever holds them."""
    return LowbitError(f"calibrate_size={size}, but only {found} calibration samples were found in {where}")


def batches_freely(specs: list[InputSpec]) -> bool:
    """Whether every input's batch dimension is free, so that samples can be stacked into batches."""
    return all(s.shape is not None and s.shape and s.shape[0] is None for s in specs)


def batched(feeds: Iterable[dict[str, np.ndarray]], specs: list[InputSpec], batch_size: int) -> Iterator[dict]:
    """Concatenate consecutive samples into batches of up to ``batch_size`` rows.

    Only where every input's batch dimension is free; a model with a fixed batch runs
    sample by sample. Samples of different shapes (images of several sizes) are not mixed.
    """
    if batch_size <= 1 or not batches_freely(specs):
        yield from feeds
        return
    pending: list[dict[str, np.ndarray]] = []
    rows = 0

    def flush():
        return {name: np.concatenate([f[name] for f in pending]) for name in pending[0]}

    for feed in feeds:
        if pending and any(feed[k].shape[1:] != pending[0][k].shape[1:] for k in feed):
            yield flush()
            pending, rows = [], 0
        pending.append(feed)
        rows += next(iter(feed.values())).shape[0]
        if rows >= batch_size:
            yield flush()
            pending, rows = [], 0
    if pending:
        yield flush()
