"""``lowbit.quantize``: the whole job, from a float ONNX file to a checked quantized file.

This module resolves the configuration, runs the pipeline of the quant type
(:mod:`lowbit.pipeline.modes`), and builds the result from what the passes left in
the state. The steps themselves are passes (:mod:`lowbit.passes`).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .analysis.analyze import Analysis
from .config import QuantConfig, load_config
from .data.calibration import FeedSource
from .distributed.workers import start_workers
from .errors import LowbitWarning
from .pipeline.modes import PIPELINES
from .pipeline.passes import run_pipeline
from .pipeline.state import QuantState
from .reports.result import NodeReport, QuantizeResult, TensorReport

__all__ = ["LowbitWarning", "NodeReport", "QuantizeResult", "TensorReport", "analyze", "quantize", "run"]


def quantize(
    model: str | Path,
    output: str | Path,
    config: str | Path | None = None,
    data: FeedSource | None = None,
    *,
    progress: bool = True,
    evaluator: Any = None,
    **settings: Any,
) -> QuantizeResult:
    """Quantize ``model`` into ``output`` and return what was done.

    ``config`` is a MindSpore-style INI file or Horizon's quant_config JSON (``*.json``);
    ``settings`` override its keys by name (``per_channel=False``, ``target_device="NVGPU"``,
    ``node_config={"conv1": {"qtype": "int16"}}`` ...). ``data`` is the calibration
    data: a folder (.npy, .npz, .bin or image files), or an iterable of feed dicts (input
    name to array; a list or another re-iterable, since weight rounding and bias
    correction read the data again). Without it, ``calibrate_path`` or ``data_list``
    from the configuration is used.

    ``evaluator``: quantize until your own metric is satisfied. An object with
    ``eval_model(model_file, batch_num)`` and ``is_satisfied(original_metric, new_metric)``
    (see :class:`lowbit.Evaluator`), or ``"path/to/file.py:ClassName"``; or, with no Python,
    ``accuracy_target="top1-agreement>=0.99"`` (``eval_data="eval.npz"``).
    """
    if isinstance(evaluator, str):
        settings["evaluator"], evaluator = evaluator, None
    elif evaluator is not None:  # the configuration names it, so that its checks (one evaluator ...) see it
        settings["evaluator"] = f"{type(evaluator).__module__}.{type(evaluator).__qualname__} object"
    resolved = load_config(config, settings, describe=lambda key: f"argument {key}=")
    return run(model, output, resolved, data, progress=progress, evaluator=evaluator)


def analyze(
    float_model: str | Path,
    quantized_model: str | Path,
    data: FeedSource | None = None,
    config: str | Path | None = None,
    *,
    samples: int = 32,
    workers: int | None = None,
    report: str | Path | None = None,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Analysis:
    """Where ``quantized_model`` (a QDQ model of ``float_model``) loses accuracy; see :mod:`lowbit.analysis`.

    ``data`` as for :func:`quantize` (``config``'s ``[data_preprocess_param]`` settings apply
    to image folders); the first ``samples`` are read. ``workers``: measure the per-node figures
    on a local Ray with that many CPUs (or ``workers`` / ``ray_address`` in ``config``).
    ``report``: also write REPORT.html and REPORT.json (needs ``lowbit[report]``).
    ``progress(label, total)`` returns a function called once per step; ``warn`` receives the
    warnings (default: :class:`LowbitWarning`).
    """
    from .analysis.analyze import analyze as run_analysis
    from .reports.analysis import check_report_path, write_report

    if report is not None:
        check_report_path(report)
    resolved = load_config(config, {"workers": workers}, describe=lambda key: f"argument {key}=")
    if warn is None:
        def warn(message: str) -> None:
            warnings.warn(message, LowbitWarning, stacklevel=_caller_level())
    analysis = run_analysis(float_model, quantized_model, data, config=resolved, samples=samples,
                            progress=progress, warn=warn)
    if report is not None:
        write_report(analysis, report)
    return analysis


def run(
    model: str | Path,
    output: str | Path,
    config: QuantConfig,
    data: FeedSource | None = None,
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
    evaluator: Any = None,
) -> QuantizeResult:
    """Quantize with an already resolved configuration (the CLI's entry point); ``evaluator``: an evaluator object."""
    notes: list[str] = []

    def note(message: str) -> None:
        if message in notes:  # a file skipped in one pass over the data is skipped in the next too: say it once
            return
        notes.append(message)
        if warn is not None:
            warn(message)
        else:
            warnings.warn(message, LowbitWarning, stacklevel=_caller_level())

    where = config.source("ray_address" if config.ray_address is not None else "workers")
    with start_workers(config.workers, config.ray_address, where) as workers:
        state = QuantState(config, Path(model), Path(output), note, progress, user_data=data,
                           user_evaluator=evaluator, workers=workers)
        run_pipeline(PIPELINES[config.quant_type](), state)
    return _result(state, notes)


def _caller_level() -> int:
    """The stack level of the first frame outside lowbit: a warning points at the user's call."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith("lowbit."):
        frame, level = frame.f_back, level + 1
    return level


def _result(state: QuantState, notes: list[str]) -> QuantizeResult:
    plan = state.plan
    return QuantizeResult(
        output_path=state.output_path,
        target=state.target_name,
        quantized_nodes=[NodeReport(d.node.name, d.node.op_type, f"fused into {d.fused_into}" if d.fused_into else "",
                                    d.precision) for d in plan.quantized_nodes],
        float_nodes=[NodeReport(d.node.name, d.node.op_type, d.reason, d.precision) for d in plan.float_nodes],
        tensors=_tensor_reports(state),
        calibration_samples=_samples(state),
        float_bytes=state.float_bytes,
        output_bytes=state.output_bytes,
        passes=state.sections,
        data_passes=state.engine.passes,
        warnings=notes,
    )


def _samples(state: QuantState) -> int:
    """Samples the statistics saw: the activation statistics', else the most any pass read."""
    if state.calibration_samples:
        return state.calibration_samples
    return max((p.samples for p in state.engine.passes if p.over_calibration_data), default=0)


def _tensor_reports(state: QuantState) -> dict[str, TensorReport]:
    reports = {}
    for name, observer in (state.observers or {}).items():
        if name not in state.qparams:  # observed, then left float by the accuracy search
            continue
        lo, hi = observer.range()
        q = state.qparams[name]
        reports[name] = TensorReport(name, float(lo), float(hi), *state.ranges[name], float(q.scale),
                                     int(q.zero_point), q.scheme.qtype.name)
    return reports
