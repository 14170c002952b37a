"""Evaluation streams: a pass over data ten batches long peaks within 4 batches' bytes of a two-batch pass.

The evaluation images are small files that the model's image processor turns into 112 px float
batches of 4.8 MB (32 x 3 x 112 x 112 x 4 bytes), so holding the preprocessed data (48 MB for ten
batches) would show plainly in what is alive during the evaluation of an in-process `quantcli
export`: the memory tracemalloc traces (numpy's buffers, where the batches live, and every Python
object; not torch's or ONNX Runtime's allocators) from the first evaluation image read to the end,
exact, without the allocator's fragmentation that a process's resident size carries. Measured:
two batches 14 MiB, ten 19 MiB; with evaluation holding its batches (`list(batches)`) ten 51 MiB.
"""

from __future__ import annotations

import json
import tracemalloc

import pytest
import yaml
from PIL import Image

from quantcli import stages
from tests import hf_folders
from tests.conftest import cli

pytestmark = pytest.mark.slow

BATCH = 32
SIZE = 112
BATCH_BYTES = BATCH * 3 * SIZE * SIZE * 4


def images(folder, per_class):
    for seed, label in enumerate(("cat", "dog")):
        hf_folders.write_images(folder / label, per_class, seed=seed, size=(40, 30))
    return folder


def recipe(tmp_path, name, evaluation):
    doc = {
        "model": {"huggingface": str(tmp_path / "model"), "task": "image-classification"},
        "calibration": {"data": str(tmp_path / "calib"), "batch_size": 16, "num_batches": 2},
        "evaluation": {"data": str(evaluation), "batch_size": BATCH},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def peak_alive(tmp_path, name, evaluation, monkeypatch):
    """The peak of what tracemalloc saw alive in `quantcli export` from its first read of an evaluation image."""
    opened = Image.open

    def open_image(fp, *args, **kwargs):
        if not tracemalloc.is_tracing() and str(fp).startswith(str(evaluation)):
            tracemalloc.start()
        return opened(fp, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Image, "open", open_image)
        try:
            run = cli(
                "export",
                tmp_path / "w" / "converted",
                "-o",
                tmp_path / f"{name}.onnx",
                "--recipe",
                recipe(tmp_path, name, evaluation),
                "--quiet",
            )
            assert tracemalloc.is_tracing(), "no evaluation image was read"
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert run.rc == 0, run.stderr
    return peak


def test_evaluation_memory_is_bounded_by_a_batch(tmp_path, monkeypatch):
    hf_folders.resnet_folder(tmp_path / "model", ["cat", "dog"], size=SIZE)
    images(tmp_path / "calib", 16)
    two, ten = images(tmp_path / "two", BATCH), images(tmp_path / "ten", 5 * BATCH)
    w = tmp_path / "w"
    stages.capture.run(recipe(tmp_path, "base", two), w / "captured")
    stages.prepare.run(w / "captured", w / "prepared")
    stages.calibrate.run(w / "prepared", w / "calibrated")
    stages.convert.run(w / "calibrated", w / "converted")
    small, large = peak_alive(tmp_path, "two", two, monkeypatch), peak_alive(tmp_path, "ten", ten, monkeypatch)
    report = json.loads((tmp_path / "ten.report.json").read_text())["evaluation"]
    assert report["samples"] == 10 * BATCH
    print(
        f"peak alive: two batches {small / 2**20:.0f} MiB, ten batches {large / 2**20:.0f} MiB, "
        f"a batch {BATCH_BYTES / 2**20:.1f} MiB"
    )
    assert large - small < 4 * BATCH_BYTES, (small, large)
