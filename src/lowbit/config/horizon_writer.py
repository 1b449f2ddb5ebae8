"""Writing a resolved configuration back as Horizon's quant_config JSON, which lowbit reads again.

The accuracy search ends with a configuration the user can rerun without searching: the
node_config it chose, and every setting of the job that was not a default. Horizon's own
keys hold what they can (``model_config.all_node_type`` / ``model_output_type``,
``op_config``, ``node_config``); every other setting goes, under its lowbit name, into the
``"lowbit"`` object, which :mod:`lowbit.config.horizon_json` reads back to the same
values. The search's own keys (the evaluator and its budget) are left out: they are what
the rerun does without.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .fields import Field, Kind
from .model import DEFAULT, SEARCH_KEYS, QuantConfig, Setting, format_shapes, format_sources
from .precision import NodePrecision

LEFT_OUT = ("evaluator", "accuracy_target", *SEARCH_KEYS)  # what the rerun does without
HORIZON_MODEL_KEYS = ("all_node_type", "model_output_type")


def horizon_document(config: QuantConfig, node_config: dict[str, NodePrecision]) -> dict[str, Any]:
    """The quant_config document of ``config``, with ``node_config`` in place of the job's."""
    document: dict[str, Any] = {}
    model_config = {key: getattr(config, key) for key in HORIZON_MODEL_KEYS if getattr(config, key) is not None}
    if model_config:
        document["model_config"] = model_config
    if config.op_config:
        document["op_config"] = {name: _entry(entry) for name, entry in config.op_config.items()}
    if node_config:
        document["node_config"] = {name: _entry(entry) for name, entry in node_config.items()}
    own = {field.key: json_value(field, setting.value) for field, setting in config.items()
           if _chosen(setting) and setting.value is not None
           and field.key not in (*LEFT_OUT, *HORIZON_MODEL_KEYS, "op_config", "node_config")}
    if own:
        document["lowbit"] = own
    return document


def write_horizon_json(document: dict[str, Any], path: Path) -> None:
    """Write ``document`` to ``path`` atomically (a temporary file beside it, then a rename)."""
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(staged, path)


def json_value(field: Field, value: Any) -> Any:
    """The value as JSON that :func:`lowbit.config.model.parse_value` turns back into ``value``."""
    if field.kind is Kind.PATH_MAP:
        return format_sources(value)
    if field.kind is Kind.SHAPES:
        return format_shapes(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _chosen(setting: Setting) -> bool:
    """Set by the user or by a file format's default (MindSpore INI's MAX_MIN), not by lowbit's defaults.

    Defaults that follow other keys ("default for target_device=DSP") follow them again on the rerun.
    """
    return not (setting.source == DEFAULT or setting.source.startswith(f"{DEFAULT} for "))


def _entry(entry: NodePrecision) -> dict[str, str]:
    out = {"qtype": entry.qtype} if entry.qtype is not None else {}
    out.update({f"input{index}": qtype for index, qtype in sorted(entry.inputs.items())})
    if entry.weight_levels is not None:
        out["weight_levels"] = int(entry.weight_levels)
    return out
