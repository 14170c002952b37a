"""quantcli: PyTorch model + YAML recipe -> fast, accurate int8 ONNX through the PT2E flow."""

__version__ = "0.1.0"
