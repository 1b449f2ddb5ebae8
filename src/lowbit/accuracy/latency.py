"""What a quantized model costs at run time, beside the float model, measured the same way."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

# Runs of one model in a row, after one run not counted (the first after the other model's). The sessions' threads
# do not spin between runs: with two sessions alive, spinning threads compete for the cores, and EfficientNet-Lite0's
# float model took 18-19 ms a run on 2 cores instead of 10-11 (int8: 14-15 ms instead of 7.5).
BLOCK = 5
# Why int8 can be no faster on a CPU, said wherever a measurement finds it so.
WHY_NOT_FASTER = "most often ops without integer kernels, or convolutions too small for int8 to pay for its conversions"


def latencies(float_path: Path, quantized_path: Path, feed: dict[str, np.ndarray], runs: int = 20,
              budget_seconds: float | None = None) -> tuple[float, float]:
    """Median ms per run of each model on one sample, in blocks taken in turn so that load spikes hit both;
    with ``budget_seconds``, fewer runs (one block each at least) once the counted runs have taken that long."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for p in (float_path, quantized_path)]
    times: list[list[float]] = [[], []]
    while len(times[0]) < runs:
        if budget_seconds is not None and times[0] and sum(map(sum, times)) > 1000 * budget_seconds:
            break
        for i, session in enumerate(sessions):
            session.run(None, feed)  # not counted: the other model's threads may still be spinning
            for _ in range(min(BLOCK, runs - len(times[i]))):
                start = time.perf_counter()
                session.run(None, feed)
                times[i].append(1000 * (time.perf_counter() - start))
    return float(np.median(times[0])), float(np.median(times[1]))


def latency_line(float_ms: float, quantized_ms: float) -> str:
    """The summary line for a pair of :func:`latencies`."""
    return (f"  latency, ONNX Runtime CPU, one sample: float {float_ms:.3g} ms, quantized {quantized_ms:.3g} ms "
            f"({float_ms / quantized_ms:.2f}x float's speed)")
