"""One streaming pass of the float model over the calibration data.

The float model runs in ONNX Runtime with every observed tensor exposed as an extra
output; after each batch, each observer folds that batch in and the arrays are
dropped. Memory therefore stays at one batch of activations plus the observers'
running aggregates, whatever the number of samples (ONNX Runtime's own calibrators
keep every batch's activations until the end).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from tqdm import tqdm

from ..errors import LowbitError
from ..graph.runtime import make_session
from .observers import Observer, RangeObserver


@dataclass
class CalibrationRun:
    samples: int
    seconds: float


def collect(
    model: ir.Model | onnx.ModelProto,
    observers: Mapping[str, Observer],
    feeds: Iterable[dict[str, np.ndarray]],
    total: int | None = None,
    progress: bool = True,
    description: str = "calibrating",
) -> CalibrationRun:
    """Run the model on every feed (a sample or a batch) and update the observer of each named tensor.

    ``total`` is the number of samples, for the progress bar.
    """
    graph_inputs = {v.name for v in model.graph.input} if isinstance(model, onnx.ModelProto) else \
        {v.name for v in model.graph.inputs}
    from_outputs = [name for name in observers if name not in graph_inputs]
    session = make_session(model, from_outputs)
    start = time.perf_counter()
    samples = 0
    bar = tqdm(total=total, desc=description, unit="sample", disable=None if progress else True)
    for feed in feeds:
        try:
            arrays = session.run(from_outputs, feed) if from_outputs else []
        except Exception as exc:  # ORT raises its own exception types for bad feeds
            raise LowbitError(f"{description}: the batch from sample {samples + 1} failed in ONNX Runtime: "
                              f"{str(exc).splitlines()[0]}") from None
        for name, array in zip(from_outputs, arrays):
            observers[name].update(array)
        for name in graph_inputs & observers.keys():
            observers[name].update(feed[name])
        rows = next(iter(feed.values())).shape[0] if feed else 1
        samples += rows
        bar.update(rows)
    bar.close()
    if samples == 0:
        raise LowbitError("no calibration samples: full quantization needs at least one")
    _check_finite({k: v for k, v in observers.items() if isinstance(v, RangeObserver)})
    return CalibrationRun(samples, time.perf_counter() - start)


def _check_finite(observers: Mapping[str, RangeObserver]) -> None:
    for name, observer in observers.items():
        lo, hi = observer.range()
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            raise LowbitError(f"tensor '{name}' takes NaN or infinite values on the calibration data; "
                              "check the data (and the float model) before quantizing")
