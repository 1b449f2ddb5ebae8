"""The analysis report (``report``): ``lowbit analyze`` on the model this job wrote.

Reads: the saved model, the float model's file and the calibration data (its first
``report_samples`` samples). Sets nothing; writes REPORT.html and REPORT.json
(:mod:`lowbit.analysis`, :mod:`lowbit.reports.analysis`). The report path and its
libraries are checked before any work (:class:`CheckReportPath`), so a job does not
quantize for minutes and then fail on a folder that does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..analysis.analyze import Analysis, analyze
from ..config.precision import EC
from ..errors import LowbitError
from ..pipeline.engine import DataPass
from ..pipeline.passes import Pass
from ..pipeline.state import QuantState
from ..reports.analysis import check_report_path, write_report


@dataclass(frozen=True)
class AnalysisReport:
    html: Path
    json: Path
    analysis: Analysis


class CheckReportPath(Pass):
    name = "check_report_path"
    requires = ("data",)

    def applies(self, state: QuantState) -> bool:
        return state.config.report is not None

    def run(self, state: QuantState) -> None:
        check_report_path(state.config.report)
        if not state.data.given:
            raise LowbitError("report: the analysis needs calibration data; give --data FOLDER")
        if any(EC in entry.inputs.values() for entry in (state.config.node_config or {}).values()):
            raise LowbitError("report: the analysis does not take error-compensated (ec) nodes yet; write the "
                              "report of the model without ec, or leave report unset")
        if state.config.quant_type == "WEIGHT_QUANT" and state.config.matmul_nbits:
            raise LowbitError("report: the analysis reads DequantizeLinear weights, and matmul_nbits=true writes "
                              "MatMulNBits; analyse the model written without it")


class WriteAnalysisReport(Pass):
    name = "analysis_report"
    setting = "report"
    requires = ("data",)

    def applies(self, state: QuantState) -> bool:
        return state.config.report is not None

    def run(self, state: QuantState) -> AnalysisReport | None:
        if not state.plan.quantized_nodes:
            state.note("report: no node is quantized, so there is nothing to analyse (no report written)")
            return None
        if not state.data.rereadable:
            state.note("report: the calibration data was an iterator, read once already; "
                       "pass a list or a folder for the report (no report written)")
            return None
        analysis = analyze(state.model_path, state.output_path, state.user_data, config=state.config,
                           samples=state.config.report_samples, warn=state.note,
                           float_model=state.float_reference())
        html, json_path = write_report(analysis, state.config.report)
        state.engine.passes.append(DataPass("analysis_report", "switched model", analysis.samples,
                                            analysis.seconds, True))
        return AnalysisReport(html, json_path, analysis)

    def describe(self, report: AnalysisReport | None) -> list[str]:
        if report is None:
            return []
        analysis = report.analysis
        suggested = analysis.suggestion.nodes
        first = f"; leave float first: {', '.join(suggested)}" if suggested else ""
        return [f"  report: {report.html} and {report.json.name} ({analysis.samples} samples, "
                f"{analysis.seconds:.1f} s){first}"]
