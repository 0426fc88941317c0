"""The UI's pages run headless (streamlit.testing AppTest) against a real Edge store built from
the mini shard with a tiny untrained checkpoint. The browser test is test_ui_browser.py."""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from phisearch.indexer.sources import images
from phisearch.indexer.sources.shards import read_shard
from phisearch.indexer.store import StoreConfig, open_store
from PIL import Image
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "ui" / "app.py")
TIMEOUT = 180   # a first run imports torch and loads the model; CI shares 2 cores


def build_store(root: Path, mini_store: Path) -> StoreConfig:
    """The mini shard (100 images, 10 labels) indexed with a tiny untrained network: a copy of
    conftest.mini_store in root."""
    shutil.copytree(mini_store, root / "store")
    return StoreConfig(path=str(root / "store"), collection="phisearch")


@pytest.fixture(scope="module")
def store_cfg(tmp_path_factory, mini_store) -> StoreConfig:
    return build_store(tmp_path_factory.mktemp("ui"), mini_store)


def use_store(monkeypatch, cfg: StoreConfig, hold_s: str = "2") -> None:
    """The UI's environment for cfg. By default the handle is released 2 s after the last use:
    the tests' own opens (busy_wait 10 s) get in after it."""
    monkeypatch.setenv("PHISEARCH_UI_STORE", cfg.path)
    monkeypatch.setenv("PHISEARCH_UI_COLLECTION", cfg.collection)
    monkeypatch.setenv("PHISEARCH_UI_DEVICE", "cpu")
    monkeypatch.setenv("PHISEARCH_UI_HOLD_S", hold_s)
    monkeypatch.delenv("PHISEARCH_UI_QDRANT_URL", raising=False)


@pytest.fixture
def app(monkeypatch, store_cfg):
    use_store(monkeypatch, store_cfg)
    return AppTest.from_file(APP, default_timeout=TIMEOUT).run()


def on_page(at, name: str):
    return at.switch_page(f"views/{name}.py").run()


def ok(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


def random_search(at, k: int = 7):
    at.radio(key="search_src").set_value("Random indexed image").run()
    at.button(key="random").click().run()
    at.slider(key="search_k").set_value(k).run()   # the filters appear with a query
    ok(at)
    return at


def first_jpeg(mini_shard: str) -> tuple[str, bytes]:
    raw = next(r for r in read_shard(mini_shard) if isinstance(r, dict))
    return raw["__key__"], raw["jpg"]


def test_search_random_gives_k_hits_and_label_filter_applies(app):
    at = random_search(app, k=7)
    hits = at.session_state["hits"]
    assert len(hits) == 7
    assert hits[0].distance < 1e-3   # the random image itself, at distance 0
    captions = [c.value for c in at.caption if c.value.startswith("d = ")]
    assert len(captions) == 7 and all("unclustered" in c for c in captions)
    assert not at.error
    at.selectbox(key="search_label").set_value(3).run()
    ok(at)
    hits = at.session_state["hits"]
    assert len(hits) == 7 and {h.payload["label"] for h in hits} == {3}


def test_upload_of_an_indexed_image_finds_itself(app, mini_shard):
    key, jpg = first_jpeg(mini_shard)
    app.file_uploader(key="search_upload").upload("q.jpg", jpg, "image/jpeg")
    app.run()
    ok(app)
    hits = app.session_state["hits"]
    assert hits[0].payload["key"] == key and hits[0].distance < 1e-3
    assert app.session_state["query"]["name"] == "upload: q.jpg"


def test_bad_upload_shows_an_error_not_a_trace(app):
    app.file_uploader(key="search_upload").upload("notes.txt", b"just some text\n" * 20,
                                                  "text/plain")
    app.run()
    ok(app)
    assert len(app.error) == 1 and "not an image" in app.error[0].value
    assert "notes.txt" in app.error[0].value and "hits" not in app.session_state


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_read_upload_names_the_reason():
    from fixtures import bomb_png
    from phisearch.ui.common import read_upload

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 120, 3), np.uint8))
    cases = {
        "empty": (b"", "empty"),
        "text": (b"hello" * 50, "not an image"),
        "tiny": (_encode(rgb.resize((8, 8)), "PNG"), "too small"),
        "bomb": (bomb_png(), "too large"),
        "huge": (b"\xff\xd8" + bytes(images.MAX_BYTES), "too large"),
        "corrupt": (_encode(rgb, "JPEG")[:200], "corrupt"),
    }
    for name, (data, why) in cases.items():
        up = read_upload(name, data)
        assert up.image is None and why in up.error and name in up.error, (name, up.error)
    cmyk = read_upload("c.jpg", _encode(rgb.convert("CMYK"), "JPEG"))
    assert cmyk.error is None and cmyk.image.shape == (64, 64, 3)
    assert any("CMYK" in n for n in cmyk.notes)
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    gif = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    anim = read_upload("a.gif", gif)
    assert anim.error is None and anim.image.shape == (64, 64, 3)
    assert any("first of 2 frames" in n for n in anim.notes)


def test_explain_page_lists_drivers_and_shared_channels(app):
    at = random_search(app, k=5)
    second = at.session_state["hits"][1]
    at.button(key="hit_1").click().run()     # "Explain" under the second hit: opens the page
    ok(at)
    assert at.session_state["explain_id"] == second.id
    metrics = {m.label: m.value for m in at.metric}
    assert float(metrics["Search distance (collection's readout)"]) == pytest.approx(
        second.distance, abs=1e-3)
    assert len(at.dataframe) >= 1 and "share" in at.dataframe[0].value.columns


def test_index_page_shows_the_point_count(app):
    at = on_page(app, "index")
    ok(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Points"] == "100" and metrics["Shards done"] == "1"
    assert metrics["Shards pending"] == "0"


def test_channels_page_top_images_and_participation(app):
    at = on_page(app, "channels")
    ok(at)
    pr = float({m.label: m.value for m in at.metric}["Participation ratio"])
    assert 0 < pr <= 1
    acts = [c.value for c in at.caption if c.value.startswith("a = ")]
    assert len(acts) == 24
    values = [float(a.split()[2]) for a in acts]
    assert values == sorted(values, reverse=True)


def test_clusters_page_before_and_after_idx_cluster(monkeypatch, store_cfg, tmp_path):
    from phisearch.indexer.manage import cluster as cluster_mod

    copy = StoreConfig(path=str(tmp_path / "store"), collection=store_cfg.collection)
    shutil.copytree(store_cfg.path, copy.path)   # clustering writes labels: use a copy
    use_store(monkeypatch, copy)
    at = on_page(AppTest.from_file(APP, default_timeout=TIMEOUT).run(), "clusters")
    ok(at)
    assert any("run `idx cluster`" in i.value for i in at.info)
    cluster_mod.cluster(copy, cluster_mod.ClusterConfig(method="kmeans", k=3))
    at.run()
    ok(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Clusters"] == "3" and metrics["Noise points"] == "0"
    members = [c.value for c in at.caption if " · p = " in c.value]
    assert members   # the first cluster's members, from a scroll filtered on cluster_id
    at = random_search(on_page(at, "search"), k=5)
    # choices come from the data: k-means leaves no noise, so there is no "noise (-1)"
    assert at.selectbox(key="search_cluster").options == ["any cluster", "cluster 0",
                                                          "cluster 1", "cluster 2"]
    assert all(" · cluster " in c.value for c in at.caption if c.value.startswith("d = "))


def test_reconstruct_a_search_hit_with_progress_and_errors(app):
    at = random_search(app, k=3)
    on_page(at, "reconstruct")
    at.radio(key="recon_src").set_value("Search hit").run()
    at.number_input(key="recon_levels").set_value(2)
    at.number_input(key="recon_steps").set_value(1)
    at.slider(key="recon_n").set_value(2)
    at.button(key="recon_run").click().run()
    ok(at)
    assert not at.error
    res = at.session_state["recon_result"]
    summary = res["summary"]
    assert summary["levels_run"] == 2 and len(summary["phi_rel_error"]) == 2
    assert all(np.isfinite(e) for e in summary["phi_rel_error"])
    assert at.get("progress")   # the progress bar the callback moved
    # guided and unguided samples, each once, with its error against the index's mean φ and
    # its nearest indexed images; the hit's class is the target's
    assert len(res["guided"]) == len(res["unguided"]) == 2
    hit = at.session_state["hits"][0]
    assert res["label"] == (hit.payload.get("label_name") or str(hit.payload["label"]))
    for r in res["guided"] + res["unguided"]:
        assert np.isfinite(r.centered_error) and r.centered_error > 0
        assert r.k == 10 and 1 <= r.majority_count <= 10 and len(r.neighbours) == 3
        assert r.neighbours[0].distance <= r.neighbours[-1].distance
    captions = [c.value for c in at.caption if c.value.startswith("#")]
    assert len(captions) == 4 and all(" · error " in c for c in captions)
    assert any("Estimated time: up to" in c.value for c in at.caption)
    # results and settings survive a page switch
    on_page(at, "search")
    on_page(at, "reconstruct")
    ok(at)
    assert at.session_state["recon_result"] is res
    assert at.number_input(key="recon_levels").value == 2
    assert at.slider(key="recon_n").value == 2


def test_a_held_store_gives_a_retry_message(app, store_cfg):
    """While another handle holds the Edge store (as `idx build` does), pages say so."""
    with open_store(store_cfg):
        for page in ("index", "search"):
            at = on_page(app, page)
            ok(at)
            assert len(at.warning) == 1 and "busy" in at.warning[0].value
            assert "retry" in at.warning[0].value.lower()
            assert at.button(key="_busy_retry")
    at = on_page(app, "index")   # released: the page works again
    ok(at)
    assert not at.warning


def test_holder_releases_an_idle_handle(store_cfg):
    from phisearch.ui.common import StoreHolder

    h = StoreHolder(StoreConfig(path=store_cfg.path), hold_s=0.3)   # waits out other holders
    with h.use() as st:
        assert st.count() == 100
    assert h.is_open
    deadline = time.monotonic() + 120      # released by itself; the bound is a failure's
    while h.is_open and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not h.is_open
    with open_store(store_cfg) as other:   # another process's open now succeeds at once
        assert other.count() == 100


def test_pages_without_a_collection_say_build_first(monkeypatch, tmp_path):
    use_store(monkeypatch, StoreConfig(path=str(tmp_path / "nothing"), collection="phisearch"))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    ok(at)
    assert any("run `idx build" in i.value for i in at.info)
    at = on_page(at, "index")
    ok(at)
    assert any("run `idx build" in i.value for i in at.info)
