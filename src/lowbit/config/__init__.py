"""Configuration: the key table, the MindSpore-style INI reader and the resolved model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .fields import FIELDS, FIELDS_BY_KEY, Field, Kind
from .horizon_json import read_horizon_json
from .mindspore_ini import read_ini
from .model import CalibrationSource, QuantConfig, resolve

__all__ = ["FIELDS", "FIELDS_BY_KEY", "CalibrationSource", "Field", "Kind", "QuantConfig", "load_config"]


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    describe: Callable[[str], str] = lambda key: f"argument {key}",
) -> QuantConfig:
    """Resolve defaults, then the config file at ``path`` (if any), then ``overrides``.

    A ``.json`` file is Horizon's quant_config, anything else a MindSpore-style INI.
    ``describe`` names where an override came from (a CLI flag, an API argument).
    """
    layers: list[tuple[dict[str, Any], str]] = []
    if path is not None and str(path).lower().endswith(".json"):
        # Horizon without a calibration setting tries several methods: lowbit's default search.
        layers = read_horizon_json(path)
    elif path is not None:
        layers = read_ini(path)
        if not any("activation_quant_method" in values for values, _ in layers):
            # MindSpore documents MAX_MIN as its default; lowbit's own default (no INI) is the search.
            layers.insert(0, ({"activation_quant_method": "MAX_MIN"}, "default of MindSpore INI files"))
    for key, value in (overrides or {}).items():
        if value is not None:
            layers.append(({key: value}, describe(key)))
    return resolve(layers)
