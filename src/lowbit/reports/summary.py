"""The plain-text summary printed at the end of ``lowbit quantize``."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..api import QuantizeResult


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def format_summary(result: QuantizeResult) -> str:
    quantized = Counter(n.op_type for n in result.quantized_nodes)
    kept = Counter(n.op_type for n in result.float_nodes)
    lines = [
        f"wrote {result.output_path} (target {result.target})",
        f"  size: {_mb(result.float_bytes)} -> {_mb(result.output_bytes)} ({result.size_ratio:.2f}x)",
        f"  int8 nodes: {len(result.quantized_nodes)} ("
        + ", ".join(f"{op} {n}" for op, n in quantized.most_common()) + ")",
        f"  float nodes: {len(result.float_nodes)}"
        + (" (" + ", ".join(f"{op} {n}" for op, n in kept.most_common()) + ")" if kept else ""),
    ]
    reasons = Counter(n.reason for n in result.float_nodes)
    for reason, count in reasons.most_common():
        lines.append(f"    {count} x {reason}")
    t = result.timings
    if result.bias_correction is not None and result.bias_correction.layers:
        bc = result.bias_correction
        lines.append(f"  bias correction: {bc.layers} layers on {bc.samples} samples, largest shift "
                     f"{bc.largest_shift:.4g}, {bc.seconds:.1f} s")
    search = result.search
    if search is not None:
        tuned = f", {search.tuned_tensors} tensors tuned per op" if search.tuned_tensors else ""
        if search.rows:
            lines.append(f"  activation ranges: search by {search.metric} on {search.samples} held-back samples, "
                         f"kept {search.chosen}{tuned}")
            for row in search.rows:
                mark = "*" if row.label == search.chosen else " "
                lines.append(f"   {mark} {row.label:<40} {row.score:.6g}")
        else:
            lines.append(f"  activation ranges: {search.chosen}{tuned}")
    if result.calibration_samples:
        lines.append(f"  calibration: {result.calibration_samples} samples, {len(result.tensors)} tensors, "
                     f"{t.get('calibrate', 0):.1f} s; total {sum(t.values()):.1f} s")
    else:
        lines.append(f"  no calibration (activation scales are computed at run time); total {sum(t.values()):.1f} s")
    return "\n".join(lines)
