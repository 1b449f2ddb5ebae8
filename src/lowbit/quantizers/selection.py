"""Which weights a quantization mode touches: the settings every mode shares.

MindSpore's ``skip_quant_node``, ``min_quant_weight_size`` and ``min_quant_weight_channel``
mean the same in full, dynamic and weight-only quantization, and so does ``per_channel``.
Each mode's options extend :class:`WeightSelection`, so the thresholds are checked, and
explained, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config.model import QuantConfig


@dataclass(frozen=True)
class WeightSelection:
    per_channel: bool = True
    skip_nodes: frozenset[str] = frozenset()
    min_weight_size: int = 0  # 0: no threshold
    min_weight_channels: int = 0  # 0: no threshold

    @staticmethod
    def settings(config: QuantConfig) -> dict[str, Any]:
        """The selection's fields from the configuration, as keyword arguments of any mode's options.

        With ``per_channel=true,false`` (full quantization's search compares both) the first is the plan's.
        """
        return {"per_channel": config.per_channel[0], "skip_nodes": frozenset(config.skip_quant_node),
                "min_weight_size": config.min_quant_weight_size,
                "min_weight_channels": config.min_quant_weight_channel}

    def too_small(self, size: int, channels: int | None) -> str | None:
        """Why a weight of ``size`` elements and ``channels`` output channels stays float, or None.

        ``channels`` None: the weight has no output-channel axis to count (an embedding table).
        """
        if self.min_weight_size and size <= self.min_weight_size:
            return f"weight has {size} elements, not more than min_quant_weight_size"
        if channels is not None and self.min_weight_channels and channels <= self.min_weight_channels:
            return f"weight has {channels} channels, not more than min_quant_weight_channel"
        return None
