"""Accuracy recovery passes that run after quantization: bias correction (more to come)."""
