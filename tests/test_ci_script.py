"""scripts/ci-example.sh, the README's "Using quantcli in CI" script: it runs, reruns from a cache,
stops early on a bad recipe, and the documentation holds it verbatim."""

from __future__ import annotations

import json
import re
import shutil

import onnx

from quantcli import errors
from tests.conftest import CI_SCRIPT, ROOT, STAGES, digits_recipe, run_ci_script, snapshot

README = ROOT / "README.md"


def test_the_script_builds_the_model_stage_by_stage(ci_run):
    assert ci_run.rc == 0, ci_run.stderr
    w = ci_run.work
    assert sorted(p.name for p in w.iterdir()) == sorted([*STAGES, "export.json", "model.onnx", "model.report.json"])
    for stage in ("captured", "prepared", "calibrated", "converted", "exported"):
        out = w / ("model.onnx" if stage == "exported" else stage)
        assert f"{stage}: wrote {out} in " in ci_run.stderr
    assert ci_run.stderr.count("\n") == 5 and "error" not in ci_run.stderr  # one closing line per stage
    result = json.loads((w / "export.json").read_text())
    report = json.loads((w / "model.report.json").read_text())
    metadata = {p.key: json.loads(p.value) for p in onnx.load(str(w / "model.onnx")).metadata_props}
    assert result["manifest"]["key"] == metadata["quantcli.key"] and metadata["quantcli.status"] == "ok"
    evaluation = report["evaluation"]
    assert ci_run.stdout.splitlines()[-1] == (
        f"{w / 'model.onnx'}: written, parity {report['parity']['min_sqnr_db']:.1f} dB, "
        f"accuracy int8 {evaluation['int8_onnx']:.4f} (fp32 {evaluation['fp32_torch']:.4f})"
    )


def test_a_rerun_on_the_cached_work_folder_reuses_every_stage(ci_run, shared_recipe, tmp_path):
    work = tmp_path / "cached"
    shutil.copytree(ci_run.work, work)
    before = snapshot(work)
    rerun = run_ci_script(shared_recipe, work)
    assert rerun.rc == 0, rerun.stderr
    for stage in ("captured", "prepared", "calibrated", "converted", "exported"):
        out = work / ("model.onnx" if stage == "exported" else stage)
        assert f"{stage}: reused {out} (same inputs and options)" in rerun.stderr
    after = snapshot(work)
    assert after.pop("export.json") != before.pop("export.json")  # the script's own note: now "reused": true
    assert after == before  # every artifact, timings and report included, untouched
    assert rerun.stdout.splitlines()[-1].startswith(f"{work / 'model.onnx'}: reused, parity ")


def test_a_bad_recipe_stops_the_script_before_any_work(tmp_path):
    recipe = digits_recipe(tmp_path, quantization={"target": "onnxruntime", "observr": "minmax"})
    result = run_ci_script(recipe, tmp_path / "w")
    assert result.rc == 2
    assert result.stderr == (
        f"error: {recipe}: 1 problem(s): quantization.observr: unknown key; did you mean 'observer'?\n"
    )
    assert not (tmp_path / "w").exists()


def test_the_script_passes_on_an_artifact_error(ci_run, shared_recipe, tmp_path):
    (tmp_path / "w" / "captured").mkdir(parents=True)
    (tmp_path / "w" / "captured" / "notes.txt").write_text("not an artifact")
    result = run_ci_script(shared_recipe, tmp_path / "w")
    assert result.rc == 4 and result.stderr.splitlines()[-1].startswith(f"error: {tmp_path / 'w' / 'captured'} exists")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["captured"]


def _bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)


def test_readme_holds_the_ci_section_with_the_script_verbatim():
    text = README.read_text()
    assert "## Using quantcli in CI" in text
    assert CI_SCRIPT.read_text() in _bash_blocks(text), "README.md's CI script differs from scripts/ci-example.sh"


def test_documented_exit_codes_match_the_code():
    codes = {0, errors.EXIT_INTERRUPTED} | {
        cls.exit_code
        for cls in (
            errors.QuantCliError,
            errors.RecipeError,
            errors.InputError,
            errors.ArtifactError,
            errors.NumericsError,
            errors.GoalError,
        )
    }
    section = README.read_text().split("## Exit codes")[1].split("\n## ")[0]
    assert {int(m) for m in re.findall(r"^\| `?(\d+)`? \|", section, flags=re.M)} == codes
    block = CI_SCRIPT.read_text().split("# Exit codes")[1].split("\n#\n")[0].split("set -")[0]
    assert {int(m) for m in re.findall(r"(?:#  |  )\s*(\d+) [a-z]", block)} == codes
