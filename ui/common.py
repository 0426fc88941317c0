"""What the UI's pages share: the store settings, the one store handle and model per server
process, upload handling, and small widgets (thumbnail grids, the busy-store message).

Store policy (Qdrant Edge allows one open handle per shard, STACK.md): each server process keeps
ONE handle, in a `StoreHolder` cached with st.cache_resource. Every page reads through
`holder.use()`, which takes the holder's lock (sessions run in threads and queue here) and opens
the store when it is closed. The handle is kept while the UI is idle and handed over when
another process asks for it (store/holder.py): `idx build`, `idx query` or `idx cluster`
started meanwhile get the store within a second. While another process holds it,
opening waits 1 s and raises StoreBusy, and `guard()` shows "the index is being built or used by
another process; retry" with the StoreBusy text and a Retry button, never a traceback.
A Qdrant server has no such limit: its handle is kept for the life of the process.
When the collection is an alias, every use looks up its target (holder.py), so `idx alias set`
moves the running UI to the new collection at its next page run (the catalog cache is keyed on
the collection actually read, the model cache on the collection's whole identity).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import streamlit as st
from phisearch.indexer.cli.common import default_store
from phisearch.indexer.model.embedder import dense_of
from phisearch.indexer.model.phi import participation_ratio
from phisearch.indexer.sources import images
from phisearch.indexer.store import Store, StoreBusy, StoreConfig, StoreError
from phisearch.indexer.store.holder import StoreHolder
from phisearch.search.query import NotFound

log = logging.getLogger(__name__)
T = TypeVar("T")

# Set by `idx ui` (ui/commands.py) for the Streamlit process; tests set them directly.
ENV_STORE = "PHISEARCH_UI_STORE"            # Edge store folder
ENV_URL = "PHISEARCH_UI_QDRANT_URL"         # Qdrant server URL (wins over the folder)
ENV_COLLECTION = "PHISEARCH_UI_COLLECTION"
ENV_DEVICE = "PHISEARCH_UI_DEVICE"          # cpu | cuda | auto, for φ and reconstruction
ENV_HOLD = "PHISEARCH_UI_HOLD_S"            # seconds an idle Edge handle stays open
API_KEY_ENV = "QDRANT_API_KEY"              # never passed on a command line

BUSY_HELP = ("The index is being built, or another process (idx build, idx cluster, idx serve) "
             "holds the store. Retry when it has finished.")


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class UiSettings:
    store: StoreConfig
    device: str = "cpu"     # φ of uploads as `idx query` computes it (CPU fp32) by default
    hold_s: float = float("inf")   # Edge: idle seconds a handle is kept at most (inf: until
                                   # another process asks for it; 0: after every use)

    @property
    def where(self) -> str:
        return self.store.where


def settings() -> UiSettings:
    """The store and device the server was started with (environment, set by `idx ui`)."""
    url = os.environ.get(ENV_URL) or None
    collection = os.environ.get(ENV_COLLECTION) or "phisearch"
    # busy_wait 1 s: a page should say "busy" quickly rather than hang for the CLI's 10 s.
    if url:
        cfg = StoreConfig(url=url, api_key=os.environ.get(API_KEY_ENV) or None,
                          collection=collection, busy_wait=1.0)
    else:
        cfg = StoreConfig(path=os.environ.get(ENV_STORE) or default_store(),
                          collection=collection, busy_wait=1.0)
    return UiSettings(store=cfg, device=os.environ.get(ENV_DEVICE) or "cpu",
                      hold_s=float(os.environ.get(ENV_HOLD, "inf")))


# ----------------------------------------------------------------------------- the store


@st.cache_resource(show_spinner=False)
def _holder(cfg: StoreConfig, hold_s: float) -> StoreHolder:
    return StoreHolder(cfg, hold_s)


def holder(s: UiSettings | None = None) -> StoreHolder:
    s = s or settings()
    return _holder(s.store, s.hold_s)


@contextmanager
def guard() -> Iterator[None]:
    """Turns the errors a page can meet into messages: a busy store becomes a warning with a
    Retry button, a missing collection or point an error line; st.stop() ends the page."""
    try:
        yield
    except StoreBusy as e:
        st.warning(f"**The index is busy: retry in a moment.** {BUSY_HELP}\n\n`{e}`")
        st.button("Retry", key="_busy_retry")
        st.stop()
    except (NotFound, StoreError, LookupError) as e:
        st.error(str(e))
        st.stop()


def meta_or_stop(store: Store) -> dict:
    """The collection's metadata; without a collection the page says how to build one."""
    meta = store.meta()
    if meta is None:
        st.info(f"No collection in {settings().where} yet: run `idx build --data ...` first.")
        st.stop()
    return meta


def data_version(store: Store) -> tuple:
    """Changes whenever the points or their cluster labels may have changed, or the alias the
    UI reads now names another collection (cache keys)."""
    last = store.get_doc("last_run") or {}
    clusters = store.get_doc("clusters") or {}
    return (store.name, store.count(), last.get("finished_at"), last.get("running_since"),
            clusters.get("created_at"))


# ----------------------------------------------------------------------------- the model


@st.cache_resource(show_spinner="Loading the model...", max_entries=4)
def _embedder(meta_json: str, device: str, stamp: str):
    """Keyed on the collection's meta, the device and the checkpoint file's stamp (a file
    refitted in place is read again); a failure is not cached."""
    from phisearch.search.query import embedder_for

    return embedder_for(json.loads(meta_json), device, settings().where)


def embedder(meta: dict):
    """The collection's model and φ settings, loaded once per server process and checked to
    make the collection's vectors (query.embedder_for: the whole identity, the readout's
    whitening included). One that cannot, or cannot load, ends the page with one line."""
    from phisearch.indexer.model.embedder import checkpoint_stamp

    try:
        try:
            stamp = json.dumps(checkpoint_stamp(meta.get("checkpoint")))
        except OSError as e:
            stamp = str(e)
        return _embedder(json.dumps(meta, sort_keys=True, default=str), settings().device,
                         stamp)
    except (StoreError, ValueError, OSError) as e:   # MetaMismatch is a StoreError
        st.error(f"The collection's model cannot be used: {' '.join(str(e).split())}")
        st.stop()


@st.cache_resource(show_spinner=False)
def compute_lock() -> threading.Lock:
    """One reconstruction at a time per server: they use every core."""
    return threading.Lock()


# ----------------------------------------------------------------------------- uploads


REASONS = {   # images.BadImage.reason -> what the user is told
    "empty": "the file is empty",
    "not_an_image": "this is not an image file (unrecognized format)",
    "corrupt_image": "the image data is corrupt or truncated",
    "too_large": "the image is too large",
    "too_small": f"the image is too small (at least {images.MIN_SIDE} pixels a side)",
}


@dataclass
class Upload:
    """An upload made ready for the model, or the reason it cannot be used."""

    image: np.ndarray | None        # (64, 64, 3) uint8
    error: str | None = None        # one line for st.error
    notes: tuple[str, ...] = ()     # what was done to it (first frame, colour conversion)


def read_upload(name: str, data: bytes) -> Upload:
    """Decode an uploaded file as indexing does (images.decode); never raises."""
    try:
        img = images.decode(data)
    except images.BadImage as e:
        why = REASONS.get(e.reason, e.reason)
        detail = e.detail if e.detail and e.detail not in why else ""   # say it once
        return Upload(None, f"Cannot use {name}: {why}" + (f" ({detail})." if detail else "."))
    except Exception as e:   # an odd file must never show a traceback
        log.exception("decoding upload %s", name)
        return Upload(None, f"Cannot use {name}: {type(e).__name__}: {e}")
    return Upload(img, notes=tuple(_notes(data)))


def _notes(data: bytes) -> list[str]:
    from PIL import Image

    notes = []
    try:
        with Image.open(io.BytesIO(data)) as im:
            if getattr(im, "n_frames", 1) > 1:
                notes.append(f"animated image: its first of {im.n_frames} frames was used")
            if im.mode not in ("RGB", "L"):
                notes.append(f"converted from {im.mode} to RGB")
            if im.size != (images.SIZE, images.SIZE):
                notes.append(f"{im.size[0]}x{im.size[1]} center-cropped and resized to "
                             f"{images.SIZE}x{images.SIZE}")
    except (OSError, ValueError, SyntaxError, EOFError) as e:   # notes are a courtesy
        log.debug("no notes for an upload: %s", e)
    return notes


# ----------------------------------------------------------------------------- widgets


def thumb_bytes(payload: dict) -> bytes | None:
    """The stored 64x64 JPEG of a point (payload `thumb`, base64)."""
    b64 = payload.get("thumb")
    return base64.b64decode(b64) if b64 else None


def png_bytes(image: np.ndarray, scale: int = 1) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes, enlarged `scale` times without smoothing."""
    from PIL import Image

    im = Image.fromarray(np.asarray(image, np.uint8))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def label_text(payload: dict) -> str:
    name, label = payload.get("label_name"), payload.get("label")
    return name if name else ("no label" if label is None else f"label {label}")


def cluster_text(payload: dict) -> str:
    c = payload.get("cluster_id")
    return "unclustered" if c is None else ("noise" if c == -1 else f"cluster {c}")


def thumb_grid(items: list[tuple[dict, str]], cols: int = 6,
               button: tuple[str, Callable[[int], None]] | None = None,
               key: str = "grid") -> None:
    """Thumbnails with a caption each: items = [(payload, caption)]. `button` = (label,
    on_click(i)) adds a button under each."""
    for row in range(0, len(items), cols):
        columns = st.columns(cols)
        for i, (col, (payload, caption)) in enumerate(zip(columns, items[row:row + cols]), row):
            with col:
                data = thumb_bytes(payload)
                if data:
                    st.image(data, width=96)
                st.caption(caption)
                if button is not None:
                    st.button(button[0], key=f"{key}_{i}", on_click=button[1], args=(i,))


def page_hint(text: str, page: str, label: str) -> None:
    st.info(text)
    st.page_link(page, label=label)


def as_plain(x: Any) -> Any:
    """numpy scalars to Python for tables."""
    return x.item() if isinstance(x, np.generic) else x


# ----------------------------------------------------------------------------- the catalog


@dataclass
class Catalog:
    """Every point's id, label, cluster and middle-block means: one scan, cached per data
    version (filters' choices, random picks, channel statistics)."""

    ids: list[str]
    keys: list[str | None]
    labels: np.ndarray        # (N,) int, -1 where the point has no label
    label_names: dict[int, str]
    clusters: np.ndarray      # (N,) int, -1 noise, -2 not clustered yet
    mid: np.ndarray           # (N, C) float32 middle-block channel means (0 where inactive)

    def __len__(self) -> int:
        return len(self.ids)

    def participation(self) -> np.ndarray:
        """(C,) participation ratio of each channel across the images,
        PR_c = (Σ_i a_ic)² / (N Σ_i a_ic²), in (0, 1]: 1 when every image activates the channel
        equally, about k/N when k images activate it equally and the rest not at all; 0 for a
        channel that never fires."""
        if not len(self):
            return np.zeros(self.mid.shape[1], np.float32)
        return participation_ratio(self.mid, axis=0, dead=0.0).astype(np.float32)


def scan_catalog(store: Store, sparse_dim: int) -> Catalog:
    ids, keys, labels, clusters, names = [], [], [], [], {}
    rows: list[tuple[list[int], list[float]]] = []
    for h in store.scroll(with_vectors=True, batch=1024):
        p = h.payload
        ids.append(h.id)
        keys.append(p.get("key"))
        lab = p.get("label")
        labels.append(-1 if lab is None else int(lab))
        if lab is not None and p.get("label_name"):
            names.setdefault(int(lab), p["label_name"])
        c = p.get("cluster_id")
        clusters.append(-2 if c is None else int(c))
        rows.append(h.sparse or ([], []))
    return Catalog(ids, keys, np.asarray(labels, np.int64), names,
                   np.asarray(clusters, np.int64), dense_of(rows, sparse_dim))


@st.cache_resource(show_spinner="Reading the collection...", max_entries=2)
def _catalog(cfg: StoreConfig, hold_s: float, version: tuple, sparse_dim: int) -> Catalog:
    with _holder(cfg, hold_s).use() as store:
        return scan_catalog(store, sparse_dim)


def catalog(store: Store, meta: dict) -> Catalog:
    """The cached catalog of the collection as it is now (call inside holder().use())."""
    s = settings()
    return _catalog(s.store, s.hold_s, data_version(store), int(meta["sparse_dim"]))
