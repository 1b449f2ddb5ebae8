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
    kind = "nodes with integer weights" if result.weights else "int8 nodes"
    lines = [
        f"wrote {result.output_path} (target {result.target})",
        f"  size: {_mb(result.float_bytes)} -> {_mb(result.output_bytes)} ({result.size_ratio:.2f}x)",
        f"  {kind}: {len(result.quantized_nodes)} ("
        + ", ".join(f"{op} {n}" for op, n in quantized.most_common()) + ")",
        f"  float nodes: {len(result.float_nodes)}"
        + (" (" + ", ".join(f"{op} {n}" for op, n in kept.most_common()) + ")" if kept else ""),
    ]
    reasons = Counter(n.reason for n in result.float_nodes)
    for reason, count in reasons.most_common():
        lines.append(f"    {count} x {reason}")
    t = result.timings
    lines += _weight_lines(result)
    if result.weight_rounding is not None and result.weight_rounding.layers:
        wr = result.weight_rounding
        lines.append(f"  weight rounding: GPTQ on {wr.layers} layers from {wr.samples} samples, mean layer output "
                     f"error {wr.error_nearest:.3g} (nearest) -> {wr.error_compensated:.3g}, {wr.seconds:.1f} s")
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
    if result.weights:
        lines.append(f"  total {sum(t.values()):.1f} s")
    elif result.calibration_samples:
        lines.append(f"  calibration: {result.calibration_samples} samples, {len(result.tensors)} tensors, "
                     f"{t.get('calibrate', 0):.1f} s; total {sum(t.values()):.1f} s")
    else:
        lines.append(f"  no calibration (activation scales are computed at run time); total {sum(t.values()):.1f} s")
    return "\n".join(lines)


def _weight_lines(result: QuantizeResult) -> list[str]:
    """Weight-only quantization: storage per width, the mixed-bit choice, the output cosine."""
    if not result.weights:
        return []
    elements = sum(w.elements for w in result.weights)
    by_kind = Counter()
    for w in result.weights:
        by_kind[(w.bits, w.storage)] += w.elements
    average = sum(w.bits * w.elements for w in result.weights) / elements
    lines = [f"  weights: {len(result.weights)} tensors, {elements} values, average {average:.2f} bits ("
             + ", ".join(f"{bits} bits as {storage}: {100 * n / elements:.1f}%"
                         for (bits, storage), n in sorted(by_kind.items())) + ")"]
    mixed = result.mixed_bits
    if mixed is not None:
        how = "auto_tune chose" if mixed.auto_tuned else "with"
        lines.append(f"  mixed bit: {how} init_scale={mixed.init_scale:.4g}, errors measured on {mixed.measured_on}")
        for layer in sorted(mixed.layers, key=lambda layer: -layer.elements)[:12]:
            errors = ", ".join(f"{bits}b {error:.3g}" for bits, error in sorted(layer.errors.items()))
            lines.append(f"    {layer.bits:2d} bits  {layer.elements:>9}  {layer.nodes[0]}  (error {errors})")
        if len(mixed.layers) > 12:
            lines.append(f"    ... {len(mixed.layers) - 12} smaller weights (result.mixed_bits lists them all)")
    if result.output_cosine is not None:
        lines.append(f"  output cosine similarity to the float model: {result.output_cosine:.5f} "
                     f"(on {result.output_cosine_samples} calibration samples)")
    return lines
