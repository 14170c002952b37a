"""calibrate blames the data only for what is the data's: a batch that does not fit the captured program.
Out of memory and a fault in quantization code (an observer) are reported as what they are."""

from __future__ import annotations

import pytest
import torch

from quantcli.quantizers.observers import ACTIVATION_OBSERVERS
from tests.conftest import assert_fails, cli


@pytest.fixture
def observers_raise(monkeypatch):
    """Make every activation observer's forward raise `exc` (a fault injected into quantization code)."""

    def inject(exc: BaseException) -> None:
        def forward(self, x):
            raise exc

        for cls in set(ACTIVATION_OBSERVERS.values()):
            monkeypatch.setattr(cls, "forward", forward)

    return inject


def test_an_observer_fault_is_an_internal_error_not_the_datas(work, tmp_path, observers_raise):
    observers_raise(IndexError("index 3 is out of bounds for dimension 0 with size 2"))
    run = cli("calibrate", work / "prepared", "-o", tmp_path / "calibrated")
    line = assert_fails(run, 1, "internal error: IndexError: index 3 is out of bounds", "--debug")
    assert "does not fit" not in line and "calibration batch" not in line
    assert not (tmp_path / "calibrated").exists()


def test_out_of_memory_in_calibration_says_so(work, tmp_path, observers_raise):
    observers_raise(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    run = cli("calibrate", work / "prepared", "-o", tmp_path / "calibrated")
    assert_fails(
        run,
        1,
        "calibration batch 0 ran out of memory: CUDA out of memory. Tried to allocate 2.00 GiB "
        "(lower calibration.batch_size)",
    )


def test_a_batch_the_captured_program_cannot_take_is_the_datas(work, tmp_path):
    """A batch whose static axis differs is the data's: exit 3 naming the batch, before any forward."""
    data = tmp_path / "data.py"
    data.write_text(
        "import numpy as np\n"
        "def batches():\n"
        "    yield {'calib_x': np.zeros((4, 1, 8, 8), np.float32)}\n"
        "    yield {'calib_x': np.zeros((4, 1, 8, 9), np.float32)}\n"
    )
    run = cli("calibrate", work / "prepared", "-o", tmp_path / "calibrated", "--data", f"{data}:batches")
    assert_fails(run, 3, "calibration batch 1: input 'x' has shape [4, 1, 8, 9]; axis 3 must be 8")
    assert not (tmp_path / "calibrated").exists()
