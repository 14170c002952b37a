"""Shared fixtures: the real `quantcli` command, and one digits chain per test session.

Every quantcli process costs seconds of torch import, so the chain runs once per session (across
pytest-xdist workers too, under a file lock) by running scripts/ci-example.sh, exactly as a CI job
would. Tests read that work folder; a test that changes an artifact works on a copy (`copy_work`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits"
DIGITS_RECIPE = DIGITS / "recipe.yaml"
CI_SCRIPT = ROOT / "scripts" / "ci-example.sh"
STAGES = ("captured", "prepared", "calibrated", "converted")
ANSI = re.compile(r"\x1b\[")

# One torch thread per test process, set before any test module imports torch: the suite runs two xdist
# workers on two cores, and a worker's default of one thread per core oversubscribes them (the other
# worker, the quantcli processes the tests start, the zoo's runner), where torch's threads wait on each
# other far longer than they compute: a test of small tensor operations measured 16x slower. The
# quantcli processes the tests start get the same setting from `cli_env`.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    """Name this test run for the zoo's vision runner, in the process that starts the xdist workers."""
    if not hasattr(config, "workerinput"):  # the controller (or a run without workers): workers inherit it
        from tests import zoo

        zoo.name_test_run()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with slow tests first, each file's tests kept together (its module fixtures are set up once):
    under pytest-xdist the long tests start early and the short ones even out the two workers' ends."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the model zoo's vision runner (minutes of one core) on the vision models this run selected.

    After deselection (-m, -k, node ids): a run that selects none of them starts nothing.
    """
    if session.config.option.collectonly:
        return
    from tests import zoo

    selected = [
        item.callspec.params["name"]
        for item in session.items
        if item.nodeid.startswith("tests/test_zoo.py::test_vision_model[")
    ]
    if selected:
        zoo.start_vision_runner(selected)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop the vision runner if it is still going (a run stopped early, -x) and delete its folder."""
    if not hasattr(session.config, "workerinput"):
        from tests import zoo

        zoo.stop_vision_runner()


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CI job: no terminal, no colour forcing, this venv's quantcli first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "CLICOLOR_FORCE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"  # the tests run two workers on two cores
    env.update(extra)
    return env


@dataclass
class Run:
    """One finished quantcli process."""

    args: list[str]
    rc: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """stdout must be exactly one JSON document (json.loads rejects anything around it)."""
        return json.loads(self.stdout)

    def error_line(self) -> str:
        """The one line a failure prints on stderr: no traceback, no colour, nothing else."""
        lines = self.stderr.splitlines()
        assert len(lines) == 1, f"expected one error line, got:\n{self.stderr}"
        assert lines[0].startswith("error: ") and not ANSI.search(lines[0]), lines[0]
        return lines[0]


def quantcli(*args: Any, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600) -> Run:
    """Run the real CLI (`python -m quantcli`, the console script's entry point) as a CI script would."""
    argv = [str(a) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "quantcli", *argv],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env or cli_env(),
        timeout=timeout,
    )
    return Run(argv, proc.returncode, proc.stdout, proc.stderr)


def cli(*args: Any) -> Run:
    """Run the real CLI in this process (`quantcli.cli.main`, the console script's code path).

    It avoids paying torch's start-up per command; exit codes, stdout and stderr are what the
    process would give. Use `quantcli` (a real process) where the process boundary is what is
    tested: start-up imports, signals, artifacts read back by a new process, the CI script.
    """
    from quantcli.cli import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            rc = 0
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return Run(argv, rc, out.getvalue(), err.getvalue())


def assert_fails(run: Run, code: int, *fragments: str) -> str:
    """Exit `code`, one error line holding every fragment, nothing on stdout, no traceback."""
    assert run.rc == code, f"exit {run.rc}, expected {code}\nstdout: {run.stdout}\nstderr: {run.stderr}"
    line = run.error_line()
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert run.stdout == "" and "Traceback" not in run.stderr
    return line


def leftovers(folder: Path) -> list[str]:
    """Temporary siblings quantcli writes while it works (`.<name>.tmp-*`, `.<name>.old-*`)."""
    return sorted(
        p.name for p in folder.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)
    )


def snapshot(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `path` (or of `path` itself), to prove nothing changed."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def digits_recipe(folder: Path, name: str = "recipe.yaml", **sections: Any) -> Path:
    """The digits recipe with absolute paths (so the model matches the shared chain's), `sections` replaced.

    A section given as None is removed.
    """
    recipe = yaml.safe_load(DIGITS_RECIPE.read_text())
    recipe["model"]["factory"] = f"{DIGITS / 'model.py'}:build"
    for section in ("calibration", "evaluation"):
        recipe[section]["data"] = str(DIGITS / "digits.npz")
    for key, value in sections.items():
        if value is None:
            recipe.pop(key, None)
        else:
            recipe[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@dataclass
class ScriptRun:
    work: Path
    rc: int
    stdout: str
    stderr: str


def run_ci_script(recipe: Path, work: Path) -> ScriptRun:
    proc = subprocess.run(
        ["bash", str(CI_SCRIPT), str(recipe), str(work)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=cli_env(),
        timeout=900,
    )
    return ScriptRun(work, proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def ci_run(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> ScriptRun:
    """scripts/ci-example.sh on the digits recipe, run once for all workers of this session."""
    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent
    record = shared / "digits-ci.json"
    with FileLock(str(shared / "digits-ci.lock")):
        if not record.exists():
            # The recipe the work folder is made from is the digits recipe written with absolute
            # paths, so that tests can write variants of it (digits_recipe) that differ only where they mean to.
            recipe = digits_recipe(shared / "digits-recipe")
            result = run_ci_script(recipe, shared / "digits-work")
            record.write_text(
                json.dumps(
                    {
                        "work": str(result.work),
                        "rc": result.rc,
                        "stdout": result.stdout,
                        "stderr": result.stderr,
                        "recipe": str(recipe),
                    }
                )
            )
        data = json.loads(record.read_text())
    return ScriptRun(Path(data["work"]), data["rc"], data["stdout"], data["stderr"])


@pytest.fixture(scope="session")
def work(ci_run: ScriptRun) -> Path:
    """The digits work folder (captured, prepared, calibrated, converted, model.onnx). Read it, never write."""
    if ci_run.rc != 0:
        pytest.fail(f"scripts/ci-example.sh failed with exit {ci_run.rc}:\n{ci_run.stderr}")
    return ci_run.work


@pytest.fixture(scope="session")
def shared_recipe(work: Path) -> Path:
    """The recipe the shared work folder was made from."""
    return work.parent / "digits-recipe" / "recipe.yaml"


@pytest.fixture
def copy_work(work: Path, tmp_path: Path):
    """Copy stages (and model.onnx) of the shared work folder into a fresh folder a test may change."""

    def copy(*names: str) -> Path:
        dst = tmp_path / "w"
        dst.mkdir(exist_ok=True)
        for name in names:
            src = work / name
            if src.is_dir():
                shutil.copytree(src, dst / name)
            else:
                shutil.copy2(src, dst / name)
        return dst

    return copy


def session_dir(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """A folder every pytest-xdist worker of this session shares."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


@pytest.fixture(scope="session")
def qat_work(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """`quantcli run --recipe configs/digits/qat.yaml`, once for all workers of the session, in the worker that
    asks first (the CLI's code in-process: what is tested is the run's outputs, not a new process's start)."""
    shared = session_dir(tmp_path_factory, worker_id)
    work = shared / "digits-qat"
    with FileLock(str(shared / "digits-qat.lock")):
        if not (work / "model.onnx").exists():
            run = cli("run", "--recipe", DIGITS / "qat.yaml", "-o", work)
            assert run.rc == 0, run.stderr
    return work


CHAIN = ("capture", "prepare", "calibrate", "convert", "export")
CHAIN_OUT = {
    "capture": "captured",
    "prepare": "prepared",
    "calibrate": "calibrated",
    "convert": "converted",
    "export": "model.onnx",
}


def run_chain(recipe: Path, w: Path) -> list[Run]:
    """capture -> prepare -> calibrate -> convert -> export through the CLI (in-process, artifacts on disk).

    Each command must exit 0, print its output path alone on stdout and one closing line on stderr.
    """
    runs, src = [], recipe
    for command in CHAIN:
        out = w / CHAIN_OUT[command]
        runs.append(cli(command, *(["--recipe"] if command == "capture" else []), src, "-o", out))
        assert runs[-1].rc == 0, f"{command}: {runs[-1].stderr}"
        assert runs[-1].stdout.strip() == str(out)
        assert f"wrote {out} in " in runs[-1].stderr
        src = out
    return runs


@pytest.fixture(scope="session")
def chained(tmp_path_factory: pytest.TempPathFactory, worker_id: str):
    """name -> work folder of tests/models.py's MODELS[name] run through the whole chain at defaults.

    Each model's chain runs once per session for all workers (a file lock per model); tests read
    the folders and write anything new elsewhere.
    """
    from tests.recipes import write_recipe

    shared = session_dir(tmp_path_factory, worker_id) / "chains"
    shared.mkdir(exist_ok=True)

    def get(name: str) -> Path:
        folder = shared / name
        with FileLock(str(shared / f"{name}.lock")):
            failed = folder / "failed.txt"
            if not (folder / "w" / "model.onnx").exists() and not failed.exists():
                try:
                    run_chain(write_recipe(folder, name), folder / "w")
                except AssertionError as exc:
                    failed.write_text(str(exc))
            if failed.exists():
                pytest.fail(f"the {name} chain failed: {failed.read_text()}")
        return folder / "w"

    return get


@pytest.fixture
def patterns_as_torchao_traces(monkeypatch) -> dict[Any, Any]:
    """quantcli traces torchao's patterns non-strictly (`quantcli._torch._trace_pattern`); while a test runs, each
    pattern function it traces is traced by torchao's own strict trace too, and the two graphs must be the same
    (nodes, names, targets, arguments). {pattern function's code: torchao's graph}, for the test to count."""
    from torchao.quantization.pt2e import utils

    from quantcli import _torch

    own, torchaos, compared = _torch._trace_pattern, utils._get_aten_graph_module_for_pattern, {}

    def nodes(graph_module: Any) -> list[tuple[str, ...]]:
        return [(n.op, n.name, str(n.target), str(n.args), str(n.kwargs)) for n in graph_module.graph.nodes]

    def checked(pattern: Any, example_inputs: tuple, is_cuda: bool = False, **kwargs: Any) -> Any:
        traced = own(pattern, example_inputs, is_cuda, **kwargs)
        code = getattr(pattern, "fn", pattern).__code__
        if code not in compared:
            compared[code] = torchaos(pattern, example_inputs, is_cuda, **kwargs)
            assert nodes(traced) == nodes(compared[code]), code.co_name
        return traced

    monkeypatch.setattr(_torch, "_trace_pattern", checked)
    monkeypatch.setattr(_torch, "_TRACED_PATTERNS", {})  # traced anew, so that each is compared
    return compared


@pytest.fixture(scope="session")
def decoder_folders(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """tests/decoders.py's Hugging Face decoder folders and texts, made once for all workers of the session."""
    from tests import decoders

    return decoders.folders(session_dir(tmp_path_factory, worker_id))


@pytest.fixture(scope="session")
def llama_rtn(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> tuple[dict[str, Any], Path]:
    """tests/decoders.py's Llama int4 RTN run, once for all workers of the session: (export report, model.onnx)."""
    from tests import decoders

    return decoders.llama_rtn(session_dir(tmp_path_factory, worker_id))
