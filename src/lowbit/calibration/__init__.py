"""Calibration: observers of tensor statistics and the streaming collector."""
