"""Block reconstruction (``block_reconstruction=true``): the integers of each block of layers learned
together against the float block's output, after weight rounding and before bias correction
(which then leaves the learned layers' biases alone: their integers already answer for the shift).

Reads: the quantized model as weight rounding left it, the float weights and biases before the rewrite,
and the first ``block_reconstruction_samples`` calibration samples (whole inputs, read here: the blocks
learn on their activations, which no statistic summarises). Changes: the weight integers only. The rule
is :mod:`lowbit.recovery.reconstruction`'s. Searches (precisions, widths) build their candidates without
it, since it takes minutes; the model that is kept gets it.
"""

from __future__ import annotations

from ..errors import LowbitError
from ..pipeline.passes import Pass
from ..pipeline.state import QuantState
from ..recovery.reconstruction import ReconstructionReport, reconstruct
from .round_weights import asks_levels, rounding_layers


class ReconstructBlocks(Pass):
    name = "reconstruct_blocks"
    setting = "block_reconstruction"
    requires = ("plan", "float_layers")
    changes_model = True

    def applies(self, state: QuantState) -> bool:
        config = state.config
        if not config.block_reconstruction:
            return False
        if not state.data.given:
            raise LowbitError("block_reconstruction learns on calibration data, and none was given; "
                              "give --data FOLDER")
        if asks_levels(config):
            raise LowbitError("block_reconstruction learns up or down on the uniform grid; it does not combine "
                              "with weight_levels")
        if config.quant_type == "FULL_QUANT" and not state.plan.activations:
            return False
        self.layers = [layer for layer in rounding_layers(state) if layer.qmax > layer.qmin]
        return bool(self.layers)

    def run(self, state: QuantState) -> ReconstructionReport:
        if not state.data.rereadable:
            raise LowbitError("block_reconstruction reads the calibration samples once more, and the iterator "
                              "given as data cannot be read again: give a list or a folder")
        feeds, _ = state.data.open(state.config.block_reconstruction_samples)
        samples = list(feeds)
        biases = {name: layer.float_bias for name, layer in state.float_layers.items()
                  if layer.float_bias is not None}
        report = reconstruct(state.model, self.layers, samples, biases, state.config.block_reconstruction_iterations)
        state.reconstructed = {name for row in report.rows if row.kept for name in row.names}
        return report

    def describe(self, report: ReconstructionReport) -> list[str]:
        rows = report.rows
        if not rows:
            return []
        before = sum(row.error_before for row in rows) / len(rows)
        after = sum(min(row.error_after, row.error_before) for row in rows) / len(rows)
        layers = sum(len(row.names) for row in rows)
        judged = f"on {report.judged} held-back samples " if report.judged else ""
        return [f"  block reconstruction: {layers} layers in {len(rows)} blocks, {report.iterations} iterations "
                f"each on {report.samples - report.judged} samples; mean block output error "
                f"{judged}{before:.3g} -> {after:.3g} "
                f"({report.improved} of {len(rows)} blocks improved, the others keep their integers), "
                f"{report.seconds:.0f} s; per block: result.reconstruct_blocks"]
