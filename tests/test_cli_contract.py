"""The contract a CI script relies on, through the real CLI: JSON on stdout, quiet and plain stderr,
reuse/refuse/--force, reproducible outputs, later stages' --recipe, parity failure, interrupts."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
import pytest

from quantcli import __version__, artifacts, errors
from tests.conftest import (
    ANSI,
    DIGITS_RECIPE,
    ROOT,
    STAGES,
    assert_fails,
    cli,
    cli_env,
    digits_recipe,
    leftovers,
    quantcli,
    snapshot,
)

# --- start-up: no torch where none is needed ---------------------------------------------------------


def test_version_help_and_validate_do_not_import_torch_or_numpy():
    probe = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from quantcli.cli import main
        codes = []
        for argv in (["--version"], ["--help"], ["validate", {str(DIGITS_RECIPE)!r}],
                     ["run", "--recipe", {str(DIGITS_RECIPE)!r}, "-o", "w", "--dry-run", "--json"]):
            with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
                try:
                    main(argv)
                except SystemExit as exc:
                    codes.append(exc.code)
        heavy = sorted(m for m in ("torch", "torchao", "onnx", "onnxruntime", "numpy") if m in sys.modules)
        print(json.dumps({{"codes": codes, "heavy": heavy}}))
    """)
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert json.loads(proc.stdout) == {"codes": [0, 0, 0, 0], "heavy": []}, proc.stderr


def test_version():
    run = quantcli("--version")
    assert (run.rc, run.stdout, run.stderr) == (0, f"quantcli {__version__}\n", "")


def test_an_unexpected_error_is_exit_1_and_one_line(capsys):
    from typer import Exit

    from quantcli.console import Output, execute

    def buggy(progress):
        raise ValueError("the impossible happened\nsecond line")

    with pytest.raises(Exit) as info:
        execute(Output(json=True), buggy)
    assert info.value.exit_code == 1
    captured = capsys.readouterr()
    message = "internal error: ValueError: the impossible happened (rerun with --debug for the traceback)"
    assert json.loads(captured.out) == {"error": {"code": 1, "kind": "internal", "message": message}}
    assert captured.err == f"error: {message}\n"


def documented_exit_codes() -> dict[int, str]:
    """The exit-code table of the user documentation (README.md or docs/*.md): code -> meaning."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        if "## Exit codes" in text:
            section = text.split("## Exit codes")[1].split("\n## ")[0]
            rows = re.findall(r"^\| `?(\d+)`? \| (.*) \|$", section, flags=re.M)
            return {int(code): meaning for code, meaning in rows}
    raise AssertionError("no exit-code table in README.md or docs/")


def test_error_classes_carry_the_documented_exit_codes():
    """Each error class's code is the documented row that names what it is about (the docs, not the constants)."""
    about = {
        errors.QuantCliError: "internal error",
        errors.RecipeError: "recipe",
        errors.InputError: "input error",
        errors.ModelError: "model factory",
        errors.DataError: "data",
        errors.ArtifactError: "artifact error",
        errors.NumericsError: "numerical check",
        errors.GoalError: "accuracy goal not met",
    }
    table = documented_exit_codes()
    for cls, words in about.items():
        assert words in table[cls.exit_code], (cls.__name__, cls.exit_code, table[cls.exit_code])
    assert "interrupted" in table[errors.EXIT_INTERRUPTED] and "success" in table[0]
    assert set(table) == {0, errors.EXIT_INTERRUPTED} | {cls.exit_code for cls in about}


# --- --json and --quiet on every subcommand --------------------------------------------------------------


def _commands(w: Path, recipe: Path) -> dict[str, list]:
    return {
        "validate": ["validate", recipe],
        "run --dry-run": ["run", "--recipe", recipe, "-o", w, "--dry-run"],
        "capture": ["capture", "--recipe", recipe, "-o", w / "captured"],
        "prepare": ["prepare", w / "captured", "-o", w / "prepared"],
        "calibrate": ["calibrate", w / "prepared", "-o", w / "calibrated"],
        "convert": ["convert", w / "calibrated", "-o", w / "converted"],
        "export": ["export", w / "converted", "-o", w / "model.onnx"],
        "inspect folder": ["inspect", w / "calibrated"],
        "inspect onnx": ["inspect", w / "model.onnx"],
        "report": ["report", w / "converted", "--batches", "1"],
    }


def test_json_and_quiet_on_every_subcommand(copy_work, shared_recipe):
    """On a cached work folder every command succeeds without work: one JSON document, silent stderr."""
    w = copy_work(*STAGES, "model.onnx", "model.report.json")
    before = snapshot(w)
    docs = {}
    for name, args in _commands(w, shared_recipe).items():
        run = cli(*args, "--json", "--quiet")
        assert (run.rc, run.stderr) == (0, ""), (name, run.stderr)
        docs[name] = run.json()
    assert snapshot(w) == before  # everything was reused, nothing rewritten
    assert docs["validate"] == {
        "recipe": str(shared_recipe),
        "valid": True,
        "files": [
            str(ROOT / "configs/digits/model.py"),
            str(ROOT / "configs/digits/digits.npz"),
            str(ROOT / "configs/digits/digits.npz"),
        ],
    }
    plan = docs["run --dry-run"]
    assert [(s["command"], s["out"]) for s in plan["steps"]] == [
        ("capture", str(w / "captured")),
        ("prepare", str(w / "prepared")),
        ("calibrate", str(w / "calibrated")),
        ("convert", str(w / "converted")),
        ("export", str(w / "model.onnx")),
    ]
    assert plan["recipe"]["model"]["factory"] == f"{ROOT / 'configs/digits/model.py'}:build"  # resolved
    assert plan["recipe"]["quantization"]["observer"] == "auto"  # defaults filled in
    for name, stage in zip(
        ["capture", "prepare", "calibrate", "convert", "export"],
        ["captured", "prepared", "calibrated", "converted", "exported"],
    ):
        assert docs[name]["reused"] is True and docs[name]["manifest"]["stage"] == stage, name
    assert docs["inspect folder"]["manifest"] == json.loads((w / "calibrated" / "manifest.json").read_text())
    assert docs["inspect onnx"]["manifest"]["status"] == "ok"
    assert docs["report"]["worst"] and docs["report"]["data"]["batches"] == 1


def test_without_json_results_on_stdout_and_one_closing_line_per_stage_on_stderr(shared_recipe, copy_work):
    w = copy_work("captured")
    run = cli("capture", "--recipe", shared_recipe, "-o", w / "captured")
    assert run.rc == 0 and run.stdout == f"{w / 'captured'}\n"
    assert run.stderr == f"captured: reused {w / 'captured'} (same inputs and options)\n"
    assert not ANSI.search(run.stdout + run.stderr)  # not a terminal: plain


@pytest.mark.parametrize(
    "command",
    ["validate", "run", "capture", "prepare", "calibrate", "train", "convert", "export", "inspect", "report", "tune"],
)
def test_every_subcommand_fails_with_one_json_error_document(tmp_path, command):
    missing = tmp_path / "missing"
    args = {
        "validate": [missing],
        "run": ["--recipe", missing, "-o", tmp_path / "w"],
        "capture": ["--recipe", missing, "-o", tmp_path / "w"],
        "inspect": [missing],
        "report": [missing],
        "tune": ["--recipe", missing, "-o", tmp_path / "w", "--min-sqnr", "30"],
    }.get(command, [missing, "-o", tmp_path / "w"])
    run = cli(command, *args, "--json", "--quiet")
    assert run.rc == 3
    error = run.json()["error"]
    assert error["code"] == 3 and error["kind"] == "input" and str(missing) in error["message"]
    assert run.stderr == f"error: {error['message']}\n"  # --quiet keeps the error line
    assert sorted(os.listdir(tmp_path)) == []


def test_errors_with_json_give_one_error_document_and_quiet_keeps_the_error_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {factory: m.py:build, kwarg: 1}\ninputs: [{name: x, shape: [1]}]\n")
    run = cli("capture", "--recipe", recipe, "-o", tmp_path / "out", "--json", "--quiet")
    assert run.rc == 2
    error = run.json()["error"]
    assert error["code"] == 2 and error["kind"] == "recipe" and "model.kwarg: unknown key" in error["message"]
    assert run.stderr == f"error: {error['message']}\n"


def _on_a_terminal(args: list, **env: str) -> tuple[int, str]:
    """Run quantcli with stdout and stderr on a pseudo-terminal; (exit code, what it printed)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantcli", *map(str, args)],
        stdout=follower,
        stderr=follower,
        stdin=subprocess.DEVNULL,
        env=cli_env(**env),
        cwd=ROOT,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=60), b"".join(chunks).decode()


def test_no_color_makes_terminal_output_plain(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{factory: '{ROOT / 'configs/digits/model.py'}:build'}}\n"
        "inputs: [{name: x, shape: [1]}]\nexprt: {}\n"
    )
    code, coloured = _on_a_terminal(["validate", recipe])
    assert code == 2 and ANSI.search(coloured)  # a terminal gets a red error line...
    code, plain = _on_a_terminal(["validate", recipe], NO_COLOR="1")
    assert code == 2 and not ANSI.search(plain)  # ...unless NO_COLOR is set
    assert plain.strip() == f"error: {recipe}: 1 problem(s): exprt: unknown key; did you mean 'export'?"


# --- artifacts: reuse, refuse, --force -------------------------------------------------------------------


def test_a_rerun_with_other_options_is_refused_and_force_replaces(copy_work):
    w = copy_work("prepared", "calibrated")
    before = snapshot(w / "calibrated")
    args = ["calibrate", w / "prepared", "-o", w / "calibrated", "--batches", "2"]
    assert_fails(
        cli(*args),
        4,
        f"{w / 'calibrated'} exists and was made from other inputs or options: "
        "calibration.num_batches changed (pass --force to replace it)",
    )
    assert snapshot(w / "calibrated") == before
    run = cli(*args, "--force", "--json")
    assert run.rc == 0, run.stderr
    doc = run.json()
    assert doc["reused"] is False and doc["manifest"]["batches"] == 2
    assert doc["redone"] == "calibration.num_batches changed"
    assert doc["manifest"] == json.loads((w / "calibrated" / "manifest.json").read_text())
    assert sorted(os.listdir(w)) == ["calibrated", "prepared"]  # no temporary or old copy left
    rerun = cli(*args, "--json")  # the same key again: reused
    assert rerun.rc == 0 and rerun.json()["reused"] is True and rerun.json()["manifest"] == doc["manifest"]


def test_the_manifest_records_what_the_output_was_made_from(work):
    manifest = json.loads((work / "calibrated" / "manifest.json").read_text())
    parent = json.loads((work / "prepared" / "manifest.json").read_text())
    digest = hashlib.sha256((json.dumps(parent, sort_keys=True, indent=2) + "\n").encode()).hexdigest()
    assert manifest["parent"] == {"stage": "prepared", "sha256": digest}
    data = str(ROOT / "configs/digits/digits.npz")
    assert manifest["options"]["recipe"] == {"calibration": manifest["recipe"]["calibration"]}  # what it consumed
    assert manifest["recipe"]["calibration"]["data"] == data
    assert manifest["chain"] == ["captured", "prepared", "calibrated"]
    assert manifest["data"] == {"calibration.data": hashlib.sha256(Path(data).read_bytes()).hexdigest()}
    assert manifest["quantcli_version"] == __version__ and manifest["schema_version"] == artifacts.SCHEMA_VERSION
    assert set(manifest["files"]) == {"program.pt2", "state.pt"}
    for name, info in manifest["files"].items():
        assert info == {
            "sha256": hashlib.sha256((work / "calibrated" / name).read_bytes()).hexdigest(),
            "size": (work / "calibrated" / name).stat().st_size,
        }
    assert "seconds" in json.loads((work / "calibrated" / "timings.json").read_text())
    assert not {"seconds", "timestamp", "time", "date", "created", "duration"} & set(_keys(manifest))


def _keys(doc) -> list[str]:
    if isinstance(doc, dict):
        return [k for k, v in doc.items() for k in (k, *_keys(v))]
    if isinstance(doc, list):
        return [k for v in doc for k in _keys(v)]
    return []


@pytest.mark.slow
def test_rerun_gives_byte_identical_onnx_and_manifests(work, shared_recipe, tmp_path):
    """The same resolved recipe, model and data, in another folder: the same bytes, stage by stage. `work` was made
    by a process per stage (scripts/ci-example.sh); this run is all the stages in this process."""
    w2 = tmp_path / "again"
    run = cli("run", "--recipe", shared_recipe, "-o", w2, "--json")
    assert run.rc == 0, run.stderr
    assert [d["reused"] for d in run.json()["stages"]] == [False] * 5
    for stage in STAGES:
        for name in ("manifest.json", *json.loads((work / stage / "manifest.json").read_text())["files"]):
            assert (w2 / stage / name).read_bytes() == (work / stage / name).read_bytes(), f"{stage}/{name}"
    assert (
        hashlib.sha256((w2 / "model.onnx").read_bytes()).hexdigest()
        == hashlib.sha256((work / "model.onnx").read_bytes()).hexdigest()
    )


# --- later stages take --recipe for their own sections ------------------------------------------------------


def test_calibrate_recipe_changes_calibration_only(copy_work, tmp_path):
    w = copy_work("prepared")
    recipe = digits_recipe(
        tmp_path / "r",
        calibration={
            "data": str(ROOT / "configs/digits/digits.npz"),
            "keys": {"x": "calib_x"},
            "batch_size": 16,
            "num_batches": 3,
        },
    )
    run = cli("calibrate", w / "prepared", "-o", w / "calibrated", "--recipe", recipe, "--json")
    assert run.rc == 0, run.stderr
    manifest = run.json()["manifest"]
    assert manifest["batches"] == 3 and manifest["recipe"]["calibration"]["batch_size"] == 16


@pytest.mark.parametrize(
    "command, src, change, fixed_at",
    [
        ("calibrate", "prepared", {"inputs": [{"name": "x", "shape": [16, 1, 8, 8]}]}, "capture"),
        ("calibrate", "prepared", {"quantization": {"target": "onnxruntime", "observer": "minmax"}}, "prepare"),
        ("export", "converted", {"model": {"factory": f"{ROOT / 'configs/digits/model.py'}:build"}}, "capture"),
    ],
)
def test_a_recipe_that_changes_earlier_sections_is_refused(work, tmp_path, command, src, change, fixed_at):
    recipe = digits_recipe(tmp_path / "r", **change)
    out = tmp_path / ("model.onnx" if command == "export" else "out")
    section = next(iter(change))
    allowed = "calibration" if command == "calibrate" else "export, evaluation"
    assert_fails(
        cli(command, work / src, "-o", out, "--recipe", recipe),
        4,
        f"--recipe changes {section}, fixed when the artifact was made (at {fixed_at}); "
        f"`quantcli {command} --recipe` may only change {allowed} "
        f"(rerun the chain from `quantcli {fixed_at}` with this recipe)",
    )
    assert not out.exists() and leftovers(tmp_path) == []


# --- parity failure: exit 5, outputs written and marked, a rerun refuses them ------------------------------


def test_parity_failure_writes_the_model_marks_it_failed_and_a_rerun_refuses_it(work, tmp_path):
    recipe = digits_recipe(tmp_path / "r", export={"opset": 18, "parity_min_sqnr_db": 300})
    out = tmp_path / "model.onnx"
    args = ["export", work / "converted", "-o", out, "--recipe", recipe]
    line = assert_fails(
        cli(*args),
        5,
        "parity failed: ONNX Runtime vs the converted model",
        "< export.parity_min_sqnr_db 300.0",
        f"model and report written to {out}",
    )
    assert line.startswith("error: parity failed")
    assert f"`quantcli report {work / 'converted'} --onnx {out}` shows the layer" in line
    shown = cli("report", work / "converted", "--onnx", out, "--batches", "1", "--json")  # a failed model too
    assert shown.rc == 0 and any(d["ort_vs_int8_db"] is not None for d in shown.json()["layers"]), shown.stderr
    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(metadata["quantcli.status"]) == "parity_failed"
    report = json.loads((tmp_path / "model.report.json").read_text())
    assert report["parity"]["passed"] is False and report["parity"]["threshold_db"] == 300
    before = snapshot(out)
    assert_fails(cli(*args), 4, f"{out} exists and is marked parity_failed (pass --force to replace it)")
    assert snapshot(out) == before and leftovers(tmp_path) == []


# --- interrupts: nothing partial, nothing stale, a rerun succeeds --------------------------------------------

SLOW_DATA = textwrap.dedent('''
    import os, time
    import numpy as np

    CALLS = []


    def batches():
        """Calibration batches; the first call (the reuse key's pass over what it yields) quickly, the
        second (calibration) slowly, touching $MARKER once it is under way."""
        CALLS.append(1)
        rng = np.random.default_rng(0)
        for index in range(int(os.environ.get("BATCHES", "600"))):
            if index == 2 and len(CALLS) == 2 and os.environ.get("MARKER"):
                open(os.environ["MARKER"], "w").close()
            yield {"calib_x": rng.random((32, 1, 8, 8), dtype=np.float32)}
            if len(CALLS) == 2:
                time.sleep(float(os.environ.get("DELAY", "0.05")))
''')


def _as_from_a_shell() -> None:
    """The child starts with SIGINT and SIGTERM at their defaults, unblocked, as a shell starts a command: it
    would inherit an ignored SIGINT from the test worker (once seen on a loaded CI run), and Python then
    installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _start_and_kill(args: list, marker: Path, sig: int) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantcli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=cli_env(MARKER=str(marker)),
        preexec_fn=_as_from_a_shell,
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, f"calibrate ended before it was killed: {proc.communicate()}"
            assert time.monotonic() < deadline, "calibration never started"
            time.sleep(0.05)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    marker.unlink()
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_killing_calibrate_leaves_no_output_and_a_rerun_succeeds(work, tmp_path, monkeypatch):
    (tmp_path / "slow.py").write_text(SLOW_DATA)
    w = tmp_path / "w"
    w.mkdir()
    out = w / "calibrated"
    args = ["calibrate", work / "prepared", "-o", out, "--data", f"{tmp_path / 'slow.py'}:batches"]
    marker = tmp_path / "started"
    # Ctrl-C (SIGTERM takes the same path: tests/test_qat.py kills a training with it)
    killed = _start_and_kill(args, marker, signal.SIGINT)
    assert killed.returncode == 130, killed.stderr
    assert killed.stderr == "error: interrupted; no partial output was left\n" and killed.stdout == ""
    assert os.listdir(w) == [], os.listdir(w)  # no output, no .calibrated.tmp-* folder
    killed = _start_and_kill(args, marker, signal.SIGKILL)  # cannot clean up: its temporary stays...
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists() and len(leftovers(w)) == 1 and leftovers(w)[0].startswith(".calibrated.tmp-")
    monkeypatch.setenv("BATCHES", "3")
    monkeypatch.setenv("DELAY", "0")
    rerun = cli(*args, "--json")  # what is tested is the rerun's handling of the leftover, not a process start
    assert rerun.rc == 0, rerun.stderr
    assert rerun.json()["manifest"]["batches"] == 3
    assert os.listdir(w) == ["calibrated"]  # ...and the next run removes it
