"""quantcli: PyTorch model + YAML recipe -> fast, accurate int8 ONNX through the PT2E flow."""

import os as _os

__version__ = "0.1.0"

# ONNX Runtime writes a telemetry device id and event store under ~/.cache/Microsoft at import unless
# this is set; quantcli writes nothing under the user's home (a user's own setting is kept).
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
