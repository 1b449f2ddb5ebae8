"""How many bits each weight gets: ``bit_num`` for all, or the mixed-bit search (``bit_num=0``).

Reads: the weight-only plan, and the probe when there is calibration data. Sets: the
width per weight. The search (errors per width, the budget ``init_scale``, ``auto_tune``)
is :mod:`lowbit.search.mixed_bits`'s; with data, every candidate runs in the data engine.
"""

from __future__ import annotations

from tqdm import tqdm

from ..pipeline.passes import Pass
from ..pipeline.state import QuantState
from ..search.mixed_bits import (
    LayerBits,
    MixedBitReport,
    OutputProbe,
    allocate,
    output_errors,
    shares_of,
    tune_init_scale,
    weight_errors,
    widths,
)


class ChooseWidths(Pass):
    name = "choose_widths"
    requires = ("plan", "weight_options")
    provides = ("bits",)

    def run(self, state: QuantState) -> MixedBitReport | None:
        config, plan = state.config, state.plan
        if config.bit_num != 0:
            state.bits = {name: config.bit_num for name in plan.tensors}
            return None
        choices = widths(state.weight_options.opset21)
        if state.probe is None:
            errors = weight_errors(plan, choices)
            state.bits = allocate(errors, shares_of(plan), config.init_scale, choices)
            return _report(plan, config.init_scale, "weights", errors, state.bits)
        probe = state.probe

        def score(session, overrides):
            return state.engine.score(session, probe.samples, probe.outputs, probe.references, overrides)

        output_probe = OutputProbe(state.model, plan, score, probe.input_means)
        with tqdm(total=len(plan.tensors) * (len(choices) - 1), desc="measuring layer errors", unit="run",
                  disable=None if state.progress else True) as bar:
            errors = output_errors(plan, output_probe, choices, step=lambda: bar.update(1))
        where = f"model outputs on {len(probe.samples)} calibration samples"
        if config.auto_tune:
            init_scale, state.bits, cosine, tries = tune_init_scale(plan, output_probe, errors, choices)
            report = _report(plan, init_scale, where, errors, state.bits)
            report.auto_tuned, report.cosine, report.tries = True, cosine, tries
            return report
        state.bits = allocate(errors, shares_of(plan), config.init_scale, choices)
        return _report(plan, config.init_scale, where, errors, state.bits)

    def describe(self, report: MixedBitReport | None) -> list[str]:
        if report is None:
            return []
        how = "auto_tune chose" if report.auto_tuned else "with"
        lines = [f"  mixed bit: {how} init_scale={report.init_scale:.4g}, errors measured on {report.measured_on}"]
        for layer in sorted(report.layers, key=lambda layer: -layer.elements)[:12]:
            errors = ", ".join(f"{bits}b {error:.3g}" for bits, error in sorted(layer.errors.items()))
            lines.append(f"    {layer.bits:2d} bits  {layer.elements:>9}  {layer.nodes[0]}  (error {errors})")
        if len(report.layers) > 12:
            lines.append(f"    ... {len(report.layers) - 12} smaller weights (result.mixed_bits lists them all)")
        return lines


def _report(plan, init_scale: float, where: str, errors, bits) -> MixedBitReport:
    layers = [LayerBits(name, tuple(node.name for node, _ in tensor.readers), tensor.size, bits[name],
                        errors[name]) for name, tensor in plan.tensors.items()]
    return MixedBitReport(init_scale, where, layers)
