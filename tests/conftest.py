"""Shared fixtures: the real shared data (PHISEARCH_DATA, default <repo>/../shared/data), a
tiny trained checkpoint, and the store backends the store tests run on (STORE_KINDS)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# One intra-op thread: tests use tiny models, and with a busy CPU more threads oversubscribe the
# cores and run ~10x slower. PHISEARCH_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("PHISEARCH_TEST_THREADS", "1")))

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
