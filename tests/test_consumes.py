"""Each stage's reuse key covers every recipe section it consumes (artifacts.STAGES, the one list).

Editing any field of a consumed section makes the stage refuse its existing output (exit 4 without
--force: it would rerun), never answer "reused"; the unedited recipe reuses it. Run in-process on
the shared QAT chain, which has an output of every stage: refusal and reuse happen before any work.
"""

from __future__ import annotations

import pytest
import yaml

from quantcli import stages
from quantcli.artifacts import STAGES
from quantcli.errors import ArtifactError
from quantcli.onnx.export import read_metadata

EDITS = {
    "model": lambda r: r["model"]["kwargs"].update(width=1),
    "inputs": lambda r: r["inputs"][0].update(dynamic_axes={}),
    "outputs": lambda r: r.update(outputs=["scores"]),
    "quantization": lambda r: r["quantization"].update(observer="minmax"),
    "calibration": lambda r: r["calibration"].update(num_batches=2),
    "training": lambda r: r["training"].update(seed=1),
    "export": lambda r: r["export"].update(parity_max_excess_db=5.0),
    "evaluation": lambda r: r["evaluation"].update(batch_size=16),
}
INPUT = {
    "captured": None,
    "prepared": "captured",
    "calibrated": "prepared",
    "trained": "calibrated",
    "exported": "converted",
}
OUTPUT = {
    "captured": "captured",
    "prepared": "prepared",
    "calibrated": "calibrated",
    "trained": "trained",
    "exported": "model.onnx",
}
CASES = [(stage, section) for stage, spec in STAGES.items() for section in spec.consumes]


def run_stage(stage: str, work, recipe):
    src, out = work / str(INPUT[stage]), work / OUTPUT[stage]
    if stage == "captured":
        return stages.capture.run(recipe, out)
    if stage == "prepared":
        return stages.prepare.run(src, out, qat=True, recipe_path=recipe)
    return {"calibrated": stages.calibrate.run, "trained": stages.train.run, "exported": stages.export.run}[stage](
        src, out, recipe_path=recipe
    )


def test_every_consumed_section_is_edited_here():
    assert set(EDITS) == {section for _, section in CASES}
    assert [stage for stage, spec in STAGES.items() if spec.consumes] == list(INPUT)


@pytest.mark.parametrize("stage, section", CASES, ids=[f"{st}-{se}" for st, se in CASES])
def test_an_edited_consumed_section_is_never_reused(qat_work, tmp_path, stage, section):
    recorded = read_metadata(qat_work / "model.onnx")["recipe"]  # every section, as the chain consumed it
    same, edited = tmp_path / "same.yaml", tmp_path / "edited.yaml"
    same.write_text(yaml.safe_dump(recorded))
    assert run_stage(stage, qat_work, same).reused
    EDITS[section](recorded)
    edited.write_text(yaml.safe_dump(recorded))
    with pytest.raises(ArtifactError, match="exists and was made from other inputs or options"):
        run_stage(stage, qat_work, edited)
