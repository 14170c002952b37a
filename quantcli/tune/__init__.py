"""Accuracy-aware tuning: per-layer calibration methods and float fallbacks until a goal is met."""
