"""Writing a model atomically, checked before it appears at its final path.

The model is written to a temporary folder beside the destination, checked with
``onnx.checker`` and loaded once by ONNX Runtime, then moved into place with
``os.replace``. A failure at any step leaves no output (and no half-written file).
Models whose tensors exceed protobuf's 2 GB limit get their weights in an external
data file ``<name>.data`` beside the model.

Only the graph's inputs and outputs carry shapes in the file. ONNX Runtime infers the
others itself; shapes written for every intermediate tensor let it apply fusions it does
not apply to the float model, and some are slower on the CPU: with them, the Add +
LayerNormalization pairs of a dynamically quantized MiniLM became SkipLayerNormalization
(1.1 ms each at 8 x 128 x 384, against 0.17 ms + an Add), and the model ran 15% slower
at batch 8 than without them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort

from ..errors import LowbitError

EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def check_output_path(output: Path, model_path: Path) -> None:
    """Fail early, before any work, when the output cannot be written."""
    if output.exists() and output.is_dir():
        raise LowbitError(f"output path is a folder: {output}")
    if not output.parent.is_dir():
        raise LowbitError(f"output folder does not exist: {output.parent}")
    if output.resolve() == model_path.resolve():
        raise LowbitError(f"output {output} would overwrite the input model; choose another path")
    if not os.access(output.parent, os.W_OK):
        raise LowbitError(f"output folder is not writable: {output.parent}")


def tensor_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_atomically(model: ir.Model, output: Path) -> int:
    """Write, verify and move the model into place; returns the bytes written (model + data file)."""
    external = f"{output.name}.data" if tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD else None
    staging = Path(tempfile.mkdtemp(prefix=".lowbit-", dir=output.parent))
    try:
        staged = staging / output.name
        with _shapes_of_inputs_and_outputs_only(model):
            ir.save(model, staged, external_data=external)
        _verify(staged)
        written = sum(p.stat().st_size for p in staging.iterdir())
        if external:
            os.replace(staging / external, output.parent / external)
        os.replace(staged, output)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _shapes_of_inputs_and_outputs_only(model: ir.Model) -> Iterator[None]:
    """Clear the type and shape of the graph's intermediate values while the model is written."""
    ends = {id(v) for v in (*model.graph.inputs, *model.graph.outputs)}
    cleared = [(v, v.type, v.shape) for node in model.graph for v in node.outputs
               if id(v) not in ends and (v.type is not None or v.shape is not None)]
    for value, _, _ in cleared:
        value.type, value.shape = None, None
    try:
        yield
    finally:
        for value, kind, shape in cleared:
            value.type, value.shape = kind, shape


def _verify(path: Path) -> None:
    """A model lowbit wrote must pass the checker and load in ORT; failing that is lowbit's bug."""
    onnx.checker.check_model(str(path), full_check=False)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
