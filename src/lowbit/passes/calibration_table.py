"""Calibration tables in and out: activation ranges from a file instead of calibration, or to a file for
other tools (formats: :mod:`lowbit.calibration.tables`).

ReadCalibrationTable reads: ``calibration_table`` and the plan. Sets: the ranges (then no
calibration run is made; GPTQ and bias correction still read data when it is given), and
the scales a lowbit table recorded (see :func:`lowbit.quantizers.ties.as_recorded`). Every
planned tensor must be in the table and every tensor of the table must be a tensor of the
model; either mismatch is a one-line error naming the tensors. Tensors of the model that the
target leaves float (a table made for another target, or a TensorRT cache, which lists
every tensor) are noted and ignored. A lowbit table says whether it was measured with
cross_layer_equalization; read into a job that differs, it is a one-line error (the
tensors equalization rescales would get the other model's ranges).

WriteCalibrationTable reads: the ranges, the plan and the scales. Writes
``calibration_table_out`` in ``table_format``, after the model is saved, each tensor with
the range of its scale-sharing group (the range its scale comes from), so that reading the
table back gives the same model.
"""

from __future__ import annotations

from pathlib import Path

from ..calibration.tables import read_table, write_table
from ..errors import LowbitError
from ..graph.passes import all_values
from ..pipeline.passes import Pass
from ..pipeline.state import QuantState


class ReadCalibrationTable(Pass):
    name = "read_calibration_table"
    requires = ("plan",)
    provides = ("ranges",)

    def applies(self, state: QuantState) -> bool:
        return state.config.calibration_table is not None and bool(state.plan.activations)

    def run(self, state: QuantState) -> None:
        path = Path(state.config.calibration_table)
        read = read_table(path)
        table = read.entries
        planned = list(state.plan.activations)
        missing = [name for name in planned if name not in table]
        tensors = {v.name for v in all_values(state.model.graph)}
        unknown = [name for name in table if name not in tensors]
        unused = [name for name in table if name in tensors and name not in state.plan.activations]
        if missing:
            raise LowbitError(f"{path}: no range for {len(missing)} tensor(s) the model quantizes: "
                              f"{_names(missing)}")
        if unknown:
            raise LowbitError(f"{path}: {len(unknown)} tensor(s) of the table are not tensors of the model: "
                              f"{_names(unknown)}")
        if unused:  # a table made for another target, or by a tool that lists every tensor (TensorRT)
            state.note(f"{path}: {len(unused)} tensor(s) of the table are not quantized for target "
                       f"{state.target_name}, their ranges are not used: {_names(unused)}")
        _check_equalization(state, path, read.equalized)
        symmetric = state.target.activation.symmetric
        state.ranges = {name: table[name].range(symmetric) for name in planned}
        state.recorded_scales = {name: table[name].scale for name in planned if table[name].scale is not None}

    def describe(self, report) -> list[str]:
        return ["  activation ranges: read from the calibration table"]


class WriteCalibrationTable(Pass):
    name = "write_calibration_table"
    requires = ("plan", "qparams")

    def applies(self, state: QuantState) -> bool:
        return state.config.calibration_table_out is not None and bool(state.plan.activations)

    def run(self, state: QuantState) -> Path:
        path = Path(state.config.calibration_table_out)
        write_ranges(state, path, state.config.table_format)
        return path

    def describe(self, path: Path) -> list[str]:
        return [f"  calibration table: wrote {path}"]


def write_ranges(state: QuantState, path: Path, table_format: str) -> None:
    """Write the state's activation ranges to ``path``, each tensor with the range of its scale-sharing group."""
    ranges = {}
    for members in state.plan.groups().values():
        lows, highs = zip(*(state.ranges[name] for name in members))
        for name in members:
            ranges[name] = (min(lows), max(highs))
    about = {"target": state.target_name, "samples": state.calibration_samples,
             "histogram_bins": state.config.max_num_bin, "tune_num": state.config.tune_num,
             "cross_layer_equalization": bool(state.config.cross_layer_equalization)}
    write_table(path, table_format, ranges, state.qparams, about)


def _check_equalization(state: QuantState, path: Path, made_with: bool | None) -> None:
    """Equalization rescales the tensors between the layers it pairs: a table's ranges fit one model or the other.

    A lowbit table says which (``made_with``); with another table the job can only be cautious."""
    wanted = bool(state.config.cross_layer_equalization)
    if made_with is not None and made_with != wanted:
        made, now = ("with", "without") if made_with else ("without", "with")
        raise LowbitError(f"{path} was measured {made} cross_layer_equalization and this job runs {now} it: the "
                          "tensors between the layers it pairs are scaled differently, so the ranges would be wrong; "
                          f"set cross_layer_equalization={str(made_with).lower()}, or write a new table")
    if made_with is None and wanted:
        state.note(f"calibration_table with cross_layer_equalization: {path} does not say whether its ranges were "
                   "measured with it; equalization rescales the tensors between the layers it pairs, so they must "
                   "come from such a run (lowbit's calibration_table_out); ranges of the original model would be "
                   "wrong")


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
