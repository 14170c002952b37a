"""The artifact contract in-process: hashes, keys, atomic staging, reuse/refuse, verification.

No torch: artifacts are built by hand here; the CLI tests exercise the same code through real stages.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantcli import artifacts, staging
from quantcli.artifacts import MANIFEST, PROGRAM, STATE, TIMINGS
from quantcli.errors import ArtifactError, InputError


@contextlib.contextmanager
def fails(error: type[Exception], fragment: str):
    """The error's whole line (message and hint, as the CLI prints it) must hold `fragment`."""
    with pytest.raises(error) as info:
        yield
    assert fragment in info.value.line(), info.value.line()


def make_artifact(
    folder: Path, stage: str = "captured", key: str = "k1", status: str = "ok", files: dict[str, bytes] | None = None
) -> dict:
    """A committed stage folder written through `staging`, as stages write them."""
    files = {PROGRAM: b"program bytes", STATE: b"state bytes"} if files is None else files
    with staging.staging(folder) as st:
        for name, data in files.items():
            (st.tmp / name).write_bytes(data)
        manifest = {"schema_version": artifacts.SCHEMA_VERSION, "stage": stage, "status": status, "key": key}
        return st.seal(manifest, {"seconds": 1.25})


def test_staging_commits_by_rename_with_hashes_and_timings_apart(tmp_path):
    out = tmp_path / "captured"
    manifest = make_artifact(out)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, PROGRAM, STATE, TIMINGS]
    assert manifest["files"][PROGRAM] == {"sha256": artifacts.sha256_file(out / PROGRAM), "size": 13}
    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk == manifest and "seconds" not in json.dumps(on_disk)  # timings are outside the hashed part
    assert json.loads((out / TIMINGS).read_text()) == {"seconds": 1.25}
    assert [p.name for p in tmp_path.iterdir()] == ["captured"]  # no temporary left beside it


def test_manifest_bytes_do_not_depend_on_timings_or_insertion_order(tmp_path):
    a = make_artifact(tmp_path / "a")
    with staging.staging(tmp_path / "b") as st:
        (st.tmp / STATE).write_bytes(b"state bytes")
        (st.tmp / PROGRAM).write_bytes(b"program bytes")
        st.seal(
            {"key": "k1", "status": "ok", "stage": "captured", "schema_version": artifacts.SCHEMA_VERSION},
            {"seconds": 99.0},
        )
    assert (tmp_path / "a" / MANIFEST).read_bytes() == (tmp_path / "b" / MANIFEST).read_bytes()
    assert artifacts.Artifact(tmp_path / "a", a).digest == artifacts.Artifact(tmp_path / "b", a).digest


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_staging_leaves_nothing_when_the_body_fails_or_is_interrupted(tmp_path, error):
    out = tmp_path / "calibrated"
    with pytest.raises(type(error)):
        with staging.staging(out) as st:
            (st.tmp / PROGRAM).write_bytes(b"half")
            raise error
    assert list(tmp_path.iterdir()) == []


def test_staging_under_a_file_is_an_artifact_error(tmp_path):
    (tmp_path / "a-file").write_text("mine")
    with fails(
        ArtifactError,
        f"cannot write {tmp_path / 'a-file' / 'out'}: {tmp_path / 'a-file'} is not a folder "
        "(choose another output path)",
    ):
        make_artifact(tmp_path / "a-file" / "out")
    assert (tmp_path / "a-file").read_text() == "mine"


def test_staging_replaces_an_existing_artifact_whole(tmp_path):
    out = tmp_path / "captured"
    make_artifact(out, files={PROGRAM: b"old", "extra.bin": b"old only"})
    make_artifact(out, files={PROGRAM: b"new"})
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, PROGRAM, TIMINGS]
    assert (out / PROGRAM).read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["captured"]


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    out = tmp_path / "calibrated"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".calibrated.tmp-{dead_pid}-abcd1234"
    stale.mkdir()
    (stale / PROGRAM).write_bytes(b"partial")
    stale_old = tmp_path / f".calibrated.old-{dead_pid}-abcd1234"
    stale_old.mkdir()
    live = tmp_path / f".calibrated.tmp-{os.getppid()}-abcd1234"  # our parent is alive
    live.mkdir()
    other = tmp_path / f".prepared.tmp-{dead_pid}-abcd1234"  # another output's: not ours to judge
    other.mkdir()
    make_artifact(out)
    make_artifact(out)  # a replacement creates an .old- sibling: stale ones of that tag go too
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["calibrated", live.name, other.name])


def test_stage_key_changes_with_each_of_its_parts(monkeypatch):
    base = dict(
        stage="calibrated", options={"calibration": {"batch_size": 32}}, parent="p", data={"calibration.data": "d"}
    )
    key = artifacts.stage_key(**base)
    assert artifacts.stage_key(**base) == key
    variants = [
        dict(base, stage="prepared"),
        dict(base, options={"calibration": {"batch_size": 16}}),
        dict(base, parent="q"),
        dict(base, data={"calibration.data": "e"}),
    ]
    assert len({key} | {artifacts.stage_key(**v) for v in variants}) == 5
    monkeypatch.setattr(artifacts, "__version__", "999.0")
    assert artifacts.stage_key(**base) != key


# --- check_output: reuse, refuse, replace -------------------------------------------------------


def test_check_output_free_path(tmp_path):
    assert staging.check_output(tmp_path / "nothing", "k1", force=False, stage="captured") is None


def test_check_output_reuses_a_complete_output_with_the_same_key(tmp_path):
    manifest = make_artifact(tmp_path / "c")
    assert staging.check_output(tmp_path / "c", "k1", force=False, stage="captured") == manifest


@pytest.mark.parametrize(
    "key, stage, status, fragment",
    [
        ("k2", "captured", "ok", "was made from other inputs or options"),
        ("k1", "prepared", "ok", "is a captured artifact, not a prepared one"),
        ("k1", "captured", "parity_failed", "is marked parity_failed"),
    ],
)
def test_check_output_refuses_another_key_stage_or_a_failed_output_unless_forced(
    tmp_path, key, stage, status, fragment
):
    make_artifact(tmp_path / "c", status=status)
    with pytest.raises(ArtifactError) as info:
        staging.check_output(tmp_path / "c", key, force=False, stage=stage)
    assert f"{fragment} (" in info.value.line() and info.value.line().endswith("pass --force to replace it)")
    assert staging.check_output(tmp_path / "c", key, force=True, stage=stage) is None


def test_check_output_does_not_reuse_a_truncated_output(tmp_path):
    make_artifact(tmp_path / "c")
    (tmp_path / "c" / STATE).write_bytes(b"state")
    with fails(
        ArtifactError, "exists but is corrupt: state.pt is truncated or altered: 5 bytes, the manifest records 11"
    ):
        staging.check_output(tmp_path / "c", "k1", force=False, stage="captured")


@pytest.mark.parametrize("force", [False, True])
def test_check_output_never_replaces_a_folder_that_is_not_an_artifact(tmp_path, force):
    for layout in (
        {"notes.txt": "mine"},
        {MANIFEST: '{"name": "my web app"}', "index.html": "<html>"},
        {MANIFEST: "{}"},
    ):
        folder = tmp_path / f"user{len(layout)}{len(str(layout))}"
        folder.mkdir()
        for name, text in layout.items():
            (folder / name).write_text(text)
        with fails(
            ArtifactError, "exists and is not a quantcli artifact (choose another output path; it is never replaced)"
        ):
            staging.check_output(folder, "k1", force=force, stage="captured")
    user_file = tmp_path / "file.txt"
    user_file.write_text("mine")
    with fails(ArtifactError, "exists and is not a quantcli artifact"):
        staging.check_output(user_file, "k1", force=force, stage="captured")


def test_force_never_deletes_files_quantcli_did_not_write(tmp_path):
    make_artifact(tmp_path / "c")
    (tmp_path / "c" / "my-notes.txt").write_text("mine")
    with fails(ArtifactError, "holds files quantcli did not write (my-notes.txt)"):
        staging.check_output(tmp_path / "c", "k2", force=True, stage="captured")


def test_a_quantcli_artifact_with_an_unreadable_manifest_is_replaced_only_with_force(tmp_path):
    make_artifact(tmp_path / "c")
    (tmp_path / "c" / MANIFEST).write_text('{"stage": "capt')
    with fails(ArtifactError, "is a corrupt quantcli artifact (unreadable manifest.json) (pass --force"):
        staging.check_output(tmp_path / "c", "k1", force=False, stage="captured")
    assert staging.check_output(tmp_path / "c", "k1", force=True, stage="captured") is None


# --- open_artifact: what a stage accepts as input ------------------------------------------------


def test_open_artifact_accepts_a_whole_artifact_of_the_expected_stage(tmp_path):
    manifest = make_artifact(tmp_path / "c", stage="calibrated")
    art = artifacts.open_artifact(tmp_path / "c", ("calibrated", "trained"), "convert")
    assert art.stage == "calibrated" and art.manifest == manifest


def test_open_artifact_names_the_command_that_makes_the_needed_stage(tmp_path):
    make_artifact(tmp_path / "c", stage="captured")
    with pytest.raises(ArtifactError) as info:
        artifacts.open_artifact(tmp_path / "c", ("calibrated", "trained"), "convert")
    assert info.value.line() == (
        f"{tmp_path / 'c'} is a captured artifact; `quantcli convert` needs calibrated "
        "(made by `quantcli calibrate`) or trained (made by `quantcli train`)"
    )
    with fails(
        InputError, "does not exist (`quantcli prepare` needs a captured artifact (made by `quantcli capture`))"
    ):
        artifacts.open_artifact(tmp_path / "none", ("captured",), "prepare")


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (
            lambda f: (f / STATE).write_bytes(b"state"),
            "state.pt is truncated or altered: 5 bytes, the manifest records 11",
        ),
        (lambda f: (f / STATE).write_bytes(b"STATE bytes"), "state.pt does not match its recorded sha256"),
        (lambda f: (f / PROGRAM).unlink(), "program.pt2 is missing"),
        (lambda f: (f / MANIFEST).write_text("{"), "manifest.json is corrupt"),
        (lambda f: (f / MANIFEST).unlink(), "is not a quantcli artifact (no manifest.json)"),
    ],
)
def test_open_artifact_refuses_a_damaged_artifact_naming_the_file(tmp_path, damage, fragment):
    make_artifact(tmp_path / "c")
    damage(tmp_path / "c")
    with pytest.raises(ArtifactError) as info:
        artifacts.open_artifact(tmp_path / "c", ("captured",), "prepare")
    assert fragment in info.value.line()


@pytest.mark.parametrize(
    "edit, fragment",
    [
        ({"schema_version": 99}, f"has artifact schema 99, this quantcli reads {artifacts.SCHEMA_VERSION}"),
        ({"files": ["program.pt2"]}, "not a quantcli manifest"),
        ({"files": {"../../etc/passwd": {"sha256": "0", "size": 1}}}, "not a quantcli manifest"),
        ({"files": {"program.pt2": {"sha256": "0"}}}, "not a quantcli manifest"),
        ({"stage": None}, "not a quantcli manifest"),
    ],
)
def test_open_artifact_refuses_an_edited_manifest_as_an_artifact_error(tmp_path, edit, fragment):
    manifest = make_artifact(tmp_path / "c")
    (tmp_path / "c" / MANIFEST).write_text(json.dumps({**manifest, **edit}))
    with pytest.raises(ArtifactError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        artifacts.open_artifact(tmp_path / "c", ("captured",), "prepare")


def test_an_artifact_whose_recorded_recipe_this_version_cannot_read_is_an_artifact_error(tmp_path):
    """An artifact of another quantcli version, whose recipe holds a key this schema does not know."""
    from quantcli.stages.base import recipe_of

    make_artifact(tmp_path / "p", stage="prepared")
    manifest = json.loads((tmp_path / "p" / MANIFEST).read_text())
    manifest["recipe"] = {
        "model": {"factory": "m.py:build"},
        "calibration": {"data": "d.npz", "observer_v0": "histogram"},
    }
    (tmp_path / "p" / MANIFEST).write_text(json.dumps({**manifest, "quantcli_version": "0.0.1"}))
    art = artifacts.open_artifact(tmp_path / "p", ("prepared",), "calibrate")
    with fails(ArtifactError, "calibration.observer_v0: unknown key"):
        recipe_of(art)
    with fails(ArtifactError, "made by quantcli 0.0.1, this is"):
        recipe_of(art)
    with fails(ArtifactError, "recreate it with `quantcli prepare`"):
        recipe_of(art)
