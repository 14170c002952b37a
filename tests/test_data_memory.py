"""Evaluation streams: a pass over data ten batches long peaks within 4 batches' bytes of a two-batch pass.

The evaluation images are small files that the model's image processor turns into 224 px float
batches of 38.5 MB (64 x 3 x 224 x 224 x 4 bytes), so holding the preprocessed data (385 MB for ten
batches) would show plainly in the peak resident memory of the process, measured by `getrusage` in a
fresh `quantcli export` process each. The reference pass has two batches, not one: ONNX Runtime's and
torch's allocators grow over the first two runs. After that the resident memory at the end of each
batch stays flat (measured batch by batch: 922-947 MiB from the 2nd to the 10th), while the peak
inside a batch (the image processor's per-image float copies beside the models' buffers) still
creeps up by allocator fragmentation: measured 2.6-3.1 batches above the two-batch pass. Keeping
the preprocessed data would add 8 batches.
"""

from __future__ import annotations

import subprocess
import sys

import yaml

from quantcli import stages
from tests import hf_folders
from tests.byo import ROOT

BATCH = 64
BATCH_BYTES = BATCH * 3 * 224 * 224 * 4

EXPORT = """
import resource, sys
from quantcli.cli import main
try:
    main(["export", sys.argv[1], "-o", sys.argv[2], "--recipe", sys.argv[3], "--quiet"])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def images(folder, per_class):
    for seed, label in enumerate(("cat", "dog")):
        hf_folders.write_images(folder / label, per_class, seed=seed, size=(40, 30))
    return folder


def recipe(tmp_path, name, evaluation):
    doc = {"model": {"huggingface": str(tmp_path / "model"), "task": "image-classification"},
           "calibration": {"data": str(tmp_path / "two"), "batch_size": 16, "num_batches": 2},
           "evaluation": {"data": str(evaluation), "batch_size": BATCH}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def peak_rss(tmp_path, name, evaluation):
    proc = subprocess.run([sys.executable, "-c", EXPORT, str(tmp_path / "w" / "converted"),
                           str(tmp_path / f"{name}.onnx"), str(recipe(tmp_path, name, evaluation))],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().splitlines()[-1])


def test_evaluation_memory_is_bounded_by_a_batch(tmp_path):
    hf_folders.resnet_folder(tmp_path / "model", ["cat", "dog"], size=224)
    two, ten = images(tmp_path / "two", BATCH), images(tmp_path / "ten", 5 * BATCH)
    w = tmp_path / "w"
    stages.capture.run(recipe(tmp_path, "base", two), w / "captured")
    stages.prepare.run(w / "captured", w / "prepared")
    stages.calibrate.run(w / "prepared", w / "calibrated")
    stages.convert.run(w / "calibrated", w / "converted")
    small, large = peak_rss(tmp_path, "two", two), peak_rss(tmp_path, "ten", ten)
    import json

    report = json.loads((tmp_path / "ten.report.json").read_text())["evaluation"]
    assert report["samples"] == 10 * BATCH
    print(f"peak RSS: two batches {small / 2**20:.0f} MiB, ten batches {large / 2**20:.0f} MiB, "
          f"a batch {BATCH_BYTES / 2**20:.1f} MiB")
    assert large - small < 4 * BATCH_BYTES, (small, large)
