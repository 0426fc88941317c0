"""`idx serve`: φ and search over HTTP (FastAPI), for services that hold no model of their own.

Endpoints (all JSON):
  GET  /healthz   200 {"status": "ok", collection, resolved_collection, points, model_sha256,
                  ..., "model": {"state": "loaded", "device", "checkpoint"}}
                  503 {"status": "unhealthy", "reason": ...} (no collection, store busy, server
                  down, or the model cannot be loaded or no longer makes the collection's
                  vectors: "model": {"state": "failed", "reason": one line})
  POST /phi       an image (multipart file or raw body) -> its φ with the COLLECTION's model and
                  settings (query.embedder_for): {"phi", "phi_sparse": {"indices", "values"},
                  "model_sha256", "readout", "sigma", "draws", "seed"}
  POST /search    an image, ?k=&label=&cluster=&dataset= -> {"hits": [CONTRACT hit shape]}
  GET  /          the endpoints, and where the OpenAPI schema is (/docs is off: serve_api.py)
Errors, all {"error", "message", "reason"} (serve_api.py): 413 body over max_bytes; 400
undecodable bytes (empty, not an image, corrupt); 422 a decodable but unusable image (too small /
too many pixels), an invalid or unknown query parameter; 404 no such point or route; 503 busy or
no collection. A filter that matches no point gives 200 with no hits and `why_empty`.

Edge ownership (Qdrant Edge allows one open handle per shard, STACK.md): serve holds the
collection between requests (reopening costs ~140 ms at 13k points) and hands it over when
another process asks for it (store/holder.py: a build, `idx remove`, the UI... waits on the
collection's lock and leaves a marker; serve lets go within ~0.1 s of being idle). While that
process holds it, requests wait up to `busy_wait` (default 1 s) and then get 503
{"error": "busy"} with `Retry-After: 1`; afterwards serve opens it again. `--hold S` keeps an
idle handle at most S seconds (0: open and close per request). A Qdrant server has no such
limit: one client is kept for the life of the process.
Aliases: --collection may be an alias; every request looks up its target (holder.py), so
`idx alias set` moves a running serve to the new collection at its next request.
The model: loaded once per collection identity (store.IDENTITY_KEYS: model, readout and its
whitening, φ settings) and checkpoint file (path, inode, size, mtime: a checkpoint refitted in
place is read again), and checked against the collection (query.embedder_for) before it answers;
a model that cannot load, or no longer makes the collection's vectors, is a 503 on /phi,
/search and /healthz with the reason. The device is checked when the app is made.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from phisearch.indexer.manage.aliases import missing_collection
from phisearch.indexer.model.embedder import Embedder, checkpoint_stamp, pick_device, sparse_of
from phisearch.indexer.sources import images
from phisearch.indexer.store import (
    INT64_MAX,
    INT64_MIN,
    MetaMismatch,
    Store,
    StoreBusy,
    StoreConfig,
    StoreError,
)
from phisearch.indexer.store.base import identity
from phisearch.indexer.store.holder import StoreHolder
from starlette.concurrency import run_in_threadpool

from . import query as q
from .serve_api import SEARCH_BODY, UPLOAD_BODY, ApiError, check_params, install

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BYTES = 20 * 1024 * 1024     # default request body limit
UNDECODABLE = {"empty", "not_an_image", "corrupt_image"}   # -> 400; other BadImage -> 422
SEARCH_PARAMS = ("k", "label", "cluster", "dataset", "id")
MODELS_KEPT = 4                  # models cached (one per collection identity and checkpoint file)


@dataclass(frozen=True)
class ServeConfig:
    store: StoreConfig
    device: str = "cpu"              # φ of uploads as `idx query` computes it (CPU fp32)
    max_bytes: int = MAX_BYTES       # request body limit -> 413
    busy_wait: float = 1.0           # Edge: seconds to wait for a held store before 503
    hold_s: float = math.inf         # Edge: idle seconds a handle is kept at most (inf: until
                                     # another process asks for it; 0: per request)
    max_k: int = 1000


class Service:
    """The store access rule and the model cache, shared by all requests of one process."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.store_cfg = replace(cfg.store, busy_wait=cfg.busy_wait)
        self.holder = StoreHolder(self.store_cfg, cfg.hold_s)   # the one shared with the UI
        self._model_lock = threading.Lock()
        self._models: dict[str, Embedder | ApiError] = {}   # a failure is kept too (healthz)

    @property
    def where(self) -> str:
        return self.store_cfg.where

    @contextmanager
    def store(self) -> Iterator[Store]:
        """The store for one request: busy -> 503 with Retry-After, unreachable -> 503."""
        try:
            with self.holder.use() as st:
                yield st
        except StoreBusy as e:
            raise ApiError(503, "busy", f"{e}; retry", reason="held_by_another_process",
                           retry_after=1) from None
        except ApiError:
            raise
        except StoreError as e:
            raise ApiError(503, "store_unavailable", str(e), reason="store_error") from None

    def read(self, fn: Callable[[Store, dict], T]) -> T:
        """fn(store, meta) with the collection's metadata; 503 when there is no collection."""
        with self.store() as st:
            meta = st.meta()
            if meta is None:
                raise ApiError(503, "no_collection", missing_collection(self.store_cfg),
                               reason="not_built")
            return fn(st, meta)

    def model_key(self, meta: dict) -> str:
        """The cache key: the collection's identity, the checkpoint it names and that file's
        stamp (a file refitted in place changes it), and the device."""
        try:
            stamp = list(checkpoint_stamp(meta.get("checkpoint")))
        except OSError as e:   # no such file: keyed on the error, looked for again next time
            stamp = [str(e)]
        return json.dumps([identity(meta), meta.get("checkpoint"), stamp, self.cfg.device],
                          sort_keys=True, default=str)

    def embedder(self, meta: dict) -> Embedder:
        """The collection's model and φ settings: loaded once per model_key, checked to make
        the collection's vectors; a failure (503) is kept under its key as well."""
        key = self.model_key(meta)
        with self._model_lock:
            got = self._models.get(key)
            if got is None:
                got = self._load(meta)
                while len(self._models) >= MODELS_KEPT:
                    self._models.pop(next(iter(self._models)))
                self._models[key] = got
            if isinstance(got, ApiError):
                raise got
            return got

    def _load(self, meta: dict) -> Embedder | ApiError:
        try:
            emb = q.embedder_for(meta, self.cfg.device, self.where)
        except MetaMismatch as e:
            return _model_failed(str(e), "model_mismatch")
        except Exception as e:  # noqa: BLE001 - whatever stops the load, /healthz says it
            log.warning("cannot load the model for %s: %s", self.where, e)
            return _model_failed(f"cannot load the collection's model: {e}", "model_load_failed")
        log.info("loaded model %s for %s", emb.checkpoint.sha256[:12], self.where)
        return emb

    def embed(self, data: bytes, meta: dict) -> tuple[np.ndarray, np.ndarray, Embedder]:
        """Bytes -> (dense (dim,), middle-block means (C,)), exactly as indexing computes them."""
        try:
            img = images.decode(data)
        except images.BadImage as e:
            status = 400 if e.reason in UNDECODABLE else 422
            raise ApiError(status, "bad_image", f"cannot use this image: {e}",
                           reason=e.reason) from None
        emb = self.embedder(meta)
        dense, mid = emb(img[None])
        return dense[0], mid[0], emb

    def health(self) -> dict:
        """The collection and the model's state: 200 only when both can answer (the model is
        loaded here if it was not yet, outside the store lock)."""
        def fn(st: Store, meta: dict) -> tuple[dict, dict]:
            return meta, {
                "status": "ok", "backend": st.backend, "collection": self.store_cfg.collection,
                "resolved_collection": st.name, "points": st.count(),
                "model_sha256": meta.get("model_sha256"), "readout": meta.get("readout"),
                "sigma": meta.get("sigma"), "draws": meta.get("draws"), "seed": meta.get("seed"),
                "dim": meta.get("dim"), "schema_version": meta.get("schema_version")}
        meta, out = self.read(fn)
        emb = self.embedder(meta)   # ApiError with "model": {"state": "failed", ...}
        out["model"] = {"state": "loaded", "device": str(emb.device),
                        "checkpoint": emb.checkpoint.name}
        out["model_loaded"] = True
        return out

    def phi(self, data: bytes) -> dict:
        # meta under the store lock, the model pass outside it: a φ never blocks `idx build`
        meta = self.read(lambda st, m: m)
        dense, mid, emb = self.embed(data, meta)
        (idx, vals), = sparse_of(mid[None])
        return {"phi": dense.astype(np.float32).tolist(),
                "phi_sparse": {"indices": idx, "values": vals},
                "model_sha256": emb.checkpoint.sha256, "readout": emb.readout.label,
                "sigma": float(emb.phi.sigma), "draws": int(emb.phi.effective_draws),
                "seed": int(emb.phi.seed), "dim": int(dense.shape[0])}

    def search(self, data: bytes, k: int, flt: dict | None) -> dict:
        """One store open per request: meta, φ (tens of ms) and the search under one handle;
        opening an Edge shard costs more than the φ pass."""
        def fn(st: Store, meta: dict) -> dict:
            dense, mid, _ = self.embed(data, meta)
            hits = q.search(st, q.Target(dense, mid), k, flt)
            return _answer(st, hits, {"k": k, "filter": flt or {}}, meta)
        return self.read(fn)

    def search_by_id(self, point_id: str, k: int, flt: dict | None) -> dict:
        """The neighbours of a stored point: no model pass, one retrieve and one search."""
        def fn(st: Store, meta: dict) -> dict:
            try:
                target = q.target_from_id(st, point_id, meta["sparse_dim"])
            except q.NotFound as e:
                raise ApiError(404, "not_found", str(e), reason="no_such_point") from None
            hits = q.search(st, target, k, flt)
            return _answer(st, hits, {"k": k, "filter": flt or {}, "id": point_id}, meta)
        return self.read(fn)

    def close(self) -> None:
        self.holder.release()


def _model_failed(message: str, reason: str) -> ApiError:
    """The 503 of a model that cannot answer for the collection (kept, and shown by /healthz)."""
    message = " ".join(message.split())   # one line, whatever the exception said
    return ApiError(503, "model_unavailable", message, reason=reason,
                    model={"state": "failed", "reason": message})


def _answer(st: Store, hits: list, query: dict, meta: dict) -> dict:
    """/search's answer; no hits under a filter says why (q.why_no_match)."""
    out = {"hits": [q.hit_json(h) for h in hits], "query": query,
           "model_sha256": meta.get("model_sha256")}
    if not hits and query["filter"]:
        out["why_empty"] = q.why_no_match(st, query["filter"])
    return out


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 once it passes max_bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, "too_large", f"request body of {int(declared)} bytes is over the "
                       f"limit of {max_bytes} bytes", reason="max_bytes", max_bytes=max_bytes)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise ApiError(413, "too_large", f"request body is over the limit of {max_bytes} "
                           "bytes", reason="max_bytes", max_bytes=max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


async def image_bytes(request: Request, max_bytes: int) -> bytes:
    """The uploaded image: the first file of a multipart form (any field name), else the raw
    body (any content type)."""
    body = await read_body(request, max_bytes)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return body

    async def replay() -> dict:   # the form parser reads the body we already hold
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form()
    except Exception as e:  # noqa: BLE001 - any malformed form is the client's error
        raise ApiError(400, "bad_form", f"cannot parse the multipart form: {e}",
                       reason="malformed_multipart") from None
    try:
        for _, value in form.multi_items():
            if hasattr(value, "read"):
                return await value.read()
    finally:
        await form.close()
    raise ApiError(400, "no_file", "the multipart form holds no file: send the image as a file "
                   "field (curl -F file=@photo.jpg) or as the raw body", reason="no_file_field")


def create_app(store_cfg: StoreConfig, device: str = "cpu", max_bytes: int = MAX_BYTES,
               busy_wait: float = 1.0, hold_s: float = math.inf, warm: bool = True) -> FastAPI:
    """The HTTP app over one collection. warm: load the model at start-up when the collection
    is readable (else on the first request). A device that is no device, or cuda where torch
    sees none, is refused here (ValueError, one line) rather than as a 503 on every request."""
    pick_device(device)
    svc = Service(ServeConfig(store=store_cfg, device=device, max_bytes=max_bytes,
                              busy_wait=busy_wait, hold_s=hold_s))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if warm:
            try:
                await run_in_threadpool(lambda: svc.embedder(svc.read(lambda st, m: m)))
            except ApiError as e:
                log.warning("model not loaded at start-up (%s); will load on first request",
                            e.message)
        yield
        svc.close()

    # docs_url/redoc_url None: those pages load their scripts from a CDN (serve_api.py)
    app = FastAPI(title="phisearch", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="φ of an image and nearest neighbours, with the collection's model. "
                  "Errors: {\"error\", \"message\", \"reason\"}.")
    app.state.service = svc
    install(app)

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        check_params(request, ())
        try:
            return JSONResponse(await run_in_threadpool(svc.health))
        except ApiError as e:
            return JSONResponse({"status": "unhealthy", **e.body()}, status_code=503)

    @app.post("/phi", openapi_extra=UPLOAD_BODY)
    async def phi(request: Request) -> dict:
        check_params(request, ())
        data = await image_bytes(request, svc.cfg.max_bytes)
        return await run_in_threadpool(svc.phi, data)

    @app.post("/search", openapi_extra=SEARCH_BODY)
    async def search(request: Request,
                     k: int = Query(10, ge=1, le=1000, description="hits to return"),
                     label: int | None = Query(None, ge=INT64_MIN, le=INT64_MAX,
                                               description="only this label"),
                     cluster: int | None = Query(None, ge=INT64_MIN, le=INT64_MAX,
                                                 description="only this cluster_id"),
                     dataset: str | None = Query(None, description="only this dataset"),
                     id: str | None = Query(None, description="search from this stored point "
                                            "instead of an uploaded image")) -> dict:
        check_params(request, SEARCH_PARAMS)
        flt = {key: v for key, v in (("label", label), ("cluster_id", cluster),
                                     ("dataset", dataset)) if v is not None}
        if id is not None:
            return await run_in_threadpool(svc.search_by_id, id, k, flt or None)
        data = await image_bytes(request, svc.cfg.max_bytes)
        return await run_in_threadpool(svc.search, data, k, flt or None)

    return app
