"""Running an in-memory model with ONNX Runtime, exposing intermediate tensors as outputs."""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import onnx_ir as ir
import onnxruntime as ort

from ..errors import LowbitError

_PROTOBUF_LIMIT = 2**31 - 2**26  # stay clear of protobuf's 2 GB message limit


def make_session(model: ir.Model | onnx.ModelProto, extra_outputs: Sequence[str] = ()) -> ort.InferenceSession:
    """An ORT CPU session of the model whose outputs also include ``extra_outputs`` (float32 tensors).

    Models over 2 GB are passed to ORT through a temporary file with external data.
    """
    if isinstance(model, ir.Model):
        proto = ir.serde.serialize_model(model)
    else:
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    existing = {o.name for o in proto.graph.output}
    for name in extra_outputs:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # between two runs the observers work in numpy: threads spinning for the next run would take their cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        if proto.ByteSize() < _PROTOBUF_LIMIT:
            return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return _session_via_file(proto, options)
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):  # ORT's own error types: a model it refuses
            raise
        raise LowbitError(f"ONNX Runtime cannot run the model: {str(exc).splitlines()[0]}") from None


def _session_via_file(proto: onnx.ModelProto, options: ort.SessionOptions) -> ort.InferenceSession:
    import tempfile

    # ORT reads the external data while building the session, so the folder can go afterwards.
    with tempfile.TemporaryDirectory(prefix="lowbit-") as folder:
        path = f"{folder}/model.onnx"
        onnx.save(proto, path, save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
