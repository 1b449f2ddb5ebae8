"""How far layer-wise rounding can take 4-bit weights on EfficientNet-Lite0 (issue 18's 4-bit goals).

    python bench/bound_4bit_layerwise.py [VARIANT]   # EfficientNet-Lite0 by default; about a minute

The 1x1 convolutions and the classifier get 4-bit symmetric weights (levels -7..7); the stem,
the depthwise convolutions and every activation stay float, so the figures isolate what the
pointwise weights' grid and rounding cost. Each grid is tried with round-to-nearest and with
lowbit's GPTQ (``recovery.gptq.gptq_round``, 1% damping), with a scale per output
channel or per group of 64 / 32 / 16 input channels (what opset 21's blocked DequantizeLinear
stores). Each scale is clipped for the least squared weight error. The second moments come
from 64 calibration crops (other images), or, with ``--oracle``, from 150 of the evaluation
crops themselves (which are then among the 300 it is judged on): a bound on what better
calibration data could give. Prints top-1 agreement and 1 - cosine against the float model on
the 300 held-out crops of bench/recovery.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import run, zoo
from lowbit.graph.query import attribute, constant_array
from lowbit.recovery.gptq import gptq_round
from lowbit.recovery.layers import as_rows, from_rows

LEVEL = 7  # int4, symmetric
MOMENT_PIXELS = 512  # pixels a sample contributes to a layer's second moment


def pointwise_layers(model: ir.Model) -> list[ir.Node]:
    """The 1x1 convolutions and the Gemms with a constant weight."""
    return [node for node in model.graph if node.op_type in ("Conv", "Gemm") and len(node.inputs) > 1
            and constant_array(node.inputs[1]) is not None
            and (node.op_type == "Gemm" or (list(attribute(node, "kernel_shape", [])) == [1, 1]
                                           and attribute(node, "group", 1) == 1))]


def second_moments(model: onnx.ModelProto, names: list[str], samples) -> dict[str, np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    sums, counts = {n: 0.0 for n in names}, {n: 0 for n in names}
    for x in samples:
        for name, value in zip(names, session.run(names, {"input": x[np.newaxis]})):
            rows = value[0].reshape(value.shape[1], -1) if value.ndim == 4 else value.reshape(-1, value.shape[-1]).T
            if rows.shape[1] > MOMENT_PIXELS:
                rows = rows[:, rng.choice(rows.shape[1], MOMENT_PIXELS, replace=False)]
            rows = rows.astype(np.float64)
            sums[name] = sums[name] + rows @ rows.T
            counts[name] += rows.shape[1]
    return {n: sums[n] / counts[n] for n in names}


def clipped_scales(weight: np.ndarray, group: int | None) -> np.ndarray:
    """A scale per output row and group of columns, the clip ratio (0.5-1 of the max) with least squared error."""
    scales = np.empty_like(weight)
    step = weight.shape[1] if group is None else group
    for start in range(0, weight.shape[1], step):
        block = weight[:, start:start + step]
        peak = np.abs(block).max(1, keepdims=True) + 1e-12
        best_error, best_scale = None, None
        for ratio in np.linspace(0.5, 1.0, 26):
            scale = ratio * peak / LEVEL
            error = ((np.clip(np.round(block / scale), -LEVEL, LEVEL) * scale - block) ** 2).sum(1, keepdims=True)
            if best_error is None:
                best_error, best_scale = error, scale
            else:
                better = error < best_error
                best_error, best_scale = np.where(better, error, best_error), np.where(better, scale, best_scale)
        scales[:, start:start + step] = best_scale
    return scales


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", nargs="?", type=int, default=0)
    parser.add_argument("--oracle", action="store_true", help="second moments from 150 of the evaluation crops")
    args = parser.parse_args()
    case = run.efficientnet_case(256, 20, args.variant)
    case.evaluation = case.evaluation[np.random.default_rng(1).permutation(len(case.evaluation))[:300]]
    model = onnx.load(str(case.model))
    layers = pointwise_layers(ir.from_proto(model))
    inputs = sorted({node.inputs[0].name for node in layers})
    moments = second_moments(model, inputs, case.evaluation[:150] if args.oracle else case.calib[:64])
    reference = run.outputs(case.model, case)
    print(f"{case.name}: {len(layers)} layers at 4 bits, second moments from "
          f"{'150 evaluation crops (oracle)' if args.oracle else '64 calibration crops'}")
    for group in (None, 64, 32, 16):
        for method in ("nearest", "GPTQ"):
            changed = onnx.ModelProto()
            changed.CopyFrom(model)
            initializers = {i.name: i for i in changed.graph.initializer}
            for node in layers:
                weight = constant_array(node.inputs[1])
                rows = as_rows(node, weight)  # (1, outputs, inputs)
                scales = clipped_scales(rows[0], group)[np.newaxis]
                integers = (np.clip(np.round(rows / scales), -LEVEL, LEVEL) if method == "nearest" else
                            gptq_round(rows, moments[node.inputs[0].name][np.newaxis], scales, np.zeros_like(scales),
                                       -LEVEL, LEVEL))
                new = from_rows(node, integers * scales, weight.shape).astype(np.float32)
                initializers[node.inputs[1].name].CopyFrom(numpy_helper.from_array(new, node.inputs[1].name))
            session = ort.InferenceSession(changed.SerializeToString(), providers=["CPUExecutionProvider"])
            got = np.concatenate([session.run(None, {"input": x[np.newaxis]})[0] for x in case.evaluation])
            agreement = np.mean(reference.argmax(-1) == got.argmax(-1))
            error = 1 - np.mean([zoo.cosine(a, b) for a, b in zip(reference, got)])
            where = "per channel" if group is None else f"groups of {group}"
            print(f"  {where:12} {method:8} agreement {agreement:.3f}  1 - cosine {error:.4f}", flush=True)


if __name__ == "__main__":
    main()
