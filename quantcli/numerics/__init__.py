"""Numerics apart from any command: the one streaming evaluator (export, report and tune use it)."""
