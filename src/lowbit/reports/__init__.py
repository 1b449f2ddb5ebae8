"""Reports a person reads: the end-of-job summary (per-layer diagnosis comes later)."""
