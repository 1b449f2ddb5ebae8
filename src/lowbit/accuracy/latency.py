"""What a search's kept model costs at run time, beside the float model, measured the same way."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def latencies(float_path: Path, quantized_path: Path, feed: dict[str, np.ndarray], runs: int = 20
               ) -> tuple[float, float]:
    """Median ms per run of each model on one sample, the two interleaved so that load spikes hit both."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for p in (float_path, quantized_path)]
    times: list[list[float]] = [[], []]
    for session in sessions:
        session.run(None, feed)  # warm up
    for _ in range(runs):
        for i, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feed)
            times[i].append(1000 * (time.perf_counter() - start))
    return float(np.median(times[0])), float(np.median(times[1]))
