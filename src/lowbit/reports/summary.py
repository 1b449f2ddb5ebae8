"""The plain-text summary printed at the end of ``lowbit quantize``: a header, then each pass's lines."""

from __future__ import annotations

from collections import Counter

from .result import QuantizeResult


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def format_summary(result: QuantizeResult) -> str:
    quantized = Counter(n.op_type for n in result.quantized_nodes)
    kept = Counter(n.op_type for n in result.float_nodes)
    precisions = Counter(n.precision for n in result.quantized_nodes if n.precision)
    mixed = bool(set(precisions) - {"int8"})
    kind = "nodes with integer weights" if result.weights else "quantized nodes" if mixed else "int8 nodes"
    lines = [
        f"wrote {result.output_path} (target {result.target})",
        f"  size: {_mb(result.float_bytes)} -> {_mb(result.output_bytes)} ({result.size_ratio:.2f}x)",
        f"  {kind}: {len(result.quantized_nodes)} ("
        + ", ".join(f"{op} {n}" for op, n in quantized.most_common()) + ")",
    ]
    if mixed:
        lines.append("    by precision: " + ", ".join(f"{p} {n}" for p, n in precisions.most_common()))
    lines.append(f"  float nodes: {len(result.float_nodes)}"
                 + (" (" + ", ".join(f"{op} {n}" for op, n in kept.most_common()) + ")" if kept else ""))
    for reason, count in Counter(n.reason for n in result.float_nodes).most_common():
        lines.append(f"    {count} x {reason}")
    for section in result.passes:
        lines += section.lines
    total = sum(result.timings.values())
    runs = [p for p in result.data_passes if p.over_calibration_data]
    if runs:
        if result.tensors:
            lines.append(f"  calibration: {result.calibration_samples} samples, {len(result.tensors)} tensors, "
                         f"{result.timings.get('calibrate', 0):.1f} s")
        lines.append(f"  data: {len(runs)} run{'s' if len(runs) > 1 else ''} over the calibration data: "
                     + ", ".join(_grouped(runs)))
        lines.append(f"  total {total:.1f} s")
    elif not result.weights:
        lines.append(f"  no calibration (activation scales are computed at run time); total {total:.1f} s")
    else:
        lines.append(f"  total {total:.1f} s")
    return "\n".join(lines)


def _grouped(runs) -> list[str]:
    """Each run as "what (model, N samples)"; a pass's runs in stages (GPTQ below 8 bits) as one entry."""
    entries: list[tuple[str, str, int, int]] = []  # (what, model, samples, runs)
    for run in runs:
        what = run.what.split(" (stage ")[0]
        if entries and entries[-1][:3] == (what, run.model, run.samples) and run.what != what:
            entries[-1] = (*entries[-1][:3], entries[-1][3] + 1)
        else:
            entries.append((what, run.model, run.samples, 1))
    return [f"{what} ({model}, {samples} samples{f', {count} stages' if count > 1 else ''})"
            for what, model, samples, count in entries]

