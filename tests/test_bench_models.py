"""The benchmark's model factories (configs/bench) build and run one forward pass.

The zoo CNNs need torchvision/timm, which live off the default path (tests/zoo_site explains why),
so they run in a child process with tests/zoo_site and .venv/zoo on PYTHONPATH. Forward passes use
64-px inputs to stay fast; the benchmark itself runs them at 224 px.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "configs" / "bench"
ZOO = ROOT / ".venv" / "zoo"

VISION_CHILD = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import vision
report = {}
x = torch.from_numpy(vision.photos(2, size=64))
for name in vision.MODELS:
    with torch.no_grad():
        y = vision.build(name)(x)
    report[name] = {"shape": list(y.shape), "finite": bool(torch.isfinite(y).all()),
                    "varies": float((y[0] - y[1]).abs().max())}
batch = next(iter(vision.calibration(batches=1, batch_size=2)))
report["calibration"] = {k: [list(v.shape), str(v.dtype)] for k, v in batch.items()}
print(json.dumps(report))
"""


@pytest.mark.skipif(not ZOO.is_dir(), reason="torchvision/timm are not installed in .venv/zoo")
def test_zoo_cnns_build_and_run():
    path = os.pathsep.join(map(str, [ROOT / "tests" / "zoo_site", ZOO, ROOT]))
    proc = subprocess.run(
        [sys.executable, "-c", VISION_CHILD, str(BENCH)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report.pop("calibration") == {"x": [[2, 3, 224, 224], "float32"]}
    assert len(report) == 8
    for name, r in report.items():
        assert r["shape"] == [2, 1000] and r["finite"] and r["varies"] > 0, (name, r)


def test_encoder_builds_and_runs():
    import torch

    spec = importlib.util.spec_from_file_location("bench_text", BENCH / "text.py")
    text = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(text)
    rows = text.held_out(count=3)
    assert rows["input_ids"].shape == rows["attention_mask"].shape == (3, text.SEQ)
    assert (rows["input_ids"][:, 0] == text.CLS).all()
    lengths = rows["attention_mask"].sum(1)
    assert (rows["input_ids"][np.arange(3), lengths - 1] == text.SEP).all()
    model = text.encoder()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in rows.items()})
    assert out.shape == (3, 384) and torch.isfinite(out).all()
    ranges = text.activation_ranges(model, rows)
    assert ranges["fc1_input"]["outlier_max"] > 3 * ranges["fc1_input"]["other_p99"]  # the planted outliers
