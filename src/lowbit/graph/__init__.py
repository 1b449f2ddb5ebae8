"""Graph handling: loading ONNX models, preparation passes, queries and ORT sessions."""
