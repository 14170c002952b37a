"""Reports: accuracy, size and latency of the float and int8 models."""
