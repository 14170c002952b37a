"""Numerics apart from any command: SQNR and the export parity check, the metrics, and the one streaming
evaluator (export, report and tune use it)."""
