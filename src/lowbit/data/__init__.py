"""Calibration data: sources of feed dicts and the checks each sample passes."""
