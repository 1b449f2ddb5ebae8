"""Keep a few calibration samples and the float model's outputs on them, for weight-only quantization.

Reads: the plan. Needs (float model, first 16 samples): the samples themselves, the
float outputs, and, for the mixed-bit search, the per-channel means of the inputs of
correctable layers (with bias correction) and the second moments of the inputs of the
layers GPTQ will round (with weight_rounding=GPTQ or ADAROUND). Sets: the probe, which the
mixed-bit search and the final output check compare quantized models against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..calibration.observers import MeanObserver, OutputsObserver
from ..pipeline.engine import Request
from ..pipeline.passes import FLOAT, Pass, Samples
from ..pipeline.state import QuantState
from ..recovery.gptq import weight_only_layers
from ..recovery.layers import by_tensor, input_observer
from ..search.mixed_bits import bias_inputs

SAMPLES = 16  # calibration samples the weight-only mode measures output errors and cosine on


@dataclass
class Probe:
    samples: list[dict[str, np.ndarray]]
    outputs: list[str]
    references: list[list[np.ndarray]]  # per sample, the float outputs in the order of ``outputs``
    input_means: dict[str, np.ndarray] | None  # None: the search does not model bias correction
    second_moments: dict[str, np.ndarray] | None = None  # by weight name, its layer's input: the search rounds by GPTQ


class KeepProbe(Pass):
    name = "probe"
    requires = ("plan", "data")
    provides = ("probe",)

    def applies(self, state: QuantState) -> bool:
        return state.data.given

    def measures(self, state: QuantState) -> str:
        return FLOAT

    def samples(self, state: QuantState) -> Samples:
        return Samples(limit=SAMPLES)

    def requests(self, state: QuantState) -> list[Request]:
        graph = state.model.graph
        self.inputs = {spec.name: OutputsObserver() for spec in state.specs}
        self.outputs = {v.name: OutputsObserver() for v in graph.outputs if v.dtype == ir.DataType.FLOAT}
        mixed_with_correction = state.config.bit_num == 0 and state.config.bias_correction
        self.means = {name: MeanObserver(axis=1) for name in bias_inputs(state.plan)} if mixed_with_correction \
            else None  # NCHW channels, or Gemm's K
        self.moments, self.moment_keys = {}, {}
        if state.config.bit_num == 0 and state.config.weight_rounding in ("GPTQ", "ADAROUND"):
            for name, node in weight_only_layers(state.plan).items():
                shape = state.plan.tensors[name].array.shape
                self.moment_keys[name] = input_observer(node, shape, self.moments, order=2)
        return [Request(self.inputs), Request(self.outputs), *([Request(self.means)] if self.means else []),
                *(Request(observers) for observers in by_tensor(self.moments))]

    def run(self, state: QuantState) -> None:
        count = len(next(iter(self.inputs.values())).arrays)
        samples = [{name: observer.arrays[i] for name, observer in self.inputs.items()} for i in range(count)]
        references = [[observer.arrays[i] for observer in self.outputs.values()] for i in range(count)]
        means = None if self.means is None else {name: obs.mean() for name, obs in self.means.items()}
        moments = {name: self.moments[key].covariance() for name, key in self.moment_keys.items()} or None
        state.probe = Probe(samples, list(self.outputs), references, means, moments)
