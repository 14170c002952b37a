"""The CLI's boundary and renderer: where results are printed and errors become exit codes.

Library functions return data, raise QuantCliError and log notices to the `quantcli` logger; this
module alone prints. A command's result goes to stdout (human-readable, or exactly one JSON
document with --json); notices (`note: ...`), progress and errors go to stderr. Every error is one
line, and its exit code is the error class's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import typer

from quantcli.errors import EXIT_INTERRUPTED, Interrupted, QuantCliError


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

        return Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console(),
            transient=True,
        )


def plain() -> bool:
    """No colour: stderr is not a terminal, or NO_COLOR is set (https://no-color.org)."""
    return not sys.stderr.isatty() or bool(os.environ.get("NO_COLOR"))


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def one_line(message: str) -> str:
    """The message with line breaks and other control characters escaped: an error is one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def fail(out: Output, code: int, kind: str, message: str) -> None:
    message = one_line(message)
    if out.json:
        print_json({"error": {"code": code, "kind": kind, "message": message}})
    line = f"error: {message}"
    print(line if plain() else f"\x1b[31m{line}\x1b[0m", file=sys.stderr)
    raise typer.Exit(code)


class _Notes(logging.Handler):
    """Prints the library's notices (the `quantcli` logger, warning and up) on stderr, each once."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        message = one_line(record.getMessage())
        if message not in self.seen:
            self.seen.add(message)
            kind = "warning" if getattr(record, "warning", False) else "note"
            print(f"{kind}: {message}", file=sys.stderr)


@contextlib.contextmanager
def notes(out: Output) -> Iterator[None]:
    """Let library notices (e.g. a cast applied to the data) reach stderr unless --quiet."""
    logger = logging.getLogger("quantcli")
    handler = logging.NullHandler() if out.quiet else _Notes()
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)


def execute(out: Output, action: Callable[[Any], Any], label: str = "") -> Any:
    """The error boundary: run `action(progress_callback)`, report, map errors to exit codes."""
    with notes(out):
        return _execute(out, action, label)


def _execute(out: Output, action: Callable[[Any], Any], label: str) -> Any:
    signal.signal(signal.SIGTERM, _on_sigterm)
    bar = out.progress(label) if label else None
    try:
        if bar is None:
            result = action(_no_progress)
        else:
            with bar:
                task = bar.add_task(label, total=None, info="")
                result = action(
                    lambda done, total, m: bar.update(
                        task, completed=done, total=total, info=" ".join(f"{k}={v:.4g}" for k, v in m.items())
                    )
                )
    except QuantCliError as exc:
        if out.debug:
            traceback.print_exc()
        fail(out, exc.exit_code, exc.kind, exc.line())
    except KeyboardInterrupt as exc:
        kept = exc.kept if isinstance(exc, Interrupted) else "no partial output was left"
        fail(out, EXIT_INTERRUPTED, "interrupted", f"interrupted; {kept}")
    except (typer.Exit, SystemExit):
        raise
    except Exception as exc:  # a bug in quantcli or a library: one line unless --debug
        if out.debug:
            traceback.print_exc()
        if isinstance(exc, OSError) and exc.errno in _INPUT_ERRNOS:
            fail(out, 3, "input", f"cannot use {exc.filename or 'a file'}: {exc.strerror or exc}")
        first = (str(exc).strip().splitlines() or [""])[0]
        fail(
            out, 1, "internal", f"internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)"
        )
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
    docs = [r.to_json() for r in results]
    show(out, docs[0] if len(docs) == 1 else {"stages": docs}, lambda doc: str(results[-1].out))


def show(out: Output, doc: dict[str, Any], text: Callable[[dict[str, Any]], str]) -> None:
    """Print a command's result on stdout: exactly one JSON document with --json, else `text(doc)`."""
    if out.json:
        print_json(doc)
    else:
        print(text(doc))


def print_json(doc: dict[str, Any]) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True))
