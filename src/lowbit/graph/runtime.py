"""Running an in-memory model with ONNX Runtime, exposing intermediate tensors as outputs."""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import onnx_ir as ir
import onnxruntime as ort

from ..errors import LowbitError

_PROTOBUF_LIMIT = 2**31 - 2**26  # stay clear of protobuf's 2 GB message limit


def make_session(model: ir.Model, extra_outputs: Sequence[str] = (), threads: int = 0) -> ort.InferenceSession:
    """An ORT CPU session of the model whose outputs also include ``extra_outputs``.

    Intermediate values need a type in the graph (shape inference gives it).
    Models over 2 GB are passed to ORT through a temporary file with external data.
    """
    proto = ir.serde.serialize_model(model)
    values = {v.name: v for node in model.graph for v in node.outputs if v is not None}
    existing = {o.name for o in proto.graph.output}
    for name in extra_outputs:
        if name in existing:
            continue
        info = onnx.ValueInfoProto(name=name)
        value = values[name]
        info.type.tensor_type.elem_type = int(value.dtype)
        proto.graph.output.append(info)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    try:
        if proto.ByteSize() < _PROTOBUF_LIMIT:
            return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return _session_via_file(proto, options)
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.NotImplemented) as exc:
        raise LowbitError(f"ONNX Runtime cannot run the float model: {str(exc).splitlines()[0]}") from None


def _session_via_file(proto: onnx.ModelProto, options: ort.SessionOptions) -> ort.InferenceSession:
    import tempfile

    # ORT reads the external data while building the session, so the folder can go afterwards.
    with tempfile.TemporaryDirectory(prefix="lowbit-") as folder:
        path = f"{folder}/model.onnx"
        onnx.save(proto, path, save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
