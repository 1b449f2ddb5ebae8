"""Choosing among calibration candidates: metrics, model-wise and layer-wise search."""
