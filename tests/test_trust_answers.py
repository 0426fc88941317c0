"""Answers that must never be wrong (issue 27, items 5-8): a readout refitted in place is refused
by every reader, a running serve or UI follows `idx alias set`, φ has the same numerics on a GPU
and a CPU (TF32 off, a stated tolerance) and the build's device is recorded, and `--device` is
checked at start while /healthz reports the model's state. Real Edge stores (and the server
backend over qdrant-client's local mode), shards written with webdataset, the app and CLI in
process; `idx serve` and `idx ui`, which would run forever on the old code, as subprocesses."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import LOCAL_URL, drop
from fastapi.testclient import TestClient
from fixtures import read_samples
from phisearch.indexer.ingest.pipeline import BuildConfig, build
from phisearch.indexer.manage.aliases import delete_alias
from phisearch.indexer.model import checkpoint as ckpt
from phisearch.indexer.model.config import PhiConfig
from phisearch.indexer.model.embedder import Embedder
from phisearch.indexer.model.phi import MID, features
from phisearch.indexer.sources import images
from phisearch.indexer.store import IDENTITY_KEYS, StoreConfig, open_store
from phisearch.indexer.store.base import check_meta
from phisearch.indexer.train.fit_readout import fit_into_checkpoint
from phisearch.search.serve import create_app
from phisearch.ui import cli
from streamlit.testing.v1 import AppTest

IDX = [sys.executable, "-m", "phisearch.ui"]
ENV = dict(os.environ, PHISEARCH_NO_PROGRESS="1", OMP_NUM_THREADS="1")
APP = str(Path(__file__).resolve().parent.parent / "ui" / "app.py")
UI_TIMEOUT = 180
PHI = {"sigma": 0.2, "draws": 1, "seed": 0}
READOUT = "blocks+white8"


@pytest.fixture
def idx(monkeypatch, capsys):
    """`idx ARGS` in this process through cli.main: (exit code, stdout, stderr)."""
    monkeypatch.setenv("PHISEARCH_NO_PROGRESS", "1")

    def call(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["idx", *args])
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return (code, *capsys.readouterr())

    return call


@pytest.fixture(scope="module")
def halves(tmp_path_factory, mini_shard: str) -> dict:
    """Two shards with no image in common: A (the mini shard's first 30 samples) and B (the
    next 20); {"A": path, "B": path, "keys": {"A": set, "B": set}, "jpg": {key: bytes}}."""
    samples = read_samples(mini_shard, 50)
    out: dict = {"keys": {}, "jpg": {key: parts["jpg"] for key, parts in samples}}
    for name, part in (("A", samples[:30]), ("B", samples[30:])):
        out[name] = str(tmp_path_factory.mktemp("halves") / f"{name}.tar")
        with wds.TarWriter(out[name]) as w:
            for key, parts in part:
                w.write({"__key__": key, **parts})
        out["keys"][name] = {key for key, _ in part}
    return out


def whitened_checkpoint(src: str, folder: Path, fit_on: str) -> str:
    """A copy of `src` with a whitened readout (blocks, 8 dims) fitted on `fit_on` as its
    default: a non-built-in checkpoint, as `idx fit-readout --checkpoint C` leaves it."""
    path = folder / "whitened.safetensors"
    shutil.copy(src, path)
    shutil.copy(Path(src).with_suffix(".json"), path.with_suffix(".json"))
    assert fit_into_checkpoint(str(path), [fit_on], "blocks", 8, **PHI) == READOUT
    return str(path)


def build_into(cfg: StoreConfig, shard: str, checkpoint: str, readout: str = "mid") -> dict:
    return build(BuildConfig(data=(shard,), store=cfg, checkpoint=checkpoint,
                             phi=PhiConfig(**PHI, readout=readout), batch_size=32, workers=0,
                             device="cpu"))


@pytest.fixture
def refit_case(tmp_path, halves, tiny_ckpt) -> dict:
    """Collection `photos` built from shard A with a checkpoint whitened on A; `refit()` then
    rewrites that checkpoint in place with a whitening fitted on B (what `idx fit-readout
    --checkpoint C --data B` does): the weights' hash stays, readout_sha256 changes."""
    path = whitened_checkpoint(tiny_ckpt, tmp_path, halves["A"])
    cfg = StoreConfig(path=str(tmp_path / "store"), collection="photos")
    build_into(cfg, halves["A"], path, READOUT)
    meta = stored_meta(cfg)

    def refit() -> None:
        fit_into_checkpoint(path, [halves["B"]], "blocks", 8, **PHI)
        after = Embedder.create(path, PhiConfig(**PHI, readout=READOUT), "cpu").meta()
        assert after["model_sha256"] == meta["model_sha256"]
        assert after["readout"] == meta["readout"] == READOUT
        assert after["readout_sha256"] != meta["readout_sha256"]

    return {"cfg": cfg, "checkpoint": path, "meta": meta, "refit": refit,
            "jpg": halves["jpg"], "keys": halves["keys"]}


def stored_meta(cfg: StoreConfig) -> dict:
    with open_store(cfg) as st:
        return st.meta()


def one_line_naming_the_readout(message: str) -> None:
    assert "\n" not in message.strip(), message
    assert "readout_sha256" in message, message


def test_refit_readout_in_place_is_refused_by_query_and_reconstruct(refit_case, idx, tmp_path):
    cfg, key, image = refit_case["cfg"], min(refit_case["keys"]["A"]), tmp_path / "q.jpg"
    image.write_bytes(refit_case["jpg"][key])
    store = ["--store", cfg.path, "--collection", cfg.collection]
    code, out, err = idx("query", str(image), "-k", "1", "--json", *store)
    assert code == 0 and json.loads(out)["hits"][0]["key"] == key, err
    refit_case["refit"]()
    code, out, err = idx("query", str(image), "-k", "1", "--json", *store)
    assert code == 1 and out == "", out
    one_line_naming_the_readout(err)
    assert err.startswith("error: ") and "fit-readout" in err
    code, out, err = idx("reconstruct", "--key", key, "-n", "1", "--levels", "1", "--steps", "0",
                         "--out", str(tmp_path / "r.png"), *store)
    assert code == 1 and not (tmp_path / "r.png").exists()
    one_line_naming_the_readout(err)
    # a search from a stored point needs no model: still answered, from the stored vectors
    code, out, err = idx("query", "--key", key, "-k", "1", "--json", *store)
    assert code == 0 and json.loads(out)["hits"][0]["key"] == key


def test_refit_readout_in_place_is_refused_by_a_running_serve(refit_case, halves):
    """serve loaded the model before the refit: its cache must see the file change, refuse
    (503, /healthz too), and after the collection is rebuilt answer with the new whitening."""
    cfg, jpg = refit_case["cfg"], refit_case["jpg"]
    key = sorted(refit_case["keys"]["A"])[1]
    with TestClient(create_app(cfg)) as c:
        assert c.get("/healthz").status_code == 200
        assert c.post("/search", params={"k": 1}, content=jpg[key]).json()["hits"][0]["key"] == key
        before = np.asarray(c.post("/phi", content=jpg[key]).json()["phi"])
        refit_case["refit"]()
        for r in (c.post("/search", params={"k": 1}, content=jpg[key]),
                  c.post("/phi", content=jpg[key])):
            assert r.status_code == 503, r.text
            assert (r.json()["error"], r.json()["reason"]) == ("model_unavailable",
                                                               "model_mismatch")
            one_line_naming_the_readout(r.json()["message"])
        r = c.get("/healthz")
        assert r.status_code == 503 and r.json()["status"] == "unhealthy"
        assert r.json()["model"]["state"] == "failed"
        one_line_naming_the_readout(r.json()["model"]["reason"])
        # rebuilt with the refitted checkpoint: the same identity but the new readout_sha256,
        # so the cache must not hand back the model it loaded first
        with open_store(cfg) as st:
            st.drop()
        build_into(cfg, halves["A"], refit_case["checkpoint"], READOUT)
        r = c.post("/phi", content=jpg[key])
        assert r.status_code == 200, r.text
        with open_store(cfg) as st:
            hit, = list(st.scroll({"key": key}, with_vectors=True))
        assert stored_meta(cfg)["readout_sha256"] != refit_case["meta"]["readout_sha256"]
        # one image alone vs in a build's batch: the last float32 bits differ by BLAS path (seen
        # 2e-6 on an AVX-512 host); the whitening before the refit is far off
        np.testing.assert_allclose(r.json()["phi"], hit.vector, rtol=0, atol=1e-5)
        assert np.abs(np.asarray(r.json()["phi"]) - before).max() > 1e-2
        r = c.get("/healthz")
        assert r.status_code == 200 and r.json()["model"]["state"] == "loaded", r.text


def use_ui(monkeypatch, cfg: StoreConfig, hold_s: str = "0") -> AppTest:
    """The UI over cfg, run once. hold_s "0": the handle is closed after every use (our own
    opens never wait on the UI); "inf": kept until another process asks, as `idx ui` does."""
    monkeypatch.setenv("PHISEARCH_UI_STORE", cfg.path)
    monkeypatch.setenv("PHISEARCH_UI_COLLECTION", cfg.collection)
    monkeypatch.setenv("PHISEARCH_UI_DEVICE", "cpu")
    monkeypatch.setenv("PHISEARCH_UI_HOLD_S", hold_s)
    monkeypatch.delenv("PHISEARCH_UI_QDRANT_URL", raising=False)
    return AppTest.from_file(APP, default_timeout=UI_TIMEOUT).run()


def ok(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


def test_refit_readout_in_place_is_refused_by_the_ui(refit_case, monkeypatch):
    jpg, (first, second) = refit_case["jpg"], sorted(refit_case["keys"]["A"])[:2]
    at = use_ui(monkeypatch, refit_case["cfg"])
    at.file_uploader(key="search_upload").upload("a.jpg", jpg[first], "image/jpeg")
    at.run()
    ok(at)
    assert at.session_state["hits"][0].payload["key"] == first
    refit_case["refit"]()
    at.file_uploader(key="search_upload").upload("b.jpg", jpg[second], "image/jpeg")
    at.run()
    ok(at)
    assert len(at.error) == 1, [e.value for e in at.error]
    one_line_naming_the_readout(at.error[0].value)
    assert "hits" not in at.session_state


@pytest.fixture(params=["edge", "server-local"])
def two_collections(request, tmp_path, halves, tiny_ckpt):
    """Collections a (shard A) and b (shard B), same model and φ, and an alias live -> a, on an
    Edge folder or the server backend (local mode). Yields (cfg of `live`, store options)."""
    edge = request.param == "edge"
    place = {"path": str(tmp_path / "store")} if edge else {"url": LOCAL_URL}
    opts = ["--store", place["path"]] if edge else ["--qdrant-url", LOCAL_URL]
    tag = "" if edge else f"t{uuid.uuid4().hex[:8]}_"
    names = {n: tag + n for n in ("a", "b", "live")}
    if not edge:
        request.getfixturevalue("qdrant_local")
    for n, shard in (("a", halves["A"]), ("b", halves["B"])):
        build_into(StoreConfig(**place, collection=names[n]), shard, tiny_ckpt)
    yield StoreConfig(**place, collection=names["live"]), names, opts
    if not edge:
        delete_alias(StoreConfig(**place), names["live"])
        for n in ("a", "b"):
            drop(StoreConfig(**place, collection=names[n]))


def test_alias_switch_reaches_a_running_serve(two_collections, halves, idx):
    live, names, opts = two_collections
    assert idx("alias", "set", names["live"], names["a"], *opts)[0] == 0
    key = min(halves["keys"]["B"])     # an image only b holds
    image = halves["jpg"][key]
    with TestClient(create_app(live)) as c:
        assert c.get("/healthz").json()["points"] == 30
        hits = c.post("/search", params={"k": 5}, content=image).json()["hits"]
        assert {x["key"] for x in hits} <= halves["keys"]["A"] and hits[0]["distance"] > 1e-3
        code, _, err = idx("alias", "set", names["live"], names["b"], *opts)
        assert code == 0, err
        hits = c.post("/search", params={"k": 5}, content=image).json()["hits"]
        assert {x["key"] for x in hits} <= halves["keys"]["B"], hits
        assert hits[0]["key"] == key and hits[0]["distance"] < 1e-3
        r = c.post("/search", params={"id": hits[0]["id"], "k": 3})   # a point only b holds
        assert r.status_code == 200 and r.json()["hits"][0]["key"] == key
        h = c.get("/healthz").json()
        assert (h["points"], h["collection"], h["resolved_collection"]) == (
            20, names["live"], names["b"]), h
        # and back: each request answers from the target the alias names when it comes
        assert idx("alias", "set", names["live"], names["a"], *opts)[0] == 0
        assert c.get("/healthz").json()["points"] == 30


def test_alias_switch_reaches_a_running_ui(tmp_path, halves, tiny_ckpt, idx, monkeypatch):
    root = tmp_path / "store"
    for n, shard in (("a", halves["A"]), ("b", halves["B"])):
        build_into(StoreConfig(path=str(root), collection=n), shard, tiny_ckpt)
    assert idx("alias", "set", "live", "a", "--store", str(root))[0] == 0
    # the UI keeps its handle between page runs, as `idx ui` does: the case that went wrong
    at = use_ui(monkeypatch, StoreConfig(path=str(root), collection="live"), hold_s="inf")
    at.radio(key="search_src").set_value("Random indexed image").run()
    at.button(key="random").click().run()
    ok(at)
    assert {x.payload["key"] for x in at.session_state["hits"]} <= halves["keys"]["A"]
    assert idx("alias", "set", "live", "b", "--store", str(root))[0] == 0
    at.run()
    ok(at)
    keys = {x.payload["key"] for x in at.session_state["hits"]}
    assert keys and keys <= halves["keys"]["B"], keys
    assert {m.label: m.value for m in at.metric}["Indexed images"] == "20"


def _fp32_flags(flags: dict | None = None) -> dict:
    """The flags that let fp32 convolutions and matmuls run in TF32, through torch's own API
    (the per-op settings of torch >= 2.9, else allow_tf32); set to `flags` when given."""
    b = torch.backends
    new = hasattr(b.cudnn, "conv") and hasattr(b.cudnn.conv, "fp32_precision")
    ops = ((b.cudnn.conv, "fp32_precision"), (b.cuda.matmul, "fp32_precision")) if new else \
        ((b.cudnn, "allow_tf32"), (b.cuda.matmul, "allow_tf32"))
    for (obj, attr), name in zip(ops, ("conv", "matmul")):
        if flags is not None:
            setattr(obj, attr, flags[name])
    return {name: getattr(obj, attr) for (obj, attr), name in zip(ops, ("conv", "matmul"))}


def test_phi_pass_turns_tf32_off_and_restores_the_flags(mini_shard):
    new_api = isinstance(_fp32_flags()["conv"], str)
    tf32 = {"conv": "tf32", "matmul": "tf32"} if new_api else {"conv": True, "matmul": True}
    exact = {"conv": "ieee", "matmul": "ieee"} if new_api else {"conv": False, "matmul": False}
    before = _fp32_flags()
    model = ckpt.untrained("tiny", seed=1).model
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))   # once a pass
    seen: list[dict] = []
    conv.register_forward_pre_hook(lambda m, a: seen.append(_fp32_flags()))
    images = np.stack([np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 200, np.uint8)])
    try:
        _fp32_flags(tf32)              # CUDA's default for convolutions: TF32 allowed
        # two passes at once (serve's threads): neither runs with TF32, and the flags come back
        # when the last one leaves
        barrier = threading.Barrier(2)

        def meet(*_: object) -> None:   # both passes inside exact_fp32 at once
            barrier.wait(timeout=60)

        conv.register_forward_hook(meet)
        done: list[int] = []
        threads = [threading.Thread(target=lambda: done.append(len(features(
            model, images, 0.2, 1, 0, (MID,))))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert _fp32_flags() == tf32 and len(seen) == 2 and done == [1, 1]
    finally:
        _fp32_flags(before)
    assert seen and all(s == exact for s in seen), seen


def decoded(shard: str, n: int) -> np.ndarray:
    return np.stack([images.decode(p["jpg"]) for _, p in read_samples(shard, n)])


def _tf32_like(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every convolution's weights and inputs rounded to TF32's 10-bit
    mantissa, as CUDA runs fp32 convolutions by default (a CPU stand-in for it)."""
    def r10(x: torch.Tensor) -> torch.Tensor:
        i = x.detach().contiguous().float().view(torch.int32)
        return ((i + 0x1000) & ~0x1FFF).view(torch.float32)

    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
            mod.weight.data = r10(mod.weight.data)
            mod.register_forward_pre_hook(lambda _m, a: (r10(a[0]), *a[1:]))
    return m


def test_phi_agrees_across_layouts_and_batches_within_the_tolerance_tf32_exceeds(mini_shard):
    """DEVICE_RTOL is the stated agreement of the shipped model's vectors (what a search
    compares) across batches and memory layouts, and it is tight enough to see TF32."""
    from phisearch.indexer.model.phi import DEVICE_RTOL

    batch, emb = decoded(mini_shard, 8), Embedder.create("small64", device="cpu")
    ref, _ = emb(batch)
    scale = np.abs(ref).max()

    def rel(v: np.ndarray) -> float:   # as DEVICE_RTOL is stated
        return float(np.abs(v - ref).max() / scale)

    def variant(model: torch.nn.Module, channels_last: bool = False) -> Embedder:
        e = copy.copy(emb)
        e.checkpoint = copy.copy(emb.checkpoint)
        e.checkpoint.model = model.to(memory_format=torch.channels_last if channels_last
                                      else torch.contiguous_format)
        e.checkpoint.model.channels_last = channels_last
        return e

    for channels_last in (False, True):
        e = variant(copy.deepcopy(emb.checkpoint.model), channels_last)
        assert rel(e(batch)[0]) <= DEVICE_RTOL
        assert rel(np.concatenate([e(x[None])[0] for x in batch])) <= DEVICE_RTOL
    assert rel(variant(_tf32_like(emb.checkpoint.model))(batch)[0]) > DEVICE_RTOL


@pytest.mark.gpu
def test_phi_on_cuda_matches_cpu_within_the_tolerance(mini_shard):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from phisearch.indexer.model.phi import DEVICE_RTOL

    batch = decoded(mini_shard, 32)
    cpu, cpu_mid = Embedder.create("small64", device="cpu")(batch)
    gpu, gpu_mid = Embedder.create("small64", device="cuda")(batch)
    assert np.abs(gpu - cpu).max() <= DEVICE_RTOL * np.abs(cpu).max()
    assert np.abs(gpu_mid - cpu_mid).max() <= DEVICE_RTOL * np.abs(cpu_mid).max()


def test_build_records_its_device_and_idx_status_shows_it(tmp_path, halves, tiny_ckpt, idx):
    cfg = StoreConfig(path=str(tmp_path / "store"), collection="photos")
    build_into(cfg, halves["B"], tiny_ckpt)
    meta = stored_meta(cfg)
    assert meta["device"] == "cpu"
    # not identity: a GPU build may add to a CPU-built collection (φ's numerics match)
    assert "device" not in IDENTITY_KEYS and "readout_sha256" in IDENTITY_KEYS
    check_meta(meta, dict(meta, device="cuda"), "here")
    store = ["--store", cfg.path, "--collection", "photos"]
    code, out, _ = idx("status", "--json", *store)
    s = json.loads(out)
    assert code == 0 and s["device"] == "cpu"
    assert [c["device"] for c in s["collections"]] == ["cpu"]
    code, out, _ = idx("status", *store)
    assert code == 0 and "built on cpu" in out


def test_every_command_refuses_a_device_typo_or_a_missing_gpu_at_start(tmp_path, mini_store,
                                                                       mini_shard, idx):
    """Exit 2 with one error line before anything is loaded or served. serve and ui run as
    subprocesses: the old serve started (answering /healthz 200 while every /phi and /search
    was a 503), the old ui started Streamlit; the others in process."""
    image = tmp_path / "q.jpg"
    image.write_bytes(read_samples(mini_shard, 1)[0][1]["jpg"])
    devices = [("cdua", 'unknown device "cdua"')] + (
        [] if torch.cuda.is_available() else [("cuda", "torch sees no CUDA device")])
    for device, said in devices:
        for command in ("serve", "ui"):
            r = subprocess.run([*IDX, command, "--store", str(mini_store), "--port", "1",
                                "--device", device], check=False, capture_output=True,
                               text=True, env=ENV, timeout=120, stdin=subprocess.DEVNULL)
            assert r.returncode == 2, (command, device, r.stderr[-1000:])
            errors = [line for line in r.stderr.splitlines() if said in line]
            assert len(errors) == 1 and "--device" in errors[0], r.stderr
        for args in (["query", str(image), "--store", str(mini_store)],
                     ["build", "--data", mini_shard, "--store", str(tmp_path / "s")],
                     ["reconstruct", "--image", str(image), "--out", str(tmp_path / "r.png")]):
            code, out, err = idx(*args, "--device", device)
            assert code == 2 and out == "", (args, err)
            assert sum(said in line for line in err.splitlines()) == 1, err
    assert not (tmp_path / "s").exists() and not (tmp_path / "r.png").exists()


def test_healthz_reports_the_model_state_and_is_not_ok_when_it_cannot_load(
        tmp_path, halves, tiny_ckpt):
    path = tmp_path / "model.safetensors"
    shutil.copy(tiny_ckpt, path)
    cfg = StoreConfig(path=str(tmp_path / "store"), collection="photos")
    build_into(cfg, halves["B"], str(path))
    key = min(halves["keys"]["B"])
    for device, said in [("cdua", 'unknown device "cdua"')] + (
            [] if torch.cuda.is_available() else [("cuda", "no CUDA device")]):
        with pytest.raises(ValueError, match=said):   # refused when the app is made
            create_app(cfg, device=device)
    with TestClient(create_app(cfg)) as c:
        assert c.get("/healthz").status_code == 200
        path.rename(tmp_path / "moved.safetensors")        # the checkpoint goes away
        r = c.get("/healthz")
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["status"] == "unhealthy" and body["reason"] == "model_load_failed"
        assert body["model"]["state"] == "failed" and "not found" in body["model"]["reason"]
        assert "\n" not in body["message"]
        r = c.post("/phi", content=halves["jpg"][key])
        assert r.status_code == 503 and r.json()["error"] == "model_unavailable"
        (tmp_path / "moved.safetensors").rename(path)      # back: healthy again
        r = c.get("/healthz")
        assert r.status_code == 200 and r.json()["model"]["state"] == "loaded", r.text
        assert r.json()["model"]["device"] == "cpu"
        assert c.post("/phi", content=halves["jpg"][key]).status_code == 200
