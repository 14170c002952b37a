"""ONNX Runtime sessions as users run them (default full graph optimizations), and timing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def session(
    path: str | Path, *, optimize: bool = True, threads: int = 0, optimized_path: str | Path | None = None
) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's own warnings would reach the user's terminal
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess: Any, batch: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs on `batch`; a decoder with a cache runs as the full-sequence model (its present
    cache not returned), quantcli.onnx.decoder."""
    from quantcli.onnx import decoder

    if not decoder.is_decoder(sess):
        return sess.run(None, {i.name: batch[i.name] for i in sess.get_inputs()})
    names = [o.name for o in sess.get_outputs() if not o.name.startswith(decoder.PRESENT_PREFIX)]
    return sess.run(names, decoder.feeds(sess, batch))


def run_model(model: Any, batch: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run an in-memory ONNX model once with graph optimizations off (a temporary file, removed after)."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory(prefix="quantcli-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(model, str(path))
        return run(session(path, optimize=False), batch)


def latency_ms(
    sess: Any, batch: Mapping[str, np.ndarray], runs: int = 20, warmup: int = 3, budget_s: float = 5.0
) -> float:
    """Median wall time of one run, in milliseconds: `runs` runs after `warmup`, fewer where they would take more
    than `budget_s` seconds (at least 3, after one warm-up run), as a large model's runs would."""
    start = time.perf_counter()
    run(sess, batch)
    if time.perf_counter() - start < budget_s / (runs + warmup):  # quick: the whole warm-up
        for _ in range(warmup - 1):
            run(sess, batch)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < runs and (len(times) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        run(sess, batch)
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 3)
