"""Shared fixtures: the real shared data (PHISEARCH_DATA, default <repo>/../shared/data) and a
tiny trained checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# One intra-op thread: tests use tiny models, and with a busy CPU more threads oversubscribe the
# cores and run ~10x slower. PHISEARCH_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("PHISEARCH_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parent.parent

MINI = "imagenette-mini-000000.tar"


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
    from phisearch.indexer.build.pipeline import BuildConfig, build
    from phisearch.indexer.model.config import PhiConfig
    from phisearch.indexer.store import StoreConfig

    root = tmp_path_factory.mktemp("mini-store") / "store"
    build(BuildConfig(data=(mini_shard,), store=StoreConfig(path=str(root)),
                      checkpoint=tiny_ckpt, phi=PhiConfig(sigma=0.2, draws=2, seed=0),
                      batch_size=50, workers=0, device="cpu"))
    return root
