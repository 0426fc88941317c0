"""The `idx` command, assembled at the top from each layer's commands (ui -> search -> indexer)."""

from __future__ import annotations

import re
import sys
from typing import Annotated

import typer
from phisearch.indexer import cli as indexer_cli
from phisearch.indexer.cli.common import DEBUG, UsageError, UserError, setup_logging
from phisearch.search import cli as search_cli
from phisearch.ui import commands as ui_commands

# rich_markup_mode=None: click's plain help. Rich's option table cuts long option names at 80
# columns (--halve-every-ep…) and shows <bool> on flags; the plain layout does neither
# (tests/test_terminal.py).
app = typer.Typer(
    name="idx", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="phisearch: semantic image search on the sparse code of a diffusion denoiser.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"phisearch {version('phisearch')}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    DEBUG["on"] = debug
    setup_logging(verbose or debug)


indexer_cli.register(app)
search_cli.register(app)
ui_commands.register(app)


def main() -> None:
    """Entry point: usage errors exit 2 (Typer's own handling); other errors print one line and
    exit 1 (a traceback only with --debug)."""
    try:
        app(args=hoist_global_flags(sys.argv[1:]))
    except Exception as e:
        if DEBUG["on"]:
            raise
        from phisearch.indexer.store import StoreError

        plain = (UserError, StoreError, FileNotFoundError, ValueError)
        kind = "" if isinstance(e, plain) else f"{type(e).__name__}: "
        typer.echo(f"error: {kind}{one_line(str(e))}", err=True)
        sys.exit(2 if isinstance(e, UsageError) else 1)


GLOBAL_FLAGS = ("--debug",)


def hoist_global_flags(args: list[str]) -> list[str]:
    """`idx status --debug` as `idx --debug status`: people add --debug at the end of the
    command that failed. Only flags (no value) are moved; nothing after a `--` is touched."""
    end = args.index("--") if "--" in args else len(args)
    moved = [a for a in args[:end] if a in GLOBAL_FLAGS]
    if not moved or (args and args[0] in GLOBAL_FLAGS and len(moved) == 1):
        return args
    rest = [a for a in args[:end] if a not in GLOBAL_FLAGS] + args[end:]
    return list(dict.fromkeys(moved)) + rest


def one_line(message: str) -> str:
    """Errors print as one line: a worker's traceback or a server's HTML page is cut down to
    its last meaningful line (--debug shows everything)."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else message
    if any(ln.startswith("Traceback") or ln.startswith("Original Traceback") for ln in lines):
        return f"{lines[-1]} (--debug for the traceback)"
    if any(ln.lstrip().startswith("<") for ln in lines):   # an HTML body in the message
        text = re.sub(r"<[^>]+>", " ", " ".join(lines))
        return " ".join(text.split())[:200] + " (--debug for the full response)"
    return lines[0] + " (--debug for more)"
