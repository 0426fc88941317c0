"""Shared fixtures: the real shared data (PHISEARCH_DATA, default <repo>/../shared/data), a
tiny trained checkpoint, and the store backends the store tests run on (STORE_KINDS)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

# One intra-op thread: tests use tiny models, and with a busy CPU more threads oversubscribe the
# cores and run ~10x slower. PHISEARCH_TEST_THREADS overrides. numba (UMAP in `idx cluster`)
# shares torch's OpenMP runtime and sets its thread count to the cores when it first runs a
# parallel function, so it gets one thread too, and torch's is put back after every test.
TORCH_THREADS = int(os.environ.get("PHISEARCH_TEST_THREADS", "1"))
os.environ.setdefault("NUMBA_NUM_THREADS", str(TORCH_THREADS))
torch.set_num_threads(TORCH_THREADS)

REPO = Path(__file__).resolve().parent.parent

MINI = "imagenette-mini-000000.tar"

# Where the store tests run. "edge": a Qdrant Edge folder. "server-local": the server backend
# over qdrant-client's local mode (QdrantClient(":memory:"), injected for LOCAL_URL by the
# qdrant_local fixture): Qdrant's own implementation of the API, in-process, so every call the
# server backend makes is checked here; not an engine (no snapshots, payload indexes ignored).
# "server-url": a real Qdrant server, only when QDRANT_URL names one (CI's service container).
QDRANT_URL = os.environ.get("QDRANT_URL")
LOCAL_URL = "http://qdrant-local.invalid:6333"   # never resolves: without the injection, it fails
STORE_KINDS: list[Any] = ["edge", "server-local"] + (
    [pytest.param("server-url", marks=pytest.mark.server)] if QDRANT_URL else [])
SERVER_KINDS: list[Any] = STORE_KINDS[1:]
REAL_SERVER = "needs a real Qdrant server (QDRANT_URL): "


def pytest_configure(config: pytest.Config) -> None:
    # Local mode says on every create_payload_index that it ignores them; the real-server test
    # checks them (test_store.py::test_payload_indexes_on_a_real_server).
    config.addinivalue_line(
        "filterwarnings", "ignore:Payload indexes have no effect in the local Qdrant:UserWarning")


@pytest.fixture(autouse=True)
def _torch_threads() -> Iterator[None]:
    """Whatever a test ran (numba, a library that sets threads), the next starts with
    TORCH_THREADS: one test's 2 threads made every later torch test ~10x slower on a busy host."""
    yield
    if torch.get_num_threads() != TORCH_THREADS:
        torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(scope="session")
def qdrant_local() -> Iterator[Any]:
    """qdrant-client's local mode in memory, used by every ServerBackend opened for LOCAL_URL in
    this process (in-process CLI runs too; a subprocess cannot share it). Yields the client."""
    from phisearch.indexer.store import server
    from qdrant_client import QdrantClient

    client = QdrantClient(":memory:")
    server.TEST_CLIENTS[LOCAL_URL] = client
    try:
        yield client
    finally:
        del server.TEST_CLIENTS[LOCAL_URL]
        client.close()


def store_place(request: pytest.FixtureRequest, kind: str, folder: Path, collection: str = "",
                **kw: Any) -> Any:
    """A StoreConfig of `kind` (STORE_KINDS): an Edge folder under `folder`, or a server
    collection (a fresh name unless `collection` is given; the caller drops it)."""
    from phisearch.indexer.store import StoreConfig

    if kind == "edge":
        return StoreConfig(path=str(folder / "store"), collection=collection or "phisearch", **kw)
    name = collection or f"test_{uuid.uuid4().hex[:12]}"
    if kind == "server-local":
        request.getfixturevalue("qdrant_local")
        return StoreConfig(url=LOCAL_URL, collection=name, **kw)
    assert kind == "server-url" and QDRANT_URL, kind
    return StoreConfig(url=QDRANT_URL, api_key=os.environ.get("QDRANT_API_KEY"), collection=name,
                       **kw)


def drop(cfg: Any) -> None:
    """Delete a server collection (and its companion); Edge folders go with tmp_path."""
    from phisearch.indexer.store import open_store

    if cfg.url:
        with open_store(cfg) as st:
            st.drop()


def shared_data_root() -> Path:
    return Path(os.environ.get("PHISEARCH_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The imagenette-64 folder. A missing folder is a failure, not a skip."""
    d = shared_data_root() / "imagenette-64"
    if not (d / MINI).is_file():
        pytest.fail(f"shared data not found: {d / MINI} (set PHISEARCH_DATA to the folder that "
                    "holds imagenette-64/)", pytrace=False)
    return d


@pytest.fixture(scope="session")
def mini_shard(data_dir: Path) -> str:
    return str(data_dir / MINI)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, mini_shard: str) -> Path:
    """A tiny-preset checkpoint trained for a few steps on the mini shard (fp32, no workers)."""
    from phisearch.indexer.train.loop import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny-ckpt")
    return train(TrainConfig(data=(mini_shard,), out=str(out), preset="tiny", batch_size=8,
                             max_steps=3, dtype="fp32", workers=0, device="cpu"))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An untrained tiny-preset checkpoint (seed 1): fast, deterministic, enough for the
    plumbing (builds, stores, serve, UI). Its path."""
    from phisearch.indexer.model import checkpoint as ckpt

    path = tmp_path_factory.mktemp("tiny-untrained") / "tiny.safetensors"
    ckpt.save(ckpt.untrained("tiny", seed=1).model, path, {"note": "test"}, preset_name="tiny")
    return str(path)


@pytest.fixture(scope="session")
def mini_store(tmp_path_factory: pytest.TempPathFactory, mini_shard: str, tiny_ckpt: str) -> Path:
    """The mini shard (100 images, 10 labels) built with tiny_ckpt (σ 0.2, 2 draws) into an Edge
    store folder, collection "phisearch". Read-only: copy it (shutil.copytree) to change it."""
    from phisearch.indexer.ingest.pipeline import BuildConfig, build
    from phisearch.indexer.model.config import PhiConfig
    from phisearch.indexer.store import StoreConfig

    root = tmp_path_factory.mktemp("mini-store") / "store"
    build(BuildConfig(data=(mini_shard,), store=StoreConfig(path=str(root)),
                      checkpoint=tiny_ckpt, phi=PhiConfig(sigma=0.2, draws=2, seed=0),
                      batch_size=50, workers=0, device="cpu"))
    return root


@dataclass
class Ran:
    """What an `idx` run gave: subprocess.CompletedProcess's fields."""
    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def run_idx(*args: str, cwd: str | Path | None = None, env: dict[str, str] | None = None) -> Ran:
    """`idx ARGS` in this process through ui.cli.main, as the console script runs it (exit
    codes, one-line errors, a traceback as an uncaught exception would print it), without an
    interpreter and torch start-up per call. `env`: variables set for the call
    (PHISEARCH_NO_PROGRESS=1 is). Tests where the process boundary matters (signals, what a
    fresh interpreter imports, the console script itself) run the real command instead."""
    from phisearch.ui import cli

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)   # what setup_logging's basicConfig gives a process
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    verbose = any(a in ("-v", "--verbose", "--debug") for a in args)
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    root = logging.getLogger()
    saved = (sys.argv, os.getcwd(), root.level, {k: os.environ.get(k) for k in (env or {})},
             os.environ.get("PHISEARCH_NO_PROGRESS"))
    os.environ.update(env or {})
    os.environ["PHISEARCH_NO_PROGRESS"] = (env or {}).get("PHISEARCH_NO_PROGRESS", "1")
    sys.argv = ["idx", *args]
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.WARNING, handler.level))
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except Exception:   # noqa: BLE001 - as the interpreter reports an uncaught one
                traceback.print_exc()
                code = 1
    finally:
        root.removeHandler(handler)
        sys.argv, cwd_before, root_level, env_before, progress = saved
        os.chdir(cwd_before)
        root.setLevel(root_level)
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if progress is None:
            os.environ.pop("PHISEARCH_NO_PROGRESS", None)
        else:
            os.environ["PHISEARCH_NO_PROGRESS"] = progress
    return Ran(list(args), code, out.getvalue(), err.getvalue())
