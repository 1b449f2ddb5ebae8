"""Calibration: observers of tensor statistics, and the range methods that read them."""
