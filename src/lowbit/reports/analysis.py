"""The analysis as files: ``REPORT.html`` (one self-contained page) and ``REPORT.json`` (the same figures).

The JSON holds every number the page shows, for scripts and for comparing two runs; the
page adds the plots (:mod:`.plots`) and sortable tables. Both appear complete or not at
all. matplotlib and jinja2 come with ``pip install lowbit[report]``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from ..analysis.analyze import Analysis
from ..errors import LowbitError

FIGURES = 6  # histograms and channel-range plots drawn for this many of the first-ranked nodes
BARS = 25  # nodes in the sensitivity bar chart


def report_paths(html: str | Path) -> tuple[Path, Path]:
    html = Path(html)
    return html, html.with_suffix(".json")


def check_report_path(html: str | Path) -> None:
    """Fail before any work when the report cannot be written (and when its libraries are missing)."""
    path = Path(html)
    if path.suffix.lower() not in (".html", ".htm"):
        raise LowbitError(f"report {path}: name the HTML file (REPORT.html); REPORT.json is written beside it")
    if not path.parent.is_dir():
        raise LowbitError(f"report folder does not exist: {path.parent}")
    try:
        import jinja2  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise LowbitError(f"the HTML report needs {exc.name}: pip install 'lowbit[report]'") from None


def as_json(analysis: Analysis) -> dict[str, Any]:
    """Every figure of the analysis as plain JSON values (infinite SQNR as null: exact agreement)."""
    greedy = dict(analysis.suggestion.curve)
    return {
        "float_model": str(analysis.float_path),
        "quantized_model": str(analysis.quantized_path),
        "samples": analysis.samples,
        "outputs": analysis.outputs,
        "metric": "model-output error: 1 - cosine against the float model, mean over samples and outputs",
        "output_error": {"quantized": analysis.quantized_error, "simulated": analysis.simulated_error},
        "seconds": round(analysis.seconds, 2),
        "runs": analysis.runs,
        "notes": analysis.notes,
        "nodes": [{"rank": rank, "name": n.name, "op_type": n.op_type, "error_alone": n.alone,
                   "error_without": n.without, "gain": n.gain,
                   "error_float_with_ranks_above": greedy.get(n.name), "activations": list(n.activations),
                   "weights": list(n.weights)} for rank, n in enumerate(analysis.nodes, start=1)],
        "tensors": [_tensor(t) for t in analysis.tensors],
        "weights": [{"node": w.node, "tensor": w.tensor, "cosine": w.cosine, "sqnr_db": _number(w.sqnr_db),
                     "clip_rate": w.clip_rate, "channel_min": w.channel_min, "channel_max": w.channel_max,
                     "range_min": w.range_min, "range_max": w.range_max} for w in analysis.weights],
        "suggestion": {
            "nodes": analysis.suggestion.nodes,
            "error_left_float": [{"node": name, "error": error} for name, error in analysis.suggestion.curve],
            "skip_quant_node": analysis.suggestion.skip_quant_node if analysis.suggestion.nodes else "",
            "node_config": analysis.suggestion.node_config,
            "precisions": [{"node": name, "int8": p.int8, "int16": p.int16, "float32": p.float32, "qtype": p.qtype}
                           for name, p in analysis.suggestion.precisions.items()],
        },
    }


def format_analysis(analysis: Analysis, nodes: int = 10) -> str:
    """The terminal summary: the error, the first-ranked nodes, and the suggestion."""
    lines = [f"output error (1 - cosine): {analysis.quantized_error:.4g} in ONNX Runtime, "
             f"{analysis.simulated_error:.4g} simulated; {analysis.samples} samples, {len(analysis.nodes)} "
             f"quantized nodes, {analysis.seconds:.1f} s",
             f"{'rank':>4}  {'error alone':>11}  {'without it':>11}  {'gain':>10}  {'+ ranks above':>13}  node"]
    together = dict(analysis.suggestion.curve)  # the error with this node and the ranks above it float
    for rank, node in enumerate(analysis.nodes[:nodes], start=1):
        above = f"{together[node.name]:>13.4g}" if node.name in together else " " * 13
        lines.append(f"{rank:>4}  {node.alone:>11.4g}  {node.without:>11.4g}  {node.gain:>10.4g}  {above}  "
                     f"{node.name} ({node.op_type})")
    suggestion = analysis.suggestion
    if suggestion.nodes:
        error = suggestion.curve[len(suggestion.nodes) - 1][1]
        lines.append(f"leaving {len(suggestion.nodes)} float gives {error:.4g}: {suggestion.skip_quant_node}")
    else:
        lines.append("no node's quantization costs measurable accuracy on these samples")
    lines.extend(f"note: {note}" for note in analysis.notes)
    return "\n".join(lines)


def _tensor(row) -> dict[str, Any]:
    entry = {"name": row.name, "producer": row.producer, "op_type": row.op_type,
             "cosine": row.computed.cosine, "sqnr_db": _number(row.computed.sqnr_db)}
    if row.rounded is not None:
        edges, counts = row.activation.plot_histogram()
        low, high = row.activation.representable
        entry.update({"rounded_cosine": row.rounded.cosine, "rounded_sqnr_db": _number(row.rounded.sqnr_db),
                      "clip_rate": row.activation.clip_rate, "range": [low, high],
                      "float_range": [float(row.activation.histogram.min), float(row.activation.histogram.max)],
                      "histogram": {"edges": edges, "counts": counts}})
    return entry


def _number(value: float) -> float | None:
    return None if math.isinf(value) or math.isnan(value) else value


def write_report(analysis: Analysis, html_path: str | Path) -> tuple[Path, Path]:
    """Write REPORT.html and REPORT.json; returns their paths."""
    html_path, json_path = report_paths(html_path)
    check_report_path(html_path)
    figures = as_json(analysis)
    page = _render(figures)
    _write_atomically(json_path, json.dumps(figures, indent=1))
    _write_atomically(html_path, page)
    return html_path, json_path


def _render(figures: dict[str, Any]) -> str:
    import jinja2

    from . import plots

    nodes, tensors = figures["nodes"], figures["tensors"]
    suggested = set(figures["suggestion"]["nodes"])
    order = {t["producer"]: i for i, t in enumerate(tensors)}
    images = {
        "graph": plots.error_along_graph([_db(t["sqnr_db"]) for t in tensors],
                                         [_db(t["rounded_sqnr_db"]) if "rounded_sqnr_db" in t else None
                                          for t in tensors],
                                         [order[n] for n in suggested if n in order]),
        "gains": plots.node_gains([n["name"] for n in nodes[:BARS]], [n["gain"] for n in nodes[:BARS]],
                                  [n["error_alone"] for n in nodes[:BARS]]),
    }
    curve = figures["suggestion"]["error_left_float"]
    if curve:
        images["curve"] = plots.suggestion_curve(figures["output_error"]["simulated"], [c["error"] for c in curve])
    details = _details(figures)
    environment = jinja2.Environment(loader=jinja2.PackageLoader("lowbit.reports", "templates"),
                                     autoescape=True, trim_blocks=True, lstrip_blocks=True)
    environment.filters["num"] = _format
    return environment.get_template("analysis.html.j2").render(
        report=figures, images=images, details=details,
        node_config=json.dumps(figures["suggestion"]["node_config"], indent=2))


def _details(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """For the first-ranked nodes: the histograms of the activations they read, their weights' channel ranges."""
    from . import plots

    tensors = {t["name"]: t for t in figures["tensors"]}
    weights = {w["node"]: w for w in figures["weights"]}
    details = []
    for node in figures["nodes"][:FIGURES]:
        images = []
        for name in node["activations"]:
            t = tensors.get(name)
            if t is not None and "histogram" in t:
                images.append(plots.histogram(name, t["histogram"]["edges"], t["histogram"]["counts"],
                                              *t["range"], t["clip_rate"]))
        w = weights.get(node["name"])
        if w is not None:
            images.append(plots.channel_ranges(w["tensor"], w["channel_min"], w["channel_max"], w["range_min"],
                                               w["range_max"]))
        details.append({"node": node, "images": images})
    return details


def _db(value: float | None) -> float:
    return math.inf if value is None else value


def _format(value: Any, digits: int = 4) -> str:
    if value is None:
        return "exact"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _write_atomically(path: Path, text: str) -> None:
    descriptor, staged = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staged, 0o666 & ~umask)  # mkstemp makes it private; the report is an ordinary file
        os.replace(staged, path)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise
