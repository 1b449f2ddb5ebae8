"""Every configuration key lowbit knows, with its type, default, allowed values and help.

The table follows MindSpore Lite's post-training quantization INI (sections
``common_quant_param``, ``mixed_bit_weight_quant_param``, ``full_quant_param`` and
``data_preprocess_param``); key names are unique across sections, so the rest of
lowbit addresses a setting by its key alone. The same table drives the INI reader,
the CLI flags and the keyword arguments of :func:`lowbit.quantize`, so a key is
declared once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..quantizers.levels import AUTO, LEVEL_COUNTS


class Kind(Enum):
    STR = "string"
    INT = "integer"
    FLOAT = "float"
    BOOL = "boolean"
    ENUM = "one of"
    STR_LIST = "comma-separated names"
    VECTOR = "vector like [1.0, 2.0, 3.0]"
    PATH_MAP = "folder, or input_name:folder,input_name:folder"
    SHAPES = "input_name:d0,d1,...;input_name:d0,d1,..."
    OP_PRECISIONS = "OpType:qtype,OpType:qtype (or a dict, as in Horizon's op_config)"
    NODE_PRECISIONS = "node:qtype,node[1]:qtype (or a dict, as in Horizon's node_config)"


@dataclass(frozen=True)
class Field:
    """One configuration key."""

    section: str
    key: str
    kind: Kind
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)
    low: float | None = None
    high: float | None = None
    open_interval: bool = False
    extension: bool = False  # a lowbit key, not MindSpore's
    many: bool = False  # one value or several, comma separated: candidates for the search

    def allowed(self) -> str:
        """Human-readable description of the values this key accepts."""
        one = self._allowed_one()
        return f"{one} (one, or several separated by commas)" if self.many else one

    def _allowed_one(self) -> str:
        if self.kind is Kind.ENUM:
            return "one of " + ", ".join(self.choices)
        if self.low is not None and self.high is not None:
            lo, hi = ("(", ")") if self.open_interval else ("[", "]")
            return f"{self.kind.value} in {lo}{_num(self.low)}, {_num(self.high)}{hi}"
        if self.kind is Kind.BOOL:
            return "true or false"
        return self.kind.value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


COMMON = "common_quant_param"
MIXED_BIT = "mixed_bit_weight_quant_param"
FULL = "full_quant_param"
DATA = "data_preprocess_param"
SECTIONS = (COMMON, MIXED_BIT, FULL, DATA)

FIELDS: tuple[Field, ...] = (
    # [common_quant_param]
    Field(COMMON, "quant_type", Kind.ENUM, "FULL_QUANT",
          "WEIGHT_QUANT: weights only; FULL_QUANT: weights and activations; DYNAMIC_QUANT: activations at run time",
          choices=("WEIGHT_QUANT", "FULL_QUANT", "DYNAMIC_QUANT")),
    Field(COMMON, "bit_num", Kind.INT, 8,
          "bits per value; WEIGHT_QUANT: 1 to 16, or 0 for mixed bit (a width per layer); "
          "full and dynamic quantization support 8", low=0, high=16),
    Field(COMMON, "min_quant_weight_size", Kind.INT, 0,
          "a weighted node is quantized only when its weight has more elements than this", low=0, high=65535),
    Field(COMMON, "min_quant_weight_channel", Kind.INT, 16,
          "a weighted node is quantized only when its weight has more output channels than this "
          "(default 16 for WEIGHT_QUANT; 0 for FULL_QUANT, where MindSpore ignores the threshold)",
          low=0, high=65535),
    Field(COMMON, "skip_quant_node", Kind.STR_LIST, (),
          "names of nodes that stay float, comma separated"),
    Field(COMMON, "dynamic_quant_activation_matmul", Kind.BOOL, False,
          "DYNAMIC_QUANT: also quantize MatMuls of two activations (attention scores)", extension=True),
    Field(COMMON, "dynamic_quant_granularity", Kind.ENUM, "AUTO",
          "DYNAMIC_QUANT: activation scales per row/token (TOKEN), per tensor (TENSOR, ONNX Runtime's form), "
          "or AUTO: per token for MatMuls whose weight widens or narrows the hidden size 2x or more "
          "(feed-forward layers), per tensor for the others",
          choices=("AUTO", "TOKEN", "TENSOR"), extension=True),
    Field(COMMON, "weight_levels", Kind.ENUM, None,
          "non-uniform weights: each quantized Conv/Gemm/MatMul weight takes only this many of its grid's integers "
          "(a power of two, 2 to 256), chosen for the least layer output error on the calibration data; the file "
          "stores log2(K)-bit indices and the levels (FULL_QUANT; WEIGHT_QUANT with data); AUTO: K per layer "
          "(16 to 256), the fewest the evaluator or accuracy_target accepts; unset = uniform",
          choices=(*(str(count) for count in LEVEL_COUNTS), AUTO), extension=True),
    Field(COMMON, "pack_weight_levels", Kind.BOOL, True,
          "weight_levels: store each weight as bit-planes of level indices decoded by standard ONNX ops that ONNX "
          "Runtime folds at load (true), or as the plain integer tensor (false)", extension=True),
    Field(COMMON, "matmul_nbits", Kind.BOOL, False,
          "WEIGHT_QUANT with bit_num=4: write 2-D MatMul weights as ONNX Runtime's MatMulNBits "
          "(4-bit blocks along K; runs in ONNX Runtime only)", extension=True),
    Field(COMMON, "block_size", Kind.INT, 32,
          "matmul_nbits: values per 4-bit block along K, each block with its own scale "
          "(a power of two, 16 to 256)", low=16, high=256, extension=True),
    Field(COMMON, "debug_info_save_path", Kind.STR, None,
          "folder for MindSpore's debug reports (output_summary.csv, round_*.csv, quant_param.csv); "
          "FULL_QUANT and WEIGHT_QUANT"),
    Field(COMMON, "report", Kind.STR, None,
          "write the analysis report of the quantized model (REPORT.html, and REPORT.json beside it): "
          "per-node sensitivity, tensors along the graph, what to leave float; FULL_QUANT and WEIGHT_QUANT, "
          "with data; needs lowbit[report]", extension=True),
    Field(COMMON, "report_samples", Kind.INT, 32,
          "report: calibration samples the analysis reads", low=1, high=100000, extension=True),
    Field(COMMON, "all_node_type", Kind.ENUM, None,
          "FULL_QUANT: the precision of every quantizable node's inputs (Horizon's all_node_type); "
          "unset = int8; op_config and node_config win over it", choices=("int8", "int16", "float16"),
          extension=True),
    Field(COMMON, "model_output_type", Kind.ENUM, None,
          "FULL_QUANT: quantize the model's outputs too, in int8 or int16 (Horizon's model_output_type); "
          "unset = outputs stay float", choices=("int8", "int16"), extension=True),
    Field(COMMON, "op_config", Kind.OP_PRECISIONS, None,
          "FULL_QUANT: precision per op type: int8, int16, float16 or float32 (Horizon's op_config), or int4 "
          "(lowbit: int4 weights of Conv/ConvTranspose/Gemm/MatMul under 8-bit activations, CPU target); "
          "wins over all_node_type", extension=True),
    Field(COMMON, "node_config", Kind.NODE_PRECISIONS, None,
          "FULL_QUANT: precision per node, of all its inputs (name:qtype) or of input 0 or 1 "
          "(name[1]:qtype; also ec, error compensation, and int4 for a weight); wins over op_config (Horizon's "
          "node_config); with weight_bit_num=4, int8 keeps a node's weight at 8 bits",
          extension=True),
    Field(COMMON, "evaluator", Kind.STR, None,
          "quantize until your metric is met: path/to/file.py:ClassName or module:ClassName, a class with "
          "eval_model(model_file, batch_num) and is_satisfied(original_metric, new_metric) (see "
          "lowbit.Evaluator); FULL_QUANT searches precisions per node, WEIGHT_QUANT bit_num=0 widths, "
          "other modes check the result", extension=True),
    Field(COMMON, "accuracy_target", Kind.STR, None,
          "a built-in evaluator instead of your own: cosine>=X (mean cosine of the first output against the "
          "float model's), top1-agreement>=X (share of the same argmax), accuracy-drop<X (argmax against the "
          "eval_data's label); on eval_data, else on held-back calibration samples", extension=True),
    Field(COMMON, "eval_data", Kind.STR, None,
          "accuracy_target: an .npz file with one array per model input name (batch first) and, for "
          "accuracy-drop, 'label'", extension=True),
    Field(COMMON, "eval_batch_num", Kind.INT, None,
          "evaluator: the batch_num given to eval_model (unset: None, meaning all of your data)",
          low=1, high=1_000_000, extension=True),
    Field(COMMON, "max_evaluations", Kind.INT, 20,
          "evaluator / accuracy_target: at most this many calls of eval_model, the float model's included",
          low=2, high=10000, extension=True),
    Field(COMMON, "precision_ladder", Kind.ENUM, None,
          "FULL_QUANT with an evaluator: the precisions a node climbs, from int8 (int4 with weight_bit_num=4: "
          "a weighted node's weight goes to int8 first); unset = the target's: CPU int8,float32 (ONNX Runtime "
          "runs int16 slower than float32; int4,int8,float32 with weight_bit_num=4), DSP int8,int16,float32, "
          "NVGPU int8,float16,float32", choices=("int4", "int8", "int16", "float16", "float32"), many=True,
          extension=True),
    Field(COMMON, "workers", Kind.INT, None,
          "run the data passes and the candidate scoring on a local Ray with this many worker CPUs "
          "(needs lowbit[ray]); unset = one process", low=1, high=4096, extension=True),
    Field(COMMON, "ray_address", Kind.STR, None,
          "join the Ray cluster at this address (e.g. ray://head:10001 or auto) instead of starting one; "
          "its workers must reach the calibration files at the same paths", extension=True),
    # [mixed_bit_weight_quant_param]
    Field(MIXED_BIT, "init_scale", Kind.FLOAT, 0.02,
          "bit_num=0: the relative error each weight may add (to itself without data, to the model's "
          "outputs with calibration data); each gets the fewest of 4/8/16 bits within it; larger compresses more",
          low=0, high=1, open_interval=True),
    Field(MIXED_BIT, "auto_tune", Kind.BOOL, False,
          "bit_num=0: search init_scale for an output cosine similarity of 0.995 to the float model "
          "(needs calibration data)"),
    # [full_quant_param]
    Field(FULL, "activation_quant_method", Kind.ENUM, None,
          "how activation ranges are chosen: MAX_MIN, KL (TensorRT entropy), REMOVAL_OUTLIER (percentile), "
          "MSE, ACIQ, AUTO_TUNE (KL refined per op, tpu-mlir); several = keep the best (modelwise search); "
          "unset = search MAX_MIN,REMOVAL_OUTLIER,KL,MSE (a MindSpore INI without the key means MAX_MIN)",
          choices=("MAX_MIN", "KL", "REMOVAL_OUTLIER", "MSE", "ACIQ", "AUTO_TUNE"),
          aliases={"REMOVALOUTLIER": "REMOVAL_OUTLIER", "PERCENTILE": "REMOVAL_OUTLIER", "MAX": "MAX_MIN",
                   "AUTOTUNE": "AUTO_TUNE"},
          many=True),
    Field(FULL, "num_bin", Kind.INT, (1024,),
          "KL: histogram bins the divergence is computed on (TensorRT uses 2048)", low=129, high=65536,
          many=True, extension=True),
    Field(FULL, "max_num_bin", Kind.INT, 16384,
          "KL, REMOVAL_OUTLIER, MSE, ACIQ: bins of the streaming histogram (at least num_bin)",
          low=256, high=1 << 20, extension=True),
    Field(FULL, "max_percentile", Kind.FLOAT, (0.9999,),
          "REMOVAL_OUTLIER: fraction of values kept; the rest, the most extreme, are clipped",
          low=0.5, high=1.0, many=True, extension=True),
    Field(FULL, "tune_num", Kind.INT, 10,
          "AUTO_TUNE: candidate thresholds tried per tensor between the KL threshold and |x|max",
          low=1, high=1000, extension=True),
    Field(FULL, "layerwise_search", Kind.BOOL, False,
          "per op, keep the candidate method whose int8 op output is closest to the float one "
          "(by search_metric), then score the mix as one more candidate of the model-wise search", extension=True),
    Field(FULL, "search_metric", Kind.ENUM, "cosine-similarity",
          "how candidates are compared with the float model",
          choices=("cosine-similarity", "mse", "mae", "mre", "sqnr", "chebyshev"), extension=True),
    Field(FULL, "search_samples", Kind.INT, None,
          "at most this many calibration samples (every 8th) are held back from the statistics to score "
          "search candidates (default 32)", low=1, high=4096, extension=True),
    Field(FULL, "calibration_table", Kind.STR, None,
          "read the activation ranges from this table (lowbit JSON, tpu-mlir or TensorRT cache, told apart by "
          "their content) instead of calibrating them", extension=True),
    Field(FULL, "calibration_table_out", Kind.STR, None,
          "write the activation ranges to this table, in table_format", extension=True),
    Field(FULL, "table_format", Kind.ENUM, "json",
          "format of calibration_table_out: json (lowbit: range, scale, zero point, bits, type), tpu-mlir "
          "(threshold, min, max per tensor), tensorrt (TensorRT's calibration cache: a scale per tensor)",
          choices=("json", "tpu-mlir", "tensorrt"), extension=True),
    Field(FULL, "layerwise_metric", Kind.ENUM, None,
          "layerwise_search: how each op's candidates are compared (default: search_metric)",
          choices=("cosine-similarity", "mse", "mae", "mre", "sqnr", "chebyshev"), extension=True),
    Field(FULL, "bias_correction", Kind.BOOL, True,
          "fold the per-channel output shift that weight rounding causes into each quantized Conv/Gemm bias, "
          "measured on the calibration data (FULL_QUANT; WEIGHT_QUANT when data is given)"),
    Field(FULL, "bias_correction_samples", Kind.INT, 64,
          "bias_correction: calibration samples whose layer-input means it measures (Horizon's num_sample)",
          low=1, high=100000, extension=True),
    Field(FULL, "bias_correction_metric", Kind.ENUM, None,
          "bias_correction: keep the corrected biases only if they do not worsen the model's outputs by this "
          "metric on the calibration samples it read (Horizon's metric); unset = always keep",
          choices=("cosine-similarity", "mse", "mae", "mre", "sqnr", "chebyshev"), extension=True),
    Field(FULL, "saturation_safe_weights", Kind.BOOL, True,
          "keep every two int8 weights that ONNX Runtime's x86 int8 kernels add in one 16-bit lane within "
          "|a + b| <= 128 (same-sign neighbours), so that CPUs without VNNI (AVX2, AVX-512 without VNNI) "
          "compute the model exactly instead of saturating (FULL_QUANT and DYNAMIC_QUANT; false: for VNNI or ARM "
          "CPUs or TensorRT only)",
          extension=True),
    Field(FULL, "speed_check", Kind.BOOL, True,
          "FULL_QUANT: after saving, time the quantized model beside the float one on this CPU (ONNX Runtime, one "
          "calibration sample, about 2 s at most) and warn when it is no faster (target_device CPU; the precision "
          "search times its kept model itself)",
          extension=True),
    Field(FULL, "cross_layer_equalization", Kind.BOOL, False,
          "before calibration, rescale the channels of consecutive Conv/Gemm/MatMul layers (through Relu, "
          "LeakyRelu, PRelu; Clip(0, hi) becomes Relu + a per-channel Min) so that per-tensor weight grids fit "
          "every channel; the float model computes the same (Nagel et al. 2019); for per_channel=false / DSP",
          extension=True),
    Field(FULL, "weight_rounding", Kind.ENUM, "GPTQ",
          "how weights get their integers: NEAREST (round to nearest), GPTQ (error-compensating rounding "
          "against the layer input's second moment on the calibration data; same grid and file size; "
          "FULL_QUANT's default, and WEIGHT_QUANT's with data when set) or ADAROUND (GPTQ, then AdaRound's "
          "learned up/down choices from there, where they lower the layer's output error)",
          choices=("NEAREST", "GPTQ", "ADAROUND"), extension=True),
    Field(FULL, "block_reconstruction", Kind.BOOL, False,
          "after weight rounding, learn the integers of each block of layers together (AdaRound per block, as "
          "in BRECQ) against the float block's output on calibration data, in torch (pip install "
          "'lowbit[reconstruction]'); minutes: for 4-bit weights (W4A8, weight-only bit_num<8)", extension=True),
    Field(FULL, "block_reconstruction_iterations", Kind.INT, 300,
          "block_reconstruction: Adam steps per block (16 samples a step)", low=1, high=100000, extension=True),
    Field(FULL, "block_reconstruction_samples", Kind.INT, 128,
          "block_reconstruction: calibration samples it learns on (held in memory with each block's input)",
          low=2, high=100000, extension=True),
    Field(FULL, "weight_bit_num", Kind.INT, 8,
          "bits of the weights of full quantization: 8, or 4 (int4 weights behind DequantizeLinear, opset 21, "
          "with 8-bit activations: W4A8; each channel's scale clips by the least squared error; CPU target)",
          low=4, high=8),
    Field(FULL, "per_channel", Kind.BOOL, (True,),
          "weights per output channel (true) or per tensor (false); DSP defaults to false; FULL_QUANT: "
          "true,false = both are candidates of the model-wise search", many=True),
    Field(FULL, "asymmetric", Kind.BOOL, None,
          "activations asymmetric (zero point anywhere) or symmetric (zero point 0); unset = the target's: "
          "asymmetric on CPU and DSP, symmetric on NVGPU (TensorRT needs zero point 0); true,false = both are "
          "candidates of the model-wise search", extension=True, many=True),
    Field(FULL, "target_device", Kind.ENUM, None,
          "hardware preset; unset = ONNX Runtime CPU", choices=("CPU", "NVGPU", "DSP")),
    # [data_preprocess_param]
    Field(DATA, "calibrate_path", Kind.PATH_MAP, None,
          "calibration data: a folder, or input_name:folder pairs separated by commas"),
    Field(DATA, "calibrate_size", Kind.INT, None,
          "number of calibration samples (default: all files found)", low=1, high=65535),
    Field(DATA, "input_type", Kind.ENUM, None,
          "calibration file type (default: from each file's extension)",
          choices=("IMAGE", "BIN", "NPY", "NPZ")),
    Field(DATA, "image_to_format", Kind.ENUM, None, "colour format of preprocessed images (decoded as BGR)",
          choices=("RGB", "GRAY", "BGR")),
    Field(DATA, "normalize_mean", Kind.VECTOR, None, "dst = (src - mean) / std; 1 value or 1 per channel"),
    Field(DATA, "normalize_std", Kind.VECTOR, None, "dst = (src - mean) / std; 1 value or 1 per channel"),
    Field(DATA, "resize_width", Kind.INT, None, "resize width", low=1, high=65535),
    Field(DATA, "resize_height", Kind.INT, None, "resize height", low=1, high=65535),
    Field(DATA, "resize_method", Kind.ENUM, "LINEAR", "resize interpolation",
          choices=("LINEAR", "NEAREST", "CUBIC"), aliases={"NEARST": "NEAREST"}),
    Field(DATA, "center_crop_width", Kind.INT, None, "center crop width", low=1, high=65535),
    Field(DATA, "center_crop_height", Kind.INT, None, "center crop height", low=1, high=65535),
    # lowbit's own keys for the same section
    Field(DATA, "data_list", Kind.STR, None,
          "a file listing one sample per line (comma-separated paths for multi-input models)", extension=True),
    Field(DATA, "input_shape", Kind.SHAPES, None,
          "shapes for inputs with free dimensions, e.g. input:1,3,224,224 (needed by .bin data)", extension=True),
    Field(DATA, "input_layout", Kind.ENUM, None,
          "layout of the model's 4-D inputs (default: from their shape)", choices=("NCHW", "NHWC"),
          extension=True),
    Field(DATA, "input_data_format", Kind.ENUM, "NHWC",
          "layout of 4-D .bin buffers (MindSpore converter's inputDataFormat)", choices=("NHWC", "NCHW"),
          extension=True),
    Field(DATA, "calibrate_batch_size", Kind.INT, 1,
          "samples per calibration run where the model's batch dimension is free", low=1, high=1024,
          extension=True),
    Field(DATA, "skip_bad_samples", Kind.BOOL, False,
          "skip unreadable calibration files with a warning instead of stopping", extension=True),
)

FIELDS_BY_KEY: dict[str, Field] = {f.key: f for f in FIELDS}
