"""The one validated configuration that the rest of lowbit reads.

Values come from three layers, later ones winning: the defaults in
:mod:`lowbit.config.fields`, a config file (MindSpore-style INI), and overrides (CLI
flags or keyword arguments of :func:`lowbit.quantize`). Every value remembers where it
came from, so ``lowbit config show`` can explain the resolved configuration.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LowbitError, did_you_mean
from ..quantizers.levels import AUTO, fixed_count
from .fields import FIELDS, FIELDS_BY_KEY, Field, Kind
from .precision import parse_precisions

DEFAULT = "default"

# Keys of the accuracy search other than the evaluator itself.
SEARCH_KEYS = ("eval_data", "eval_batch_num", "max_evaluations", "precision_ladder")

# Keys that only steer the calibration of activation ranges (full quantization).
CALIBRATION_KEYS = ("activation_quant_method", "num_bin", "max_num_bin", "max_percentile", "tune_num",
                    "layerwise_search", "layerwise_metric", "search_metric", "search_samples", "calibration_table",
                    "calibration_table_out", "table_format", "asymmetric", "bias_correction_metric",
                    "all_node_type", "model_output_type", "op_config", "node_config")
# Of those, the keys that choose ranges from data: a calibration table replaces them all.
RANGE_KEYS = ("activation_quant_method", "num_bin", "max_num_bin", "max_percentile", "tune_num", "layerwise_search",
              "layerwise_metric", "search_metric", "search_samples")


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str


@dataclass(frozen=True)
class CalibrationSource:
    """One entry of calibrate_path: a folder, optionally bound to a model input name."""

    folder: Path
    input_name: str | None = None


class QuantConfig:
    """Resolved, validated settings; read them as attributes (``config.per_channel``)."""

    def __init__(self, settings: dict[str, Setting]):
        self._settings = dict(settings)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._settings[key].value
        except KeyError:
            raise AttributeError(key) from None

    def source(self, key: str) -> str:
        return self._settings[key].source

    def is_default(self, key: str) -> bool:
        return self._settings[key].source.startswith(DEFAULT)

    def items(self) -> list[tuple[Field, Setting]]:
        return [(f, self._settings[f.key]) for f in FIELDS]

    @property
    def target(self) -> str:
        """The hardware preset name; unset target_device means ONNX Runtime CPU."""
        return self.target_device or "CPU"


def parse_value(field: Field, raw: Any, where: str) -> Any:
    """Turn a raw value (INI string, CLI string or Python value) into the field's type.

    ``where`` names the origin (file and section, or flag) for error messages.
    """

    def bad(reason: str) -> LowbitError:
        return LowbitError(f"{where}: {field.key}={raw!r}: {reason}; allowed: {field.allowed()}")

    if raw is None:
        return None
    if field.many:
        items = raw.split(",") if isinstance(raw, str) else list(raw) if isinstance(raw, (list, tuple)) else [raw]
        items = [item for item in items if not (isinstance(item, str) and not item.strip())]
        if not items:
            raise bad("empty")
        values = tuple(dict.fromkeys(_parse_one(field, item, bad, where) for item in items))  # drop repeats, keep order
        return values
    return _parse_one(field, raw, bad, where)


def _parse_one(field: Field, raw: Any, bad, where: str) -> Any:
    text = raw.strip() if isinstance(raw, str) else raw
    if field.kind is Kind.BOOL:
        if isinstance(text, bool):
            return text
        lowered = str(text).lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise bad("not a boolean")
    if field.kind is Kind.INT:
        try:
            value = int(text) if not isinstance(text, float) or text.is_integer() else None
        except (TypeError, ValueError):
            value = None
        if value is None or isinstance(text, bool):
            raise bad("not an integer")
        return _check_range(field, value, bad)
    if field.kind is Kind.FLOAT:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise bad("not a number") from None
        if not math.isfinite(value):
            raise bad("not a finite number")
        return _check_range(field, value, bad)
    if field.kind is Kind.ENUM:
        choices = {c.upper(): c for c in field.choices}
        upper = str(text).upper()
        upper = field.aliases.get(upper, upper)
        if upper not in choices:
            raise bad("unknown value" + did_you_mean(str(text), field.choices))
        return choices[upper]
    if field.kind is Kind.STR_LIST:
        items = text.split(",") if isinstance(text, str) else _strings(text)
        if items is None:
            raise bad("not a comma-separated string or a list of strings")
        return tuple(item.strip() for item in items if item.strip())
    if field.kind is Kind.VECTOR:
        try:
            values = ast.literal_eval(text) if isinstance(text, str) else text
            vector = tuple(float(v) for v in values)
        except (ValueError, SyntaxError, TypeError):
            raise bad("not a vector of numbers") from None
        if not vector or not all(math.isfinite(v) for v in vector):
            raise bad("needs 1 or more finite numbers")
        return vector
    if field.kind is Kind.PATH_MAP:
        return _parse_path_map(text, bad)
    if field.kind is Kind.SHAPES:
        return _parse_shapes(text, bad)
    if field.kind in (Kind.OP_PRECISIONS, Kind.NODE_PRECISIONS):
        label = where if where.endswith(field.key) else f"{where}: {field.key}"  # a JSON origin names the key
        return parse_precisions(text, field.kind is Kind.NODE_PRECISIONS, where=label) or None
    return str(text)


def format_shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    """input_shape as it is written: ``name:d0,d1;name:d0,d1`` (what :func:`_parse_shapes` reads)."""
    return ";".join(f"{name}:{','.join(map(str, dims))}" for name, dims in shapes.items())


def format_sources(sources: tuple[CalibrationSource, ...]) -> str:
    """calibrate_path as it is written: ``folder`` or ``input:folder,input:folder``."""
    return ",".join(f"{s.input_name}:{s.folder}" if s.input_name else str(s.folder) for s in sources)


def _parse_shapes(text: Any, bad) -> dict[str, tuple[int, ...]]:
    if isinstance(text, dict):
        items = text.items()
    elif not isinstance(text, str):
        raise bad("expected input_name:d0,d1,... or a dict of input name to shape")
    else:
        items = []
        for part in str(text).split(";"):
            name, sep, dims = part.strip().partition(":")
            if not sep or not name.strip():
                raise bad("expected input_name:d0,d1,...")
            items.append((name.strip(), dims.split(",")))
    shapes = {}
    for name, dims in items:
        try:
            if isinstance(dims, (str, bytes)) or isinstance(dims, float):
                raise TypeError
            shape = tuple(int(d) for d in dims)
        except (TypeError, ValueError):
            raise bad(f"dimensions of '{name}' are not integers") from None
        if not shape or any(d < 1 for d in shape):
            raise bad(f"dimensions of '{name}' must be positive")
        shapes[name] = shape
    return shapes


def _check_range(field: Field, value: float, bad) -> float:
    if field.low is not None and field.high is not None:
        inside = field.low < value < field.high if field.open_interval else field.low <= value <= field.high
        if not inside:
            raise bad("out of range")
    return value


def _strings(value: Any) -> list[str] | None:
    """A list or tuple of strings (or paths) as a list of str; None for anything else."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, Path)) for v in value):
        return None
    return [str(v) for v in value]


def _parse_path_map(text: Any, bad) -> tuple[CalibrationSource, ...]:
    if isinstance(text, (str, Path)):
        items = [p.strip() for p in str(text).split(",") if p.strip()]
    elif (items := _strings(text)) is None:
        raise bad("not a folder path, or a list of them")
    if not items:
        raise bad("empty")
    sources = []
    for item in items:
        name, sep, folder = item.partition(":")
        if sep and name and folder:
            sources.append(CalibrationSource(Path(folder).expanduser(), name))
        else:
            sources.append(CalibrationSource(Path(item).expanduser()))
    if len(sources) > 1 and any(s.input_name is None for s in sources):
        raise bad("with several folders, name each one's model input (input_name:folder)")
    return tuple(sources)


def resolve(layers: list[tuple[dict[str, Any], str]]) -> QuantConfig:
    """Build the configuration from layers of raw values, lowest priority first.

    Each layer is (values by key, description of its origin). Values are parsed,
    range-checked and checked for support here; cross-key rules follow.
    """
    settings = {f.key: Setting(f.default, DEFAULT) for f in FIELDS}
    for values, origin in layers:
        for key, raw in values.items():
            if key not in FIELDS_BY_KEY:
                raise LowbitError(f"{origin}: unknown key '{key}'" + did_you_mean(key, FIELDS_BY_KEY))
            field = FIELDS_BY_KEY[key]
            settings[key] = Setting(parse_value(field, raw, origin), origin)
    _apply_dependent_defaults(settings)
    _check_combinations(settings)
    return QuantConfig(settings)


def _apply_dependent_defaults(settings: dict[str, Setting]) -> None:
    quant_type = settings["quant_type"].value
    if quant_type != "WEIGHT_QUANT" and settings["min_quant_weight_channel"].source == DEFAULT:
        settings["min_quant_weight_channel"] = Setting(0, f"{DEFAULT} for {quant_type}")
    if settings["target_device"].value == "DSP" and settings["per_channel"].source == DEFAULT:
        settings["per_channel"] = Setting((False,), f"{DEFAULT} for target_device=DSP")
    if quant_type == "DYNAMIC_QUANT" and settings["bias_correction"].source == DEFAULT:
        settings["bias_correction"] = Setting(False, f"{DEFAULT} for {quant_type}")
    if quant_type != "FULL_QUANT" and settings["weight_rounding"].source == DEFAULT:
        settings["weight_rounding"] = Setting("NEAREST", f"{DEFAULT} for {quant_type}")


def _check_levels(settings: dict[str, Setting], where) -> None:
    setting, quant_type = settings["weight_levels"].value, settings["quant_type"].value
    if setting is None:
        return
    if quant_type == "DYNAMIC_QUANT":
        raise LowbitError(f"{where('weight_levels')}: weight_levels chooses levels on calibration data; "
                          "DYNAMIC_QUANT has none (use FULL_QUANT or WEIGHT_QUANT)")
    if settings["weight_bit_num"].value == 4:
        raise LowbitError(f"{where('weight_levels')}: weight_levels with weight_bit_num=4: int4 weights have 15 "
                          "levels; choose one of the two")
    levels, bits = fixed_count(setting), settings["bit_num"].value
    if quant_type == "WEIGHT_QUANT" and bits and levels is not None and levels >= 2 ** bits:
        raise LowbitError(f"{where('weight_levels')}: weight_levels={levels} is not fewer than the "
                          f"{2 ** bits} levels of bit_num={bits}")
    if quant_type == "WEIGHT_QUANT" and setting == AUTO and bits != 8:
        raise LowbitError(f"{where('weight_levels')}: weight_levels=AUTO chooses among 16 to 256 levels of 8-bit "
                          f"weights; bit_num={bits} (set bit_num=8, or a fixed weight_levels)")


def _check_combinations(settings: dict[str, Setting]) -> None:
    def where(key: str) -> str:
        return settings[key].source

    quant_type = settings["quant_type"].value
    if quant_type in ("FULL_QUANT", "DYNAMIC_QUANT") and settings["bit_num"].value != 8:
        raise LowbitError(
            f"{where('bit_num')}: bit_num={settings['bit_num'].value}: {quant_type} supports bit_num=8 only")
    if quant_type == "DYNAMIC_QUANT":
        if settings["bias_correction"].value:
            raise LowbitError(f"{where('bias_correction')}: bias_correction=true applies to FULL_QUANT only; "
                              "dynamic quantization has no calibration pass to measure it on")
        if settings["target_device"].value not in (None, "CPU"):
            raise LowbitError(f"{where('target_device')}: target_device={settings['target_device'].value}: "
                              "DYNAMIC_QUANT targets ONNX Runtime on CPU; leave target_device unset")
        for key in ("debug_info_save_path", "report"):
            if settings[key].value is not None:
                raise LowbitError(f"{where(key)}: {key} applies to FULL_QUANT and WEIGHT_QUANT; "
                                  "a dynamic model has no calibration to report on")
    elif settings["dynamic_quant_activation_matmul"].value:
        raise LowbitError(f"{where('dynamic_quant_activation_matmul')}: dynamic_quant_activation_matmul "
                          "applies to quant_type=DYNAMIC_QUANT only")
    if quant_type != "FULL_QUANT":
        for key in CALIBRATION_KEYS:
            if not settings[key].source.startswith(DEFAULT):
                raise LowbitError(f"{where(key)}: {key} applies to quant_type=FULL_QUANT only "
                                  f"(activation ranges are calibrated there); remove it for {quant_type}")
    if quant_type == "DYNAMIC_QUANT" and settings["weight_rounding"].value != "NEAREST":
        raise LowbitError(f"{where('weight_rounding')}: weight_rounding={settings['weight_rounding'].value} "
                          "measures layer inputs on calibration data, which DYNAMIC_QUANT has none of; "
                          "it rounds to nearest")
    if quant_type == "DYNAMIC_QUANT" and settings["block_reconstruction"].value:
        raise LowbitError(f"{where('block_reconstruction')}: block_reconstruction learns on calibration data, "
                          "which DYNAMIC_QUANT has none of")
    _check_weight_only(settings, where)
    _check_accuracy(settings, where)
    _check_levels(settings, where)
    weight_bits = settings["weight_bit_num"].value
    if weight_bits not in (4, 8):
        raise LowbitError(f"{where('weight_bit_num')}: weight_bit_num={weight_bits}: 8 or 4 (int4 weights, W4A8)")
    if weight_bits == 4 and quant_type != "FULL_QUANT":
        raise LowbitError(f"{where('weight_bit_num')}: weight_bit_num applies to FULL_QUANT; {quant_type} takes "
                          "its weights' width from bit_num")
    if weight_bits == 4 and settings["target_device"].value not in (None, "CPU"):
        raise LowbitError(f"{where('weight_bit_num')}: weight_bit_num=4: int4 weights are written for ONNX Runtime "
                          f"(target_device CPU); {settings['target_device'].value} takes 8-bit weights")
    _check_int4_precisions(settings)
    if settings["max_num_bin"].value < max(settings["num_bin"].value):
        raise LowbitError(f"{where('max_num_bin')}: max_num_bin={settings['max_num_bin'].value} is below "
                          f"num_bin={max(settings['num_bin'].value)} ({where('num_bin')}); "
                          "the streaming histogram needs at least num_bin bins")
    if settings["target_device"].value == "NVGPU" and True in (settings["asymmetric"].value or ()):
        raise LowbitError(f"{where('asymmetric')}: asymmetric=true: TensorRT (target_device=NVGPU) takes "
                          "symmetric activations only (zero point 0); leave asymmetric unset or false")
    if quant_type != "FULL_QUANT" and len(settings["per_channel"].value) > 1:
        raise LowbitError(f"{where('per_channel')}: per_channel=true,false: the two are compared by the model-wise "
                          f"search of FULL_QUANT; give one value for {quant_type}")
    if settings["target_device"].value == "DSP" and True in settings["per_channel"].value:
        raise LowbitError(
            f"{where('per_channel')}: per_channel=true: target_device=DSP quantizes weights per tensor "
            "(SNPE/Hexagon); set per_channel=false or choose another target_device")


def _check_int4_precisions(settings: dict[str, Setting]) -> None:
    """int4 in op_config / node_config: weights for ONNX Runtime CPU, not with weight_levels on the same entry."""
    for key in ("op_config", "node_config"):
        for name, entry in (settings[key].value or {}).items():
            if not entry.asks("int4"):
                continue
            if settings["target_device"].value not in (None, "CPU"):
                raise LowbitError(f"{entry.where}: int4 weights are written for ONNX Runtime (target_device CPU); "
                                  f"{settings['target_device'].value} takes 8-bit weights")
            if entry.weight_levels is not None:
                raise LowbitError(f"{entry.where}: int4 and weight_levels on '{name}': int4 weights have 15 levels; "
                                  "choose one of the two")


def _check_accuracy(settings: dict[str, Setting], where) -> None:
    """The accuracy search's keys: one evaluator, its data and budget only with it, a ladder that climbs."""
    from ..accuracy.goals import parse_goal  # the goal's syntax lives with the built-in evaluators

    evaluator, target = settings["evaluator"].value, settings["accuracy_target"].value
    if evaluator is not None and target is not None:
        raise LowbitError(f"{where('accuracy_target')}: accuracy_target is a built-in evaluator, and evaluator="
                          f"{evaluator} ({where('evaluator')}) is set too; give one of them")
    given = [key for key in SEARCH_KEYS if not settings[key].source.startswith(DEFAULT)]
    if evaluator is None and target is None and given:
        raise LowbitError(f"{where(given[0])}: {given[0]} steers the accuracy search; set evaluator or "
                          "accuracy_target too")
    goal = parse_goal(target, where("accuracy_target")) if target is not None else None
    if settings["eval_data"].value is not None and goal is None:
        raise LowbitError(f"{where('eval_data')}: eval_data is what accuracy_target scores; your evaluator reads "
                          "its own data")
    if settings["eval_batch_num"].value is not None and goal is not None:
        raise LowbitError(f"{where('eval_batch_num')}: eval_batch_num is given to your evaluator's eval_model; "
                          "accuracy_target scores all of eval_data")
    if goal is not None and goal.needs_labels and settings["eval_data"].value is None:
        raise LowbitError(f"{where('accuracy_target')}: accuracy_target={target}: accuracy-drop compares with "
                          "labels: give eval_data, an .npz with the inputs and a 'label' array")
    if (evaluator is not None or target is not None) and settings["auto_tune"].value:
        raise LowbitError(f"{where('auto_tune')}: auto_tune searches for an output cosine of 0.995; with an "
                          "evaluator the mixed-bit search follows the evaluator: remove auto_tune")
    ladder = settings["precision_ladder"].value
    if ladder is None:
        return
    if settings["quant_type"].value != "FULL_QUANT":
        raise LowbitError(f"{where('precision_ladder')}: precision_ladder applies to quant_type=FULL_QUANT")
    order = FIELDS_BY_KEY["precision_ladder"].choices
    start = "int4" if settings["weight_bit_num"].value == 4 else "int8"
    if ladder[0] != start or len(ladder) < 2 or list(ladder) != sorted(ladder, key=order.index):
        raise LowbitError(f"{where('precision_ladder')}: precision_ladder={','.join(ladder)}: it starts at {start} "
                          "(where the plan puts the nodes" + (", weight_bit_num=4" if start == "int4" else "")
                          + ") and climbs, in the order " + ",".join(order)
                          + (" (e.g. int4,int8,float32)" if start == "int4" else " (e.g. int8,int16,float32)"))
    if settings["target_device"].value == "NVGPU" and "int16" in ladder:
        raise LowbitError(f"{where('precision_ladder')}: TensorRT (target_device=NVGPU) has no int16; "
                          "use int8,float16,float32")


def _check_weight_only(settings: dict[str, Setting], where) -> None:
    """Keys of weight-only quantization: only with quant_type=WEIGHT_QUANT, and consistent with bit_num."""
    quant_type, bits = settings["quant_type"].value, settings["bit_num"].value
    given = [key for key in ("init_scale", "auto_tune", "matmul_nbits", "block_size")
             if not settings[key].source.startswith(DEFAULT)]
    if quant_type != "WEIGHT_QUANT" and given:
        raise LowbitError(f"{where(given[0])}: {given[0]} applies to quant_type=WEIGHT_QUANT only")
    for key in ("init_scale", "auto_tune"):
        if key in given and bits != 0:
            raise LowbitError(f"{where(key)}: {key} steers the mixed-bit search, which bit_num=0 turns on "
                              f"(bit_num={bits}, {where('bit_num')})")
    if settings["matmul_nbits"].value and bits != 4:
        raise LowbitError(f"{where('matmul_nbits')}: matmul_nbits writes 4-bit blocks; set bit_num=4 "
                          f"(bit_num={bits}, {where('bit_num')})")
    block = settings["block_size"].value
    if block & (block - 1):
        raise LowbitError(f"{where('block_size')}: block_size={block}: MatMulNBits needs a power of two "
                          "(16, 32, 64, 128 or 256)")
