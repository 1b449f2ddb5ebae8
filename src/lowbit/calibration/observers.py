"""Observers: one small class per statistic, all behind one interface.

An observer sees a tensor batch by batch (``update``) and can absorb another observer of
the same kind (``merge``, for statistics collected by several workers or runs). Range
observers also report the real range they would quantize (``range``); other statistics
(per-channel means for bias correction) report their own value. Scales and zero points are not
computed here but in :func:`lowbit.quantizers.qparams.compute_qparams`, whatever the
observer. Observers keep running aggregates only, so memory does not grow with the
number of calibration samples.

:class:`ValueCountsObserver` keeps the distinct values of a tensor while they are few (a graph input of 8-bit
pixels), for :mod:`lowbit.quantizers.ties`.

Range observers keep what the range methods need: :class:`MinMaxObserver` the exact
extremes (enough for MAX_MIN), :class:`~lowbit.calibration.histogram.HistogramObserver`
a histogram that every clipping method (KL, percentile, MSE, ACIQ) reads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Observer(ABC):
    """Running statistic of one tensor; ``axis`` selects per-channel statistics.

    Its whole state is the attributes named in ``STATE`` (numbers, arrays or None), so
    :meth:`state` and :meth:`from_state` turn it into plain numpy arrays and back: what a
    worker saves or sends to be merged elsewhere.
    """

    STATE: tuple[str, ...] = ("axis", "batches")

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.batches = 0

    @abstractmethod
    def update(self, x: np.ndarray) -> None:
        """Fold one batch of the tensor into the statistic."""

    @abstractmethod
    def merge(self, other: Observer) -> None:
        """Fold another observer's statistic (same kind, same tensor) into this one."""

    def finite(self) -> bool:
        """False once the tensor has shown a NaN or an infinity (the data engine stops the job then)."""
        return True

    def state(self) -> dict[str, np.ndarray]:
        """The statistic as plain numpy arrays (``np.savez`` stores them, ``np.load`` reads them unpickled)."""
        return {key: _NONE if getattr(self, key) is None else np.asarray(getattr(self, key)) for key in self.STATE}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> Observer:
        observer = cls.__new__(cls)
        for key in cls.STATE:
            value = np.asarray(state[key])
            value = None if value.dtype.kind == "U" else (value.item() if value.ndim == 0 else value)
            setattr(observer, key, value)
        return observer

    def _reduce_axes(self, x: np.ndarray) -> tuple[int, ...] | None:
        if self.axis is None:
            return None
        axis = self.axis % x.ndim
        return tuple(i for i in range(x.ndim) if i != axis)


_NONE = np.array([], dtype="U1")  # how state() writes None: no numeric state is a string array


class RangeObserver(Observer):
    """An observer whose statistic is the real range to quantize."""

    @abstractmethod
    def range(self) -> tuple[np.ndarray, np.ndarray]:
        """The (min, max) to quantize: scalars, or 1-D along ``axis``."""


class MinMaxObserver(RangeObserver):
    """The smallest and largest value seen (MindSpore's MAX_MIN, ONNX Runtime's MinMax)."""

    STATE = (*Observer.STATE, "min", "max")

    def __init__(self, axis: int | None = None):
        super().__init__(axis)
        self.min: np.ndarray | None = None
        self.max: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        axes = self._reduce_axes(x)
        lo = np.asarray(np.min(x, axis=axes), dtype=np.float64)
        hi = np.asarray(np.max(x, axis=axes), dtype=np.float64)
        self._fold(lo, hi)
        self.batches += 1

    def merge(self, other: Observer) -> None:
        if not isinstance(other, MinMaxObserver):
            raise TypeError(f"cannot merge {type(other).__name__} into MinMaxObserver")
        if other.min is not None:
            self._fold(other.min, other.max)
        self.batches += other.batches

    def _fold(self, lo: np.ndarray, hi: np.ndarray) -> None:
        self.min = lo if self.min is None else np.minimum(self.min, lo)
        self.max = hi if self.max is None else np.maximum(self.max, hi)

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        if self.min is None:
            raise ValueError("observer saw no data")
        return self.min, self.max

    def finite(self) -> bool:
        return self.min is None or bool(np.all(np.isfinite(self.min)) and np.all(np.isfinite(self.max)))

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> Observer:
        observer = super().from_state(state)
        for key in ("min", "max"):  # per-tensor extremes are 0-d arrays, as update() makes them
            if getattr(observer, key) is not None:
                setattr(observer, key, np.asarray(getattr(observer, key), dtype=np.float64))
        return observer


class ValueCountsObserver(Observer):
    """The distinct values of a tensor and how often each occurs, while there are at most :data:`MAX_DISTINCT`.

    A graph input of 8-bit pixels, however normalised, takes at most 256 values per channel; whether
    those sit on the rounding ties of a grid decides how they round (:mod:`lowbit.quantizers.ties`).
    A tensor with more distinct values (any computed activation) is continuous for that purpose: the
    observer drops what it kept and says so (``overflowed``), so its memory stays bounded.
    """

    MAX_DISTINCT = 4096
    STATE = (*Observer.STATE, "values", "counts", "overflowed")

    def __init__(self):
        super().__init__()
        self.values: np.ndarray | None = None  # sorted, float32
        self.counts: np.ndarray | None = None  # int64, one per value
        self.overflowed = False

    def update(self, x: np.ndarray) -> None:
        self.batches += 1
        if not self.overflowed and x.size:
            self._fold(*np.unique(np.asarray(x, dtype=np.float32), return_counts=True))

    def merge(self, other: Observer) -> None:
        if not isinstance(other, ValueCountsObserver):
            raise TypeError(f"cannot merge {type(other).__name__} into ValueCountsObserver")
        self.batches += other.batches
        if other.overflowed:
            self._overflow()
        elif not self.overflowed and other.values is not None:
            self._fold(np.asarray(other.values, np.float32), np.asarray(other.counts, np.int64))

    def _fold(self, values: np.ndarray, counts: np.ndarray) -> None:
        if self.values is not None:
            values, inverse = np.unique(np.concatenate([self.values, values]), return_inverse=True)
            counts = np.bincount(inverse, weights=np.concatenate([self.counts, counts]), minlength=len(values))
        if len(values) > self.MAX_DISTINCT:
            self._overflow()
        else:
            self.values, self.counts = values, np.asarray(counts, np.int64)

    def _overflow(self) -> None:
        self.values = self.counts = None
        self.overflowed = True

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> Observer:
        observer = super().from_state(state)
        observer.overflowed = bool(observer.overflowed)
        for key in ("values", "counts"):  # one distinct value comes back as a number
            if getattr(observer, key) is not None:
                setattr(observer, key, np.atleast_1d(getattr(observer, key)))
        return observer


class MeanObserver(Observer):
    """The running mean, per channel along ``axis`` (or of the whole tensor)."""

    STATE = (*Observer.STATE, "total", "count")

    def __init__(self, axis: int | None = None):
        super().__init__(axis)
        self.total: np.ndarray | None = None
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        axes = self._reduce_axes(x)
        total = np.asarray(np.sum(x, axis=axes, dtype=np.float64))
        self._fold(total, x.size // (total.size or 1))
        self.batches += 1

    def merge(self, other: Observer) -> None:
        if not isinstance(other, MeanObserver):
            raise TypeError(f"cannot merge {type(other).__name__} into MeanObserver")
        if other.total is not None:
            self._fold(other.total, other.count)
        self.batches += other.batches

    def _fold(self, total: np.ndarray, count: int) -> None:
        self.total = total if self.total is None else self.total + total
        self.count += count

    def mean(self) -> np.ndarray:
        if self.total is None:
            raise ValueError("observer saw no data")
        return self.total / self.count

    def finite(self) -> bool:
        return self.total is None or bool(np.all(np.isfinite(self.total)))

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> Observer:
        observer = super().from_state(state)
        if observer.total is not None:
            observer.total = np.asarray(observer.total, dtype=np.float64)
        return observer


class OutputsObserver(Observer):
    """Keeps every batch it sees, in order: the float model's outputs on the few samples that a
    search or an output check compares other models with (memory grows with those samples only)."""

    STATE = (*Observer.STATE, "arrays")

    def __init__(self):
        super().__init__()
        self.arrays: list[np.ndarray] = []

    def update(self, x: np.ndarray) -> None:
        self.arrays.append(np.array(x, copy=True))
        self.batches += 1

    def merge(self, other: Observer) -> None:
        if not isinstance(other, OutputsObserver):
            raise TypeError(f"cannot merge {type(other).__name__} into OutputsObserver")
        self.arrays.extend(other.arrays)
        self.batches += other.batches

    def finite(self) -> bool:
        return not self.arrays or bool(np.all(np.isfinite(self.arrays[-1])))

    def state(self) -> dict[str, np.ndarray]:
        """The batches flattened end to end, with their shapes (one row each)."""
        rank = self.arrays[0].ndim if self.arrays else 0
        values = np.concatenate([a.ravel() for a in self.arrays]) if self.arrays else np.zeros(0, np.float32)
        return {"batches": np.asarray(self.batches), "values": values,
                "shapes": np.array([a.shape for a in self.arrays], dtype=np.int64).reshape(len(self.arrays), rank)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> Observer:
        observer = cls()
        observer.batches = int(state["batches"])
        offset = 0
        for shape in state["shapes"]:
            size = int(np.prod(shape))
            observer.arrays.append(state["values"][offset:offset + size].reshape(shape))
            offset += size
        return observer

