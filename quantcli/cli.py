"""The quantcli command line: one thin Typer command per stage over quantcli.stages.

Every command parses options, calls one library function and turns its errors into the
documented exit code (see quantcli.errors). Heavy imports happen inside the commands.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from quantcli import __version__
from quantcli.errors import EXIT_INTERRUPTED, QuantCliError

app = typer.Typer(
    name="quantcli",
    help="Turn a PyTorch model into a fast, accurate int8 ONNX model through the PT2E flow.\n\n"
    "Example: quantcli run --recipe configs/digits/recipe.yaml -o work",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

Out = Annotated[Path, typer.Option("-o", "--out", help="output path")]
Json = Annotated[bool, typer.Option("--json", help="print exactly one JSON document on stdout")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="print nothing on stderr but errors")]
Debug = Annotated[bool, typer.Option("--debug", help="show tracebacks of errors")]
Force = Annotated[bool, typer.Option("--force", help="replace an existing quantcli output at -o")]
RecipeOpt = Annotated[Optional[Path], typer.Option("--recipe", help="recipe YAML")]


@dataclass
class Output:
    """Where a command's output goes: results on stdout, logs and progress on stderr."""

    json: bool = False
    quiet: bool = False
    debug: bool = False

    def console(self) -> Any:
        from rich.console import Console

        return Console(stderr=True, no_color=plain(), quiet=self.quiet, highlight=False, soft_wrap=True)

    def progress(self, label: str) -> Any:
        """A callback drawing a Rich progress bar on stderr (only on a terminal)."""
        if self.quiet or not sys.stderr.isatty():
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), console=self.console(), transient=True)


def plain() -> bool:
    """No colour: stderr is not a terminal, or NO_COLOR is set (https://no-color.org)."""
    return not sys.stderr.isatty() or bool(os.environ.get("NO_COLOR"))


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def one_line(message: str) -> str:
    """The message with line breaks and other control characters escaped: an error is one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def _fail(out: Output, code: int, kind: str, message: str) -> None:
    message = one_line(message)
    if out.json:
        print(json.dumps({"error": {"code": code, "kind": kind, "message": message}}))
    line = f"error: {message}"
    print(line if plain() else f"\x1b[31m{line}\x1b[0m", file=sys.stderr)
    raise typer.Exit(code)


def execute(out: Output, action: Callable[[Any], Any], label: str = "") -> Any:
    """The error boundary: run `action(progress_callback)`, report, map errors to exit codes."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    bar = out.progress(label) if label else None
    try:
        if bar is None:
            result = action(_no_progress)
        else:
            with bar:
                task = bar.add_task(label, total=None, info="")
                result = action(lambda done, total, m: bar.update(
                    task, completed=done, total=total, info=" ".join(f"{k}={v:.4g}" for k, v in m.items())))
    except QuantCliError as exc:
        if out.debug:
            traceback.print_exc()
        _fail(out, exc.exit_code, exc.kind, exc.line())
    except KeyboardInterrupt:
        _fail(out, EXIT_INTERRUPTED, "interrupted", "interrupted; no partial output was left"
              + (" (training checkpoints stay in .<out>.partial/: rerun with --resume)" if label == "training" else ""))
    except (typer.Exit, SystemExit):
        raise
    except Exception as exc:  # a bug in quantcli or a library: one line unless --debug
        if out.debug:
            traceback.print_exc()
        if isinstance(exc, OSError) and exc.errno in _INPUT_ERRNOS:
            _fail(out, 3, "input", f"cannot use {exc.filename or 'a file'}: {exc.strerror or exc}")
        first = (str(exc).strip().splitlines() or [""])[0]
        _fail(out, 1, "internal", f"internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)")
    return result


# A path the user gave that the OS refuses: an input error (exit 3), not a bug.
_INPUT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.ELOOP}


def _no_progress(done: int, total: int | None, metrics: dict[str, Any]) -> None:
    """No progress bar (quiet, or stderr is not a terminal)."""


def emit(out: Output, results: Any) -> None:
    """Print the stage results: JSON on stdout with --json, closing lines on stderr otherwise."""
    results = results if isinstance(results, list) else [results]
    console = out.console()
    for result in results:
        console.print(result.summary())
    if not results[-1].writes_output:  # a torchrun rank > 0: rank 0 prints the result
        return
    if out.json:
        docs = [r.to_json() for r in results]
        print(json.dumps(docs[0] if len(docs) == 1 else {"stages": docs}, indent=2, sort_keys=True))
    else:
        print(results[-1].out)


def version_callback(value: bool) -> None:
    if value:
        print(f"quantcli {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """quantcli: PyTorch model + YAML recipe -> int8 ONNX (QDQ), one stage per command."""


from quantcli import commands  # noqa: E402,F401  (registers the commands on `app`)


def main(argv: list[str] | None = None) -> None:
    """The console script: usage errors too become one line (and a JSON document with --json)."""
    args = sys.argv[1:] if argv is None else list(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)  # a kill during start-up is an interrupt too
    if not args:
        app(args=args, prog_name="quantcli")  # prints the help
    try:
        code = app(args=args, prog_name="quantcli", standalone_mode=False)
    except typer.TyperException as exc:  # click's UsageError and friends (typer vendors click)
        command = exc.ctx.command_path if getattr(exc, "ctx", None) else "quantcli"
        kind = "usage" if exc.exit_code == 2 else "internal"
        try:
            _fail(Output(json="--json" in args), exc.exit_code, kind, f"{exc.format_message()} (see `{command} --help`)")
        except typer.Exit as done:
            code = done.exit_code
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code if isinstance(code, int) else 0)
