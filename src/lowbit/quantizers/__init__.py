"""Quantizers: integer types and parameters, hardware presets, the plan and the QDQ rewrite."""
