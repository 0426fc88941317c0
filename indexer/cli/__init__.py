"""The indexer's Typer commands: thin, parse -> config -> library call (lazy imports, so
`idx --help` loads no torch)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the indexer's commands to the `idx` app (assembled in ui/cli.py)."""
    from phisearch.indexer.cli import build, manage, status, train

    train.register(app)
    build.register(app)
    status.register(app)
    manage.register(app)
