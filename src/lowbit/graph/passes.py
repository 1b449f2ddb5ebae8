"""Graph passes that prepare a float model for quantization.

They never change what the model computes (up to float rounding); they put it in the
form that runtimes execute in int8, so that quantization sees the same tensors:

1. every node and value gets a name (reports and skip_quant_node need them);
2. weights stored in Constant nodes (PP-OCR, many exporters) become initializers;
3. constant subgraphs are folded (shape arithmetic that torch's TorchScript exporter
   emits for "same" padding becomes plain constants);
4. BatchNormalization is folded into the Conv, ConvTranspose or Gemm before it, and a
   zero Pad into the Conv after it: the folded weight is what a runtime executes, so
   it is what gets quantized, and no float Pad is left between two int8 ops;
   ``Conv * a + b`` with one number each is folded the same way, and so is an Add of
   one value per output channel after a Conv or ConvTranspose (a bias that paddle2onnx
   writes apart, before the BatchNormalization; :mod:`lowbit.graph.fusions`);
   HardSwish / HardSigmoid written out as Add-Clip-Mul-Div become single ops, so the
   large intermediate ``x * relu6(x + 3)`` is not quantized on its own;
5. unused nodes go, types and shapes are inferred, nodes are sorted.

Node names are the user's: skip lists, per-node settings and every report name nodes as
the float model does. A fused node keeps the name of the node of its own op type that it
replaces (a Conv folded with its BatchNormalization stays the Conv's name).

Folding and fusion rules come from onnxscript's optimizer and rewriter, which work on
the same onnx_ir graph, rather than being written again here.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer
import onnxscript.rewriter
from onnxscript.rewriter.rules import common as rules

from . import fusions

FOLDING_RULES = (
    fusions.conv_bias_add_rule,
    fusions.conv_transpose_bias_add_rule,
    rules.fuse_batchnorm_into_conv_rule,
    rules.fuse_batchnorm_into_conv_transpose_rule,
    rules.fuse_batchnorm_into_gemm_rule,
    # either operand order: paddle2onnx writes PP-LCNet's learnable affine blocks as Mul(scale, conv) + offset
    *rules.conv_affine_fusion_rule.commute(),
    rules.normalize_pad_format_conv_rule,
    rules.fuse_pad_into_conv_rule,
)


def _activation_rules(model: ir.Model) -> list:
    """HardSigmoid fusion at any opset; HardSwish exists from opset 14 on."""
    opset = model.opset_imports.get("", 0)
    return [rule for rule in rules.fuse_hardswish_rules().rules
            if opset >= 14 or "HardSwish" not in rule.name]


def _fold_constant_of_shape(node: ir.Node) -> bool | None:
    # onnxscript keeps ConstantOfShape to avoid growing files; here it feeds pads.
    return True if node.op_type == "ConstantOfShape" else None


def prepare(model: ir.Model) -> ir.Model:
    """Name, lift, fold and infer, as the module docstring lists."""
    model = ir.passes.Sequential(
        common_passes.NameFixPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
    )(model).model
    onnxscript.optimizer.fold_constants(model, should_fold=_fold_constant_of_shape)
    # The fusion rules check ranks and constant inputs: give them initializers and shapes.
    model = _infer(model)
    _remember_names(model)
    model = onnxscript.rewriter.rewrite(model, pattern_rewrite_rules=[*_activation_rules(model), *FOLDING_RULES])
    _restore_names(model)
    return _infer(model)


_NAME_TAG = "lowbit.name."


def _remember_names(model: ir.Model) -> None:
    """Tag each node with its name under its op type; onnxscript's rewriter copies the tags of the
    nodes a rule replaces onto the nodes it makes (the first value of a key wins)."""
    for node in model.graph:
        node.metadata_props[_NAME_TAG + node.op_type] = node.name


def _restore_names(model: ir.Model) -> None:
    """Give each node made by a fusion the name of the replaced node of its own op type; drop the tags."""
    taken = {node.name for node in model.graph}
    for node in model.graph:
        original = node.metadata_props.get(_NAME_TAG + node.op_type)
        if original and original != node.name and original not in taken:
            taken.discard(node.name)
            node.name = original
            taken.add(original)
        for key in [k for k in node.metadata_props if k.startswith(_NAME_TAG)]:
            del node.metadata_props[key]


def _infer(model: ir.Model) -> ir.Model:
    return ir.passes.Sequential(
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.ShapeInferencePass(strict_mode=False),
        common_passes.TopologicalSortPass(),
        common_passes.NameFixPass(),
    )(model).model


def typed(model: ir.Model) -> ir.Model:
    """A model as read from a file, with constants as initializers and every tensor typed.

    Saved models carry types on their inputs and outputs only (see :mod:`lowbit.graph.saving`);
    the analysis reads the types of intermediate tensors.
    """
    return ir.passes.Sequential(
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.ShapeInferencePass(strict_mode=False),
    )(model).model


def unique_name(graph: ir.Graph, base: str) -> str:
    """A value or node name not yet used in the graph: base, or base_1, base_2, ..."""
    taken = graph.meta.get("lowbit.names")
    if taken is None:
        taken = {v.name for v in all_values(graph)} | {n.name for n in graph}
        graph.meta["lowbit.names"] = taken
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def all_values(graph: ir.Graph):
    """Every value of the graph: its inputs, initializers and node outputs."""
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from (v for v in node.outputs if v is not None)
