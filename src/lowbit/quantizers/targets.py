"""Hardware presets (``target_device``): which ops run in int8 and how tensors are quantized.

* ``CPU`` (target_device unset): ONNX Runtime's CPU execution provider. Its fastest
  x86 int8 kernels take uint8 activations and int8 weights (U8S8, VNNI/AVX2), so
  activations are asymmetric uint8 per tensor, weights symmetric int8 per channel.
  Q/DQ pairs sit on the inputs *and outputs* of every int8 op, the pattern ORT's
  QDQ fusions (QLinearConv, QGemm, QLinearAdd, ...) look for.
* ``NVGPU``: TensorRT explicit quantization. Activations symmetric int8 per tensor,
  weights symmetric int8 per channel; Q/DQ only on the *inputs* of quantizable ops
  (TensorRT fuses the following DQ-free output into the producer and propagates
  scales through data-movement ops by itself).
* ``DSP``: Qualcomm Hexagon through SNPE: every tensor asymmetric uint8 per tensor,
  weights included; per-channel is not available there.

Mixed precision (:mod:`lowbit.quantizers.precision`): CPU runs int16 Q/DQ (int16
activations and weights; ONNX Runtime computes those ops in float between them) and
float16 where its CPU provider has a float16 kernel; TensorRT has no int16, so NVGPU
turns int16 into float16, which it runs for every op; the DSP takes 16-bit (uint16)
activations with its 8-bit weights (SNPE's A16W8).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .qparams import INT8, INT16, UINT8, UINT16, QuantScheme

# Ops with a weight input: the input index and the axis of the weight's output channels.
# Gemm's axis depends on transB and is resolved by the planner.
WEIGHTED_OPS = {"Conv": 0, "ConvTranspose": 1, "Gemm": None, "MatMul": -1}

# Activations that a runtime fuses into the op before them: their output carries the
# Q/DQ and the tensor in between stays float.
FUSABLE_ACTIVATIONS = frozenset({"Relu", "Clip"})
FUSION_PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add"})

# Ops that only move or select values: output and input share one scale and zero
# point (runtimes then run them on the integers directly, or drop the Q/DQ around them).
SAME_SCALE_OPS = frozenset({
    "MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize",
    "Pad", "Slice", "Split", "Identity", "DepthToSpace", "SpaceToDepth",
})

# Which inputs of an op carry data to quantize (the others are shapes, indices, axes ...).
DATA_INPUTS = {
    "Conv": (0,), "ConvTranspose": (0,), "Gemm": (0, 1), "MatMul": (0, 1),
    "Add": (0, 1), "Mul": (0, 1), "Concat": None,  # None: every input
    "AveragePool": (0,), "GlobalAveragePool": (0,),
}


@dataclass(frozen=True)
class Target:
    name: str
    summary: str
    activation: QuantScheme
    weight: QuantScheme
    quantize_outputs: bool
    op_types: frozenset[str]
    activation16: QuantScheme | None = None  # int16 inputs (None: the target has no int16)
    weight16: QuantScheme | None = None  # weights of int16 nodes (None: they keep the 8-bit scheme)
    all_float16: bool = False  # runs every op in float16 (else: those with an ONNX Runtime CPU kernel)

    def with_symmetric_activations(self, symmetric: bool) -> Target:
        """The preset with symmetric activations (signed, zero point 0: ONNX Runtime's S8S8) or asymmetric ones
        (unsigned, zero point anywhere), as ``asymmetric`` asks."""
        def scheme(s: QuantScheme | None) -> QuantScheme | None:
            if s is None or s.symmetric == symmetric:
                return s
            signed = {UINT8: INT8, UINT16: INT16}.get(s.qtype, s.qtype) if symmetric else \
                {INT8: UINT8, INT16: UINT16}.get(s.qtype, s.qtype)
            return QuantScheme(signed, symmetric, s.axis, narrow_range=False)
        return replace(self, activation=scheme(self.activation), activation16=scheme(self.activation16))

    def data_inputs(self, op_type: str, num_inputs: int) -> tuple[int, ...]:
        indices = DATA_INPUTS.get(op_type, (0,))
        return tuple(range(num_inputs)) if indices is None else tuple(i for i in indices if i < num_inputs)


_COMPUTE = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_ORT_INT8 = _COMPUTE | {"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool"} | SAME_SCALE_OPS

TARGETS = {
    "CPU": Target(
        "CPU", "ONNX Runtime CPU: uint8 asymmetric activations, int8 symmetric per-channel weights, "
        "Q/DQ on inputs and outputs",
        activation=QuantScheme(UINT8, symmetric=False),
        weight=QuantScheme(INT8, symmetric=True, narrow_range=True),
        quantize_outputs=True,
        op_types=_ORT_INT8,
        activation16=QuantScheme(INT16, symmetric=False),
        weight16=QuantScheme(INT16, symmetric=True, narrow_range=True),
    ),
    "NVGPU": Target(
        "NVGPU", "TensorRT explicit quantization: int8 symmetric activations per tensor, int8 symmetric "
        "per-channel weights, Q/DQ on op inputs only",
        activation=QuantScheme(INT8, symmetric=True, narrow_range=True),
        weight=QuantScheme(INT8, symmetric=True, narrow_range=True),
        quantize_outputs=False,
        op_types=_COMPUTE | {"Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool"},
        all_float16=True,
    ),
    "DSP": Target(
        "DSP", "SNPE / Hexagon DSP: uint8 asymmetric per-tensor activations and weights",
        activation=QuantScheme(UINT8, symmetric=False),
        weight=QuantScheme(UINT8, symmetric=False),
        quantize_outputs=True,
        op_types=_ORT_INT8,
        activation16=QuantScheme(UINT16, symmetric=False),
    ),
}
