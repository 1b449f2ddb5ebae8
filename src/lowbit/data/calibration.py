"""The calibration data of one job: where it comes from, and a fresh stream of checked samples on demand.

The user gives it as ``data`` (a folder, or an iterable of feed dicts) or through the
configuration (``calibrate_path``, ``data_list``), with ``calibrate_size`` and the
``[data_preprocess_param]`` settings. Every pass over the data opens a new stream here,
so files are read again rather than kept; an iterator can be read only once, which
:attr:`CalibrationData.rereadable` tells the passes that would need a second look.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config.model import CalibrationSource, QuantConfig
from ..errors import LowbitError
from .feeds import InputSpec, at_most, checked_feeds
from .images import ImagePreprocess
from .sources import DataOptions, FileSamples, folder_samples, list_samples

FeedSource = str | Path | Iterable[dict[str, np.ndarray]]


class CalibrationData:
    """The job's calibration samples (possibly none)."""

    def __init__(self, data: FeedSource | None, config: QuantConfig, specs: list[InputSpec],
                 warn: Callable[[str], None]):
        self.data, self.config, self.specs, self.warn = data, config, specs, warn
        self.reads = 0
        self._listed: FileSamples | None = None  # the files, listed and checked once

    @property
    def given(self) -> bool:
        return self.data is not None or self.config.calibrate_path is not None or self.config.data_list is not None

    @property
    def in_memory(self) -> bool:
        return self.data is not None and not isinstance(self.data, (str, Path))

    @property
    def rereadable(self) -> bool:
        """False for an iterator that has been read: it cannot give its samples again."""
        return not (self.reads and self.in_memory and iter(self.data) is self.data)

    def open(self, limit: int | None = None) -> tuple[Iterator[dict[str, np.ndarray]], int | None]:
        """A new stream of checked samples (the first ``limit``), and its length when known."""
        self.reads += 1
        feeds, total = self._stream()
        if limit is not None:
            feeds = itertools.islice(feeds, limit)
            total = limit if total is None else min(total, limit)
        return feeds, total

    @property
    def on_files(self) -> bool:
        """Whether the samples are files (which workers can read themselves), not arrays in memory."""
        return self.given and not self.in_memory

    def files(self, limit: int | None = None) -> FileSamples:
        """The first ``limit`` sample files (all when None), as a list workers can split."""
        self.reads += 1
        samples = self._files()
        return samples if limit is None else replace(samples, rows=samples.rows[:limit])

    def count(self) -> int | None:
        """How many samples a stream gives, when that is known without reading them (it lists the files)."""
        if self.in_memory:
            size, known = self.config.calibrate_size, _len_or_none(self.data)
            return known if size is None else size if known is None else min(size, known)
        return len(self._files())

    def file_kinds(self) -> set[str] | None:
        """The kinds of calibration files (IMAGE, BIN, NPY, NPZ); None for samples given in memory."""
        if self.in_memory or not self.given:
            return None
        return self._files().kinds()

    def _stream(self) -> tuple[Iterator[dict[str, np.ndarray]], int | None]:
        size = self.config.calibrate_size
        if self.in_memory:
            known = _len_or_none(self.data)
            return at_most(checked_feeds(self.data, self.specs), size, known, "the samples passed as data"), \
                size if size is not None else known
        samples = self._files()
        return iter(samples), len(samples)

    def _files(self) -> FileSamples:
        if self._listed is None:
            self._listed = self._list_files()
        return self._listed

    def _list_files(self) -> FileSamples:
        config, size, options = self.config, self.config.calibrate_size, data_options(self.config)
        if self.data is not None:
            samples = folder_samples((CalibrationSource(Path(self.data)),), self.specs, size, options)
        elif config.data_list is not None:
            if config.calibrate_path is not None:
                raise LowbitError(f"give calibrate_path ({config.source('calibrate_path')}) or data_list "
                                  f"({config.source('data_list')}), not both")
            samples = list_samples(Path(config.data_list), self.specs, size, options)
        elif config.calibrate_path is not None:
            samples = folder_samples(config.calibrate_path, self.specs, size, options)
        else:
            raise LowbitError("full quantization needs calibration data: give --data FOLDER or --data-list FILE "
                              "(calibrate_path or data_list in [data_preprocess_param])")
        samples.warn = self.warn
        return samples


def data_options(config: QuantConfig) -> DataOptions:
    """The data-layer view of the [data_preprocess_param] settings."""
    return DataOptions(
        input_type=config.input_type,
        images=ImagePreprocess(
            to_format=config.image_to_format,
            resize=_pair(config, "resize_width", "resize_height"),
            resize_method=config.resize_method,
            center_crop=_pair(config, "center_crop_width", "center_crop_height"),
            mean=config.normalize_mean,
            std=config.normalize_std,
        ),
        input_layout=config.input_layout,
        bin_layout=config.input_data_format,
        shapes=config.input_shape or {},
        skip_bad_samples=config.skip_bad_samples,
    )


def _pair(config: QuantConfig, width_key: str, height_key: str) -> tuple[int, int] | None:
    width, height = getattr(config, width_key), getattr(config, height_key)
    if (width is None) != (height is None):
        given = width_key if width is not None else height_key
        raise LowbitError(f"{config.source(given)}: {given} needs {width_key} and {height_key} together")
    return None if width is None else (width, height)


def _len_or_none(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None
