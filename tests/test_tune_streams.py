"""tune measures every trial by streaming its data: each batch is scored before the next is read.

The evaluation data is a callable that logs each batch it yields, and ONNX Runtime's runs are logged
beside it: a streaming measurement interleaves them (read 0, run 0, read 1, run 1, ...); one that
held the data (the in-memory loop tune had) would read every batch before the first run.
"""

from __future__ import annotations

import numpy as np

from quantcli import _torch, artifacts
from quantcli.loading.factory import load_callable
from quantcli.onnx import runtime
from quantcli.stages.base import recipe_of
from quantcli.tune.goal import Goal, Judge
from tests.conftest import DIGITS

BATCHES = 5
EVENTS: list[str] = []


def batches():
    data = np.load(DIGITS / "digits.npz")
    for i in range(BATCHES):
        EVENTS.append(f"read {i}")
        yield {"x": data["test_x"][32 * i : 32 * (i + 1)], "targets": data["test_y"][32 * i : 32 * (i + 1)]}


def test_tune_scores_each_batch_before_reading_the_next(work, monkeypatch):
    converted = artifacts.open_artifact(work / "converted", ("converted",), "tune")
    recipe = recipe_of(converted)
    source = f"{__file__}:batches"  # imported by quantcli as a module of its own: its EVENTS is that module's
    events = load_callable(source, "evaluation.data").__globals__["EVENTS"]
    evaluation = recipe.evaluation.model_copy(update={"data": source, "keys": {}, "targets": "targets"})
    recipe = recipe.model_copy(update={"evaluation": evaluation})
    judge = Judge(recipe, _torch.load_program(converted.file(artifacts.FLOAT_PROGRAM)), Goal(max_drop=0.5))
    ran = runtime.run

    def logged_run(sess, batch):
        events.append("run")
        return ran(sess, batch)

    monkeypatch.setattr(runtime, "run", logged_run)
    events.clear()
    measured = judge.measure(work / "model.onnx")
    assert judge.batches == BATCHES and 0.9 < measured["int8_onnx"] <= 1.0
    assert events[: 2 * BATCHES] == [e for i in range(BATCHES) for e in (f"read {i}", "run")], events
