"""The pipeline of each quant type."""

from __future__ import annotations

from collections.abc import Callable

from .dynamic import dynamic_quant
from .full import full_quant
from .passes import Pass
from .weight import weight_quant

PIPELINES: dict[str, Callable[[], list[Pass]]] = {
    "FULL_QUANT": full_quant,
    "WEIGHT_QUANT": weight_quant,
    "DYNAMIC_QUANT": dynamic_quant,
}
