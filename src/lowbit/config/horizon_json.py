"""Reader for Horizon's quant_config JSON (``model_config``, ``op_config``, ``node_config``).

Horizon's toolchain configures post-training quantization with one JSON object; this
module maps each of its keys onto lowbit's keys (:mod:`lowbit.config.fields`):

=================================================  ===================================
Horizon                                            lowbit
=================================================  ===================================
model_config.all_node_type                         all_node_type
model_config.model_output_type                     model_output_type
model_config.activation.calibration_type           activation_quant_method: kl -> KL;
                                                   max -> MAX_MIN and/or REMOVAL_OUTLIER
model_config.activation.num_bin                    num_bin
model_config.activation.max_num_bin                max_num_bin
model_config.activation.max_percentile             max_percentile (its values below 1)
model_config.activation.per_channel                per_channel
model_config.activation.asymmetric                 asymmetric
model_config.weight.bias_correction (object)       bias_correction=true
model_config.weight.bias_correction.num_sample     bias_correction_samples
model_config.weight.bias_correction.metric         bias_correction_metric
model_config.modelwise_search.metric               search_metric
model_config.layerwise_search (object)             layerwise_search=true
model_config.layerwise_search.metric               layerwise_metric
op_config / node_config                            op_config / node_config
=================================================  ===================================

Horizon's ``max`` with a ``max_percentile`` below 1 clips at that percentile, which is
lowbit's REMOVAL_OUTLIER; with ``max_percentile`` 1 (its default) it is plain MAX_MIN.
A file without ``calibration_type`` leaves ``activation_quant_method`` unset: Horizon
then tries several methods, which is lowbit's default search too.

An optional top-level ``"lowbit"`` object is lowbit's own section, for settings
Horizon's format has no key for, e.g. ``"lowbit": {"target_device": "NVGPU",
"calibrate_path": "calib/"}``; it takes any lowbit key by name. A key may be set once
per file, by Horizon's key or in ``"lowbit"``.

Horizon's documentation shows its template with ``//`` line comments, so they are
accepted outside strings (``"a//b"`` stays a string), and a commented template loads.

Like the INI reader, this module checks the file's structure and JSON types; every value
becomes its own resolve() layer whose origin names the file and the JSON path
(``q.json: model_config.activation.num_bin``), so the range checks of
:func:`lowbit.config.model.resolve` name the JSON path too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import LowbitError, did_you_mean
from .fields import FIELDS_BY_KEY
from .precision import check_choice

# The keys allowed in each object of the document, by JSON path ("" is the top level).
KEYS: dict[str, tuple[str, ...]] = {
    "": ("model_config", "op_config", "node_config", "lowbit"),
    "model_config": ("all_node_type", "model_output_type", "activation", "weight", "modelwise_search",
                     "layerwise_search"),
    "model_config.activation": ("calibration_type", "num_bin", "max_num_bin", "max_percentile", "per_channel",
                                "asymmetric"),
    "model_config.weight": ("bias_correction",),
    "model_config.weight.bias_correction": ("num_sample", "metric"),
    "model_config.modelwise_search": ("metric",),
    "model_config.layerwise_search": ("metric",),
}

# JSON value kinds: how an error names them, and the check (bool is an int in Python).
_KINDS = {
    "a string": lambda v: isinstance(v, str),
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "a number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "true or false": lambda v: isinstance(v, bool),
}

# A string literal (kept whole, escapes included) or a // comment (dropped up to the line end).
_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*')


def strip_comments(text: str) -> str:
    """``text`` without ``//`` comments outside strings; lines and columns stay where they were."""
    return _TOKEN.sub(lambda m: m.group() if m.group().startswith('"') else "", text)


def read_horizon_json(path: str | Path) -> list[tuple[dict[str, Any], str]]:
    """Read the file into resolve() layers: one (values, origin) pair per mapped value."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LowbitError(f"{path}: not a text config file (it is not UTF-8)") from None
    try:
        document = json.loads(strip_comments(text))
    except json.JSONDecodeError as exc:
        raise LowbitError(f"{path}, line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}") from None
    return _Reader(path).read(document)


class _Reader:
    """Walks the document, checking each object's keys and each value's JSON type."""

    def __init__(self, path: Path):
        self.path = path
        self.layers: list[tuple[dict[str, Any], str]] = []
        self.set_by: dict[str, str] = {}  # lowbit key -> the JSON path that set it

    def read(self, document: Any) -> list[tuple[dict[str, Any], str]]:
        if not isinstance(document, dict):
            raise LowbitError(f"{self.path}: the top level must be a JSON object {{...}}, got {_show(document)}")
        top = self.object(document, "")
        if "model_config" in top:
            self.model_config(self.object(top["model_config"], "model_config"))
        for key in ("op_config", "node_config"):  # resolve() parses the entries, naming this JSON path
            if key in top:
                self.set(key, self.object(top[key], key, check_keys=False), key)
        if "lowbit" in top:
            for key, value in self.object(top["lowbit"], "lowbit", check_keys=False).items():
                if key not in FIELDS_BY_KEY:
                    raise self.error(f"lowbit.{key}", "unknown lowbit key" + did_you_mean(key, FIELDS_BY_KEY)
                                     + "; see `lowbit config show` for the keys")
                self.set(key, value, f"lowbit.{key}")
        return self.layers

    def model_config(self, config: dict[str, Any]) -> None:
        for key in ("all_node_type", "model_output_type"):
            if key in config:
                self.set(key, self.one(config[key], f"model_config.{key}", "a string"), f"model_config.{key}")
        if "activation" in config:
            self.activation(self.object(config["activation"], "model_config.activation"))
        if "weight" in config:
            weight = self.object(config["weight"], "model_config.weight")
            if "bias_correction" in weight:
                where = "model_config.weight.bias_correction"
                correction = self.object(weight["bias_correction"], where)
                self.set("bias_correction", True, where)
                if "num_sample" in correction:
                    self.set("bias_correction_samples", self.one(correction["num_sample"], f"{where}.num_sample",
                                                                 "an integer"), f"{where}.num_sample")
                if "metric" in correction:
                    self.metric("bias_correction_metric", correction["metric"], f"{where}.metric")
        if "modelwise_search" in config:
            search = self.object(config["modelwise_search"], "model_config.modelwise_search")
            if "metric" in search:
                self.metric("search_metric", search["metric"], "model_config.modelwise_search.metric")
        if "layerwise_search" in config:
            search = self.object(config["layerwise_search"], "model_config.layerwise_search")
            self.set("layerwise_search", True, "model_config.layerwise_search")
            if "metric" in search:
                self.metric("layerwise_metric", search["metric"], "model_config.layerwise_search.metric")

    def activation(self, activation: dict[str, Any]) -> None:
        where = "model_config.activation"
        percentiles = None
        if "max_percentile" in activation:
            percentiles = self.many(activation["max_percentile"], f"{where}.max_percentile", "a number")
            clipping = [p for p in percentiles if p != 1.0]  # 1.0 is plain max; resolve() range-checks the rest
            if clipping:
                self.set("max_percentile", clipping, f"{where}.max_percentile")
        if "calibration_type" in activation:
            methods: list[str] = []
            for name in self.many(activation["calibration_type"], f"{where}.calibration_type", "a string"):
                name = check_choice(name, ("max", "kl"), f"{self.path}: {where}.calibration_type")
                if name == "kl":
                    methods.append("KL")
                    continue
                if percentiles is None or 1.0 in percentiles:
                    methods.append("MAX_MIN")
                if percentiles is not None and any(p < 1.0 for p in percentiles):
                    methods.append("REMOVAL_OUTLIER")
            self.set("activation_quant_method", list(dict.fromkeys(methods)), f"{where}.calibration_type")
        if "num_bin" in activation:
            self.many(activation["num_bin"], f"{where}.num_bin", "an integer")
            self.set("num_bin", activation["num_bin"], f"{where}.num_bin")
        if "max_num_bin" in activation:
            self.set("max_num_bin", self.one(activation["max_num_bin"], f"{where}.max_num_bin", "an integer"),
                     f"{where}.max_num_bin")
        for key in ("per_channel", "asymmetric"):  # a list: candidates of the model-wise search
            if key in activation:
                self.set(key, self.many(activation[key], f"{where}.{key}", "true or false"), f"{where}.{key}")

    def metric(self, key: str, value: Any, where: str) -> None:
        """A metric name; resolve() checks it is one lowbit knows."""
        self.set(key, self.one(value, where, "a string"), where)

    def set(self, key: str, value: Any, where: str) -> None:
        """Add ``key=value`` as its own layer, named by the file and the JSON path ``where``."""
        if key in self.set_by:
            raise self.error(where, f"sets {key}, which {self.set_by[key]} already sets; set it once")
        self.set_by[key] = where
        self.layers.append(({key: value}, f"{self.path}: {where}"))

    def object(self, value: Any, where: str, check_keys: bool = True) -> dict[str, Any]:
        """``value`` as a JSON object whose keys are those allowed at ``where`` (see KEYS)."""
        if not isinstance(value, dict):
            raise self.error(where or "top level", f"expected an object {{...}}, got {_show(value)}")
        if check_keys:
            allowed = KEYS[where]
            for key in value:
                if key not in allowed:
                    raise self.error(f"{where}.{key}" if where else key, "unknown key" + did_you_mean(key, allowed)
                                     + f"; keys of {where or 'the top level'}: " + ", ".join(allowed))
        return value

    def one(self, value: Any, where: str, kind: str) -> Any:
        """A single JSON value of ``kind`` (a list is an error: this key takes one value)."""
        if isinstance(value, list):
            raise self.error(where, f"expected {kind}, one value, not a list; got {_show(value)}")
        if not _KINDS[kind](value):
            raise self.error(where, f"expected {kind}, got {_show(value)}")
        return value

    def many(self, value: Any, where: str, kind: str) -> list[Any]:
        """One value of ``kind`` or a non-empty list of them, as a list."""
        items = value if isinstance(value, list) else [value]
        if not items:
            raise self.error(where, f"empty list; give {kind} or a list of them")
        if not all(_KINDS[kind](item) for item in items):
            raise self.error(where, f"expected {kind} or a list of them, got {_show(value)}")
        return items

    def error(self, where: str, message: str) -> LowbitError:
        return LowbitError(f"{self.path}: {where}: {message}")


def _show(value: Any) -> str:
    """A JSON value as the user wrote it, shortened for a one-line message."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."
