"""The quantized model and the float model in one session, each layer's two inputs joined side by side.

Below 8 bits, what reaches a layer in the quantized model is not what reaches it in the
float model: every layer rounded before it has moved it, in the same direction on every
sample. GPTQ rounding a layer toward its own float weight, ``W x~ ~ Q x~``, leaves that
drift in place; rounding toward the float model's output, ``W x_f ~ Q x~``, takes out what a
linear map of the layer's input can (Li et al., 2025, "GPTAQ"). That needs the cross moment
``mean(p_f p~^T)`` of the two models' patches at the same position of the same sample, so
both models must run on each sample together: this module builds that one model.

The float model is added under the prefix ``float::`` and reads the same graph inputs;
for each layer, a *joined* tensor puts the quantized model's input and the float
model's input next to each other along the channel axis,
group by group, so that one :class:`~lowbit.calibration.layer_inputs.LayerInputObserver`
with the layer's own window sees, per group, a patch twice as long: the quantized
patch's values, then the float one's. Its second moment holds ``mean(p~ p~^T)`` and
``mean(p_f p~^T)`` as blocks (:func:`lowbit.recovery.gptq.toward_float_output` reads them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx.compose
from onnx import helper, numpy_helper

PREFIX = "float::"
JOINED = "paired::"


@dataclass(frozen=True)
class InputPair:
    """One layer's input in both models, and how its patches are grouped."""

    quantized: str  # the layer's input in the quantized model
    reference: str  # the same layer's input in the float model (unprefixed)
    groups: int  # the Conv's groups (1 for a Gemm or MatMul)
    spatial: int  # the Conv's spatial axes (1 or 2); 0 for a Gemm or MatMul (channels last)

    @property
    def joined(self) -> str:
        """The name of the tensor the observer reads."""
        return f"{JOINED}{self.quantized}::{self.reference}::g{self.groups}"


def beside(reference: onnx.ModelProto) -> onnx.ModelProto:
    """The float model as :func:`paired_model` adds it: every name under ``float::``, its graph inputs read
    from the quantized model's (made once per job; each stage's paired model copies it)."""
    float_model = onnx.compose.add_prefix(reference, PREFIX)
    constants = {init.name for init in float_model.graph.initializer}
    inputs = [helper.make_node("Identity", [value.name[len(PREFIX):]], [value.name], name=f"{value.name}/Identity")
              for value in float_model.graph.input if value.name not in constants]
    nodes = list(float_model.graph.node)
    del float_model.graph.node[:]
    float_model.graph.node.extend(inputs + nodes)
    return float_model


def paired_model(quantized: onnx.ModelProto, float_model: onnx.ModelProto, pairs: list[InputPair]) -> onnx.ModelProto:
    """``quantized`` with ``float_model`` (:func:`beside`'s, same opset) beside it and each pair's joined tensor."""
    if not pairs:
        return quantized
    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    graph = model.graph
    graph.initializer.extend(float_model.graph.initializer)
    graph.node.extend(float_model.graph.node)
    have = {opset.domain for opset in model.opset_import}
    model.opset_import.extend(opset for opset in float_model.opset_import if opset.domain not in have)
    for pair in dict.fromkeys(pairs):
        _join(graph, pair)
    return model

def _join(graph: onnx.GraphProto, pair: InputPair) -> None:
    """Add the nodes that compute ``pair.joined``: per group, the quantized input's channels, then the float one's."""
    sources = [pair.quantized, PREFIX + pair.reference]
    name = pair.joined
    if pair.spatial == 0 or pair.groups == 1:
        graph.node.append(helper.make_node("Concat", sources, [name], name=f"{name}/Concat",
                                           axis=-1 if pair.spatial == 0 else 1))
        return
    # (N, C, *S) -> (N, G, C/G * |S|): concatenate the two group by group, then back to (N, 2C, *S)
    constants = {f"{name}/split_shape": [0, pair.groups, -1], f"{name}/first": [0], f"{name}/second": [1],
                 f"{name}/spatial": [2], f"{name}/end": [np.iinfo(np.int64).max], f"{name}/channels": [-1]}
    graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), k) for k, v in constants.items())
    grouped = [f"{name}/grouped{i}" for i in range(2)]
    for source, out in zip(sources, grouped):
        graph.node.append(helper.make_node("Reshape", [source, f"{name}/split_shape"], [out], name=f"{out}/Reshape"))
    shape, batch, spatial = f"{name}/shape", f"{name}/batch", f"{name}/spatial_shape"
    graph.node.extend([
        helper.make_node("Concat", grouped, [f"{name}/joined"], name=f"{name}/Concat", axis=2),
        helper.make_node("Shape", [pair.quantized], [shape], name=f"{shape}/Shape"),
        helper.make_node("Slice", [shape, f"{name}/first", f"{name}/second"], [batch], name=f"{batch}/Slice"),
        helper.make_node("Slice", [shape, f"{name}/spatial", f"{name}/end"], [spatial], name=f"{spatial}/Slice"),
        helper.make_node("Concat", [batch, f"{name}/channels", spatial], [f"{name}/merged_shape"],
                         name=f"{name}/merged_shape/Concat", axis=0),
        helper.make_node("Reshape", [f"{name}/joined", f"{name}/merged_shape"], [name], name=f"{name}/Reshape"),
    ])

