"""The quantcli console script: runs the Typer app (quantcli.commands) and turns usage errors,
too, into one error line (and a JSON error document with --json), with the documented exit code."""

from __future__ import annotations

import signal
import sys

import typer

from quantcli.allocator import keep_large_blocks
from quantcli.commands import app
from quantcli.console import Output, _on_sigterm, fail
from quantcli.errors import EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> None:
    """The console script: usage errors too become one line (and a JSON document with --json)."""
    args = sys.argv[1:] if argv is None else list(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)  # a kill during start-up is an interrupt too
    keep_large_blocks()
    if not args:
        app(args=args, prog_name="quantcli")  # prints the help
    try:
        code = app(args=args, prog_name="quantcli", standalone_mode=False)
    except typer.TyperException as exc:  # click's UsageError and friends (typer vendors click)
        command = exc.ctx.command_path if getattr(exc, "ctx", None) else "quantcli"
        kind = "usage" if exc.exit_code == 2 else "internal"
        try:
            fail(Output(json="--json" in args), exc.exit_code, kind, f"{exc.format_message()} (see `{command} --help`)")
        except typer.Exit as done:
            code = done.exit_code
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code if isinstance(code, int) else 0)
