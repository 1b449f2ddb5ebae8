"""Per op type and per node precisions: the values of ``op_config`` and ``node_config``.

Horizon's quant_config names a precision per node (``node_config``) and per op type
(``op_config``): ``qtype`` for all of a node's inputs, ``input0`` / ``input1`` for one of
them (which wins over ``qtype``). lowbit reads the same settings from the Horizon JSON, from
the Python API (the same dicts) and from a MindSpore-style INI, where they are written
``name:qtype`` and ``name[1]:qtype`` (input 1), separated by commas.

lowbit adds ``int4`` to Horizon's precisions: a Conv / ConvTranspose / Gemm / MatMul whose
constant weight is stored as int4 (levels -7..7, opset 21) under 8-bit activations, per node
or per op type; with ``weight_bit_num=4``, ``int8`` on a node keeps its weight at 8 bits.

This module only parses and checks the values; which node ends up with which precision
(priority, target rules, fall-backs) is :mod:`lowbit.quantizers.precision`'s job, since it
needs the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import LowbitError, did_you_mean
from ..quantizers.levels import LEVEL_COUNTS

INT4, INT8, INT16, FLOAT16, FLOAT32, EC = "int4", "int8", "int16", "float16", "float32", "ec"
QTYPES = (INT4, INT8, INT16, FLOAT16, FLOAT32)
INPUT_QTYPES = (*QTYPES, EC)
INPUT_KEYS = ("input0", "input1")
LEVELS_KEY = "weight_levels"  # lowbit's key in an entry: the node's (op type's) non-uniform weight levels
NODE_KEYS = ("qtype", *INPUT_KEYS, LEVELS_KEY)
LEVEL_CHOICES = tuple(str(count) for count in LEVEL_COUNTS)


@dataclass(frozen=True)
class NodePrecision:
    """What one entry of op_config / node_config asks for, and where it was written (for errors)."""

    qtype: str | None = None
    inputs: dict[int, str] = field(default_factory=dict)
    where: str = ""
    weight_levels: str | None = None  # lowbit's key: K levels for this node's (op type's) weight

    @property
    def asks_precision(self) -> bool:
        """Whether the entry names a precision (an entry may only set weight_levels)."""
        return self.qtype is not None or bool(self.inputs)

    def asks(self, qtype: str) -> bool:
        """Whether the entry names ``qtype``, for the node or for one of its inputs."""
        return qtype in (self.qtype, *self.inputs.values())

    def for_input(self, index: int) -> str | None:
        """The precision of input ``index``: its own ``inputN`` first, else ``qtype``."""
        return self.inputs.get(index, self.qtype)


def parse_precisions(raw: Any, per_input: bool, where: str) -> dict[str, NodePrecision]:
    """Parse an op_config / node_config value: a dict (JSON, API) or ``name:qtype, name[1]:qtype`` (INI).

    ``per_input``: whether ``input0`` / ``input1`` are allowed (node_config; Horizon's op_config
    has ``qtype`` only). ``where`` prefixes error messages.
    """
    if isinstance(raw, str):
        raw = _parse_text(raw, per_input, where)
    if not isinstance(raw, Mapping):
        raise LowbitError(f"{where}: expected a mapping of names to precisions, got {type(raw).__name__}")
    out: dict[str, NodePrecision] = {}
    for name, entry in raw.items():
        if not isinstance(name, str) or not name:
            raise LowbitError(f"{where}: names must be non-empty strings, got {name!r}")
        out[name] = _parse_entry(entry, per_input, f"{where}.{name}")
    return out


def _parse_entry(entry: Any, per_input: bool, where: str) -> NodePrecision:
    if isinstance(entry, str):
        entry = {"qtype": entry}
    if not isinstance(entry, Mapping):
        raise LowbitError(f"{where}: expected {{\"qtype\": ...}} or a precision name, got {entry!r}")
    if not entry:
        raise LowbitError(f"{where}: empty; give qtype" + (", input0 or input1" if per_input else ""))
    keys = NODE_KEYS if per_input else ("qtype", LEVELS_KEY)
    qtype, inputs, levels = None, {}, None
    for key, value in entry.items():
        if key not in keys:
            hint = did_you_mean(str(key), keys)
            if not per_input and key in INPUT_KEYS:
                hint = " (input0/input1 are node_config keys; op_config takes qtype)"
            raise LowbitError(f"{where}: unknown key '{key}'{hint}; keys: {', '.join(keys)}")
        if key == LEVELS_KEY:
            levels = check_choice(str(value), LEVEL_CHOICES, f"{where}.{key}")
            continue
        choices = QTYPES if key == "qtype" else INPUT_QTYPES
        value = check_choice(value, choices, f"{where}.{key}")
        if key == "qtype":
            qtype = value
        else:
            inputs[int(key[-1])] = value
    return NodePrecision(qtype, inputs, where, levels)


def check_choice(value: Any, choices: tuple[str, ...], where: str) -> str:
    """``value`` as one of ``choices`` (case-insensitive), or a one-line error naming ``where``."""
    if not isinstance(value, str):
        raise LowbitError(f"{where}: expected a string, one of {', '.join(choices)}; got {value!r}")
    lowered = value.strip().lower()
    if lowered not in choices:
        raise LowbitError(f"{where}: unknown value '{value}'" + did_you_mean(lowered, choices)
                          + f"; allowed: {', '.join(choices)}")
    return lowered


def _parse_text(text: str, per_input: bool, where: str) -> dict[str, dict[str, str]]:
    """``name:qtype, name[1]:qtype`` -> the dict form. The qtype follows the last colon of each item."""
    entries: dict[str, dict[str, str]] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, qtype = item.rpartition(":")
        if not sep or not name.strip():
            raise LowbitError(f"{where}: '{item}': expected name:qtype" + (" or name[1]:qtype" if per_input else ""))
        key, name = "qtype", name.strip()
        if name.endswith("]") and "[" in name:
            name, _, index = name[:-1].rpartition("[")
            if not per_input or index not in ("0", "1"):
                raise LowbitError(f"{where}: '{item}': " + ("input index must be 0 or 1" if per_input
                                                            else "op_config sets whole op types (no [index])"))
            key = f"input{index}"
        entries.setdefault(name, {})[key] = qtype.strip()
    return entries


def describe(precisions: dict[str, NodePrecision]) -> str:
    """The INI form, for ``lowbit config show``."""
    items = []
    for name, entry in precisions.items():
        if entry.qtype is not None:
            items.append(f"{name}:{entry.qtype}")
        items += [f"{name}[{index}]:{qtype}" for index, qtype in sorted(entry.inputs.items())]
    return ",".join(items)

