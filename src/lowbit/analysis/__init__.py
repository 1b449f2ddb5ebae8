"""Where a quantized model loses accuracy: per-node sensitivity, tensors along the graph, the report."""
