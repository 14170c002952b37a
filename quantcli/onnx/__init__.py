"""ONNX export, checks, ONNX Runtime sessions and the integer-kernel report."""
