"""Load the float model and prepare its graph as runtimes execute it.

Reads: the model file (a float model: one already quantized is refused). Sets: the prepared
model, its size, its inputs, the calibration data and the data engine. The graph rules
(naming, constant folding, BatchNormalization and pad folding, HardSwish fusion) are
:func:`lowbit.graph.passes.prepare`'s; a graph that they or shape inference reject is a
one-line error.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx_ir as ir

from ..data.calibration import CalibrationData
from ..data.feeds import input_specs
from ..errors import LowbitError
from ..graph.loading import load_model
from ..graph.passes import prepare
from ..graph.saving import check_output_path
from ..pipeline.engine import DataEngine
from ..pipeline.passes import Pass
from ..pipeline.state import QuantState

# Ops that only a quantized model holds: Q/DQ pairs (lowbit's and onnxruntime's QDQ format), the operator
# format (QLinear*, ConvInteger, MatMulInteger), dynamic quantization, and ONNX Runtime's quantized contrib ops.
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
    "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "MatMulIntegerToFloat", "MatMulNBits", "MatMulBnb4",
    "GatherBlockQuantized", "QGemm", "QAttention", "QEmbedLayerNormalization",
})


class Prepare(Pass):
    name = "prepare"
    provides = ("model", "float_bytes", "specs", "data", "engine")

    def run(self, state: QuantState) -> None:
        check_output_path(state.output_path, state.model_path)
        model, state.float_bytes = load_model(state.model_path)
        refuse_quantized(model, state.model_path)
        try:
            state.model = prepare(model)
        except ir.passes.PassError as exc:  # shape inference or a folding rule rejected the graph
            cause = exc.__cause__ or exc
            first = str(cause).splitlines()[0] if str(cause) else ""
            raise LowbitError(f"{state.model_path}: the graph could not be prepared for quantization "
                              f"({type(cause).__name__}: {first})") from None
        state.specs = input_specs(state.model)
        state.data = CalibrationData(state.user_data, state.config, state.specs, state.note)
        state.engine = DataEngine(state.data, state.specs, state.config.calibrate_batch_size, state.progress,
                                  state.workers)
        if state.workers is not None and state.data.given and not state.data.on_files:
            state.note("workers: samples passed in memory are read in this process; give a folder or a data list "
                       "for the workers to read")


def refuse_quantized(model: ir.Model, path: str | Path) -> None:
    """A one-line error for a model that is already quantized: quantizing it again stacks a second rounding on
    the first and leaves the old integer ops in float between new Q/DQ pairs (slower and less accurate), which
    no user means to do; the usual cause is passing the output of an earlier run instead of the float model."""
    found = Counter(node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph)
                    if node.op_type in QUANTIZED_OPS or node.op_type.startswith("QLinear"))
    if found:
        ops = ", ".join(f"{op} {count}" for op, count in sorted(found.items(), key=lambda item: (-item[1], item[0])))
        raise LowbitError(f"{path} is already quantized ({ops}): lowbit quantizes float models; give it the float "
                          "model this one was made from (lowbit analyze FLOAT QUANTIZED compares the two)")
