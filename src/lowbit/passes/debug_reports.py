"""MindSpore's debug reports (``debug_info_save_path``): where the quantized model departs from the float one.

Reads: the saved model, the plan, the bias corrections made, and the calibration data
(full quantization: one round per sample; weight quantization: the weights alone, plus
the outputs per sample when data is given). Sets nothing; writes ``output_summary.csv``,
``round_<k>.csv`` and ``quant_param.csv`` into the folder (:mod:`lowbit.reports.debug`).
The float model is prepared again from its file, so that its tensors carry the names the
quantized model's nodes kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..data.feeds import batched
from ..errors import LowbitError
from ..graph.runtime import make_session
from ..pipeline.engine import DataPass
from ..pipeline.passes import Pass
from ..pipeline.state import QuantState
from ..reports import debug


@dataclass(frozen=True)
class DebugReport:
    folder: Path
    rounds: int
    tensors: int
    seconds: float


class WriteDebugReports(Pass):
    name = "debug_reports"
    setting = "debug_info_save_path"
    requires = ("model", "plan")

    def applies(self, state: QuantState) -> bool:
        return state.config.debug_info_save_path is not None

    def run(self, state: QuantState) -> DebugReport:
        start = time.perf_counter()
        folder = Path(state.config.debug_info_save_path)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LowbitError(f"debug_info_save_path={folder}: cannot create the folder ({exc.strerror})") from None
        float_model = state.float_reference()
        traced = debug.trace(float_model, state.model, [d.node.name for d in state.plan.quantized_nodes])
        outcome = next((s.report for s in state.sections if s.name == "correct_biases"), None)
        kept = outcome is not None and (outcome.verdict is None or outcome.verdict.kept)
        corrections = outcome.report.shifts if kept else {}
        with debug.csv_file(folder / "quant_param.csv", debug.PARAM_COLUMNS) as writer:
            writer.writerows(debug.parameter_rows(traced, state.bits or {}, corrections))
        weights = [row for t in traced if t.weight is not None for row in debug.tensor_rows(t, t.weight, t.dequantized)]
        rounds = 0
        if state.data.given and state.data.rereadable:
            rounds = self._rounds(state, float_model, traced, weights, folder)
        elif state.data.given:
            state.note("debug_info_save_path: the calibration data was an iterator, read once already: "
                       "the reports hold the weights only; pass a list or a folder for the rounds")
        if rounds == 0 or state.config.quant_type != "FULL_QUANT":
            with debug.csv_file(folder / "round_1.csv", debug.ROUND_COLUMNS) as writer:
                writer.writerows(weights)
        return DebugReport(folder, rounds, len(traced), time.perf_counter() - start)

    def _rounds(self, state: QuantState, float_model, traced, weights: list[list], folder: Path) -> int:
        """One run of both models per sample: output_summary.csv throughout, a round file per sample
        (full quantization); returns the number of rounds."""
        activations = [t for t in traced if t.weight is None]
        full = state.config.quant_type == "FULL_QUANT"
        outputs = [v.name for v in state.model.graph.outputs]
        origin_names = list(dict.fromkeys(outputs + ([t.tensor for t in activations] if full else [])))
        dequant_names = list(dict.fromkeys(outputs + ([t.dequant for t in activations] if full else [])))
        float_session = make_session(float_model, origin_names)
        quant_session = make_session(state.model, dequant_names)
        stream, _ = state.data.open(state.config.calibrate_size)
        start, rounds = time.perf_counter(), 0
        with debug.csv_file(folder / "output_summary.csv", debug.SUMMARY_COLUMNS) as summary:
            for feed in batched(stream, state.specs, 1):
                rounds += 1
                origin = dict(zip(origin_names, float_session.run(origin_names, feed)))
                dequant = dict(zip(dequant_names, quant_session.run(dequant_names, feed)))
                for name in outputs:
                    summary.writerow([rounds, name, debug.summary(dequant[name], origin[name])[-1]])
                if full:
                    with debug.csv_file(folder / f"round_{rounds}.csv", debug.ROUND_COLUMNS) as writer:
                        for t in activations:
                            writer.writerows(debug.tensor_rows(t, origin[t.tensor], dequant[t.dequant]))
                        writer.writerows(weights)
        state.engine.passes.append(DataPass("debug_reports", "float and quantized models", rounds,
                                            time.perf_counter() - start, True))
        return rounds

    def describe(self, report: DebugReport) -> list[str]:
        what = f"{report.rounds} rounds" if report.rounds else "weights only"
        return [(f"  debug reports: {report.tensors} tensors, {what}, in {report.folder} "
                 f"(output_summary.csv, round_*.csv, quant_param.csv), {report.seconds:.1f} s")]
