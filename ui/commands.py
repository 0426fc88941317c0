"""The UI's command: `idx ui` serves ui/app.py with Streamlit."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from phisearch.indexer.cli.common import (
    ApiKeyOpt,
    CollectionOpt,
    StoreOpt,
    UrlOpt,
    check_device,
    default_store,
    store_config,
    warn_if_missing,
)

APP = Path(__file__).with_name("app.py")


def ui(
    store: StoreOpt = None,
    qdrant_url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    collection: CollectionOpt = "phisearch",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8501,
    address: Annotated[str, typer.Option(
        "--address", help="Interface to listen on (127.0.0.1: this machine only).")
    ] = "127.0.0.1",
    device: Annotated[str, typer.Option(
        "--device", callback=check_device,
        help="cpu | cuda | auto, for uploads' φ and reconstruction.")] = "cpu",
    hold: Annotated[float, typer.Option(
        "--hold", min=0, help="Edge: idle seconds the UI keeps the store open at most "
        "(default: until another process such as idx build asks for it; 0: after every "
        "use).")] = float("inf"),
) -> None:
    """Serve the search UI (Streamlit): search, explain, clusters, channels, reconstruct, index.

    \b
    Example: idx ui --store ~/.phisearch/store --port 8501
    """
    env = dict(os.environ)
    env.update({"PHISEARCH_UI_COLLECTION": collection, "PHISEARCH_UI_DEVICE": device,
                "PHISEARCH_UI_HOLD_S": str(hold)})
    if qdrant_url:
        env["PHISEARCH_UI_QDRANT_URL"] = qdrant_url
        env.pop("PHISEARCH_UI_STORE", None)
        if api_key:
            env["QDRANT_API_KEY"] = api_key   # by environment: never visible in `ps`
    else:
        path = Path(store or default_store()).expanduser().resolve()
        env["PHISEARCH_UI_STORE"] = str(path)
        env.pop("PHISEARCH_UI_QDRANT_URL", None)
    warn_if_missing(store_config(store, qdrant_url, api_key, collection),
                    "the UI will say so until idx build has run")
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP),
           "--server.headless", "true", "--server.address", address, "--server.port", str(port),
           "--server.fileWatcherType", "none", "--server.maxUploadSize", "64",
           "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
           "--theme.base", "light"]
    typer.echo(f"phisearch UI: http://{address}:{port}  (Ctrl-C to stop)", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":   # become the server: signals sent to `idx ui` reach Streamlit
        os.execve(sys.executable, cmd, env)
    import subprocess

    raise typer.Exit(subprocess.call(cmd, env=env))


def register(app: typer.Typer) -> None:
    app.command()(ui)
