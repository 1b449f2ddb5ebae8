"""lowbit: post-training quantization of ONNX models.

    import lowbit
    result = lowbit.quantize("model.onnx", "model_int8.onnx", config="full_quant.cfg")
    print(result.summary())
    analysis = lowbit.analyze("model.onnx", "model_int8.onnx", data="calib/", report="report.html")
"""

from .accuracy.evaluator import Evaluator
from .api import LowbitWarning, NodeReport, QuantizeResult, TensorReport, analyze, quantize
from .config import QuantConfig, load_config
from .errors import LowbitError
from .inference import inference_session, session_options

__all__ = [
    "Evaluator",
    "LowbitError",
    "LowbitWarning",
    "NodeReport",
    "QuantConfig",
    "QuantizeResult",
    "TensorReport",
    "analyze",
    "inference_session",
    "load_config",
    "quantize",
    "session_options",
]
__version__ = "0.1.0"
