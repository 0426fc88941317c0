"""The Search, Explain and Channels pages as a user meets them (issue 17): search by key and "More
like this", keys and the query's own image marked, filters in words and kept across pages, empty
states, uploads cleared and errors said once; Explain in the search's own space with the paper's
channels as a second view; Channels opening on an informative channel. AppTest against the
mini store (conftest), plus the pure functions behind them."""

from __future__ import annotations

import numpy as np
import pytest
from phisearch.indexer.store import StoreConfig, open_store
from phisearch.search import query as q
from phisearch.search.explain import (
    axis_names,
    common_channels,
    explain_readout,
    informative_channel,
    readout_words,
)
from phisearch.ui.common import scan_catalog
from streamlit.testing.v1 import AppTest
from test_ui_apptest import APP, TIMEOUT, first_jpeg, ok, on_page, random_search, use_store


@pytest.fixture
def app(monkeypatch, mini_store):
    use_store(monkeypatch, StoreConfig(path=str(mini_store), collection="phisearch"))
    return AppTest.from_file(APP, default_timeout=TIMEOUT).run()


def captions(at, start: str) -> list[str]:
    return [c.value for c in at.caption if c.value.startswith(start)]


def key_captions(at) -> list[str]:
    return [c.value.strip("`") for c in at.caption if c.value.startswith("`")]


def frame(at, *columns: str):
    """The page's table with exactly these columns (None when the page shows none)."""
    return next((d.value for d in at.dataframe if list(d.value.columns) == list(columns)), None)


def by_key(at, key: str):
    at.radio(key="search_src").set_value("Indexed key").run()
    at.text_input(key="search_key").input(key).run()
    ok(at)
    return at


# ----------------------------------------------------------------------------- search


def test_search_by_key_shows_every_key_and_marks_the_query(app, mini_shard):
    key, _ = first_jpeg(mini_shard)
    at = by_key(app, key)
    hits = at.session_state["hits"]
    assert len(hits) == 12 and hits[0].payload["key"] == key
    assert at.session_state["query"]["key"] == key
    assert key_captions(at) == [h.payload["key"] for h in hits]
    d = captions(at, "d = ")
    assert d[0].startswith("d = 0.000 (the query image) · ")
    assert not any("query image" in c for c in d[1:])
    assert at.subheader[0].value == "12 nearest"
    at.text_input(key="search_key").input("no-such-key").run()
    ok(at)
    assert len(at.error) == 1 and '"no-such-key"' in at.error[0].value


def test_more_like_this_makes_the_hit_the_query(app):
    at = random_search(app, k=6)
    third = at.session_state["hits"][2]
    at.button(key="more_2").click().run()
    ok(at)
    assert at.session_state["query"]["id"] == third.id
    hits = at.session_state["hits"]
    assert hits[0].id == third.id and len(hits) == 6
    assert captions(at, "d = ")[0].startswith("d = 0.000 (the query image)")
    assert key_captions(at)[0] == third.payload["key"]
    at.run()   # a plain rerun keeps the new query (the old upload/key is not replayed)
    assert at.session_state["query"]["id"] == third.id


def test_filters_in_words_kept_across_pages_and_no_placeholder(app):
    at = random_search(app, k=5)
    assert at.selectbox(key="search_label").index == 0      # a value, not "Choose an option"
    assert at.selectbox(key="search_label").options[0] == "any label"
    at.selectbox(key="search_label").set_value(3).run()
    name = at.session_state["hits"][0].payload["label_name"]
    assert at.subheader[0].value == f"5 nearest with label 3 ({name})"
    assert "{" not in at.subheader[0].value
    at = on_page(on_page(at, "channels"), "search")
    ok(at)
    assert at.radio(key="search_src").value == "Random indexed image"
    assert at.slider(key="search_k").value == 5 and at.selectbox(key="search_label").value == 3
    hits = at.session_state["hits"]
    assert len(hits) == 5 and {h.payload["label"] for h in hits} == {3}


def test_max_distance_zero_says_why_nothing_shows(app):
    at = random_search(app, k=5)
    own = at.session_state["query"]
    other = next(x for x in range(10) if x != own_label(at))
    at.selectbox(key="search_label").set_value(other).run()   # the query itself is filtered out
    nearest = at.session_state["hits"][0].distance
    next(x for x in at.slider if x.label == "Max distance").set_value(0.0).run()
    ok(at)
    assert at.session_state["hits"] == []
    assert any(i.value.startswith("No hit within distance 0.000: the nearest of the 5 is at "
                                  f"{nearest:.3f}") for i in at.info)
    assert own["id"] == at.session_state["query"]["id"]


def own_label(at) -> int:
    return next(h.payload["label"] for h in at.session_state["hits"]
                if h.id == at.session_state["query"]["id"])


def test_removing_the_upload_clears_query_and_hits(app, mini_shard):
    _, jpg = first_jpeg(mini_shard)
    app.file_uploader(key="search_upload").upload("q.jpg", jpg, "image/jpeg")
    app.run()
    ok(app)
    assert len(app.session_state["hits"]) == 12
    assert captions(app, "d = ")[0].startswith("d = 0.000 (identical to the query)")
    app.file_uploader(key="search_upload").clear()
    app.run()
    ok(app)
    assert "query" not in app.session_state and "hits" not in app.session_state
    assert not captions(app, "d = ")
    assert any("Upload an image" in i.value for i in app.info)


def test_an_upload_error_says_it_once(app):
    app.file_uploader(key="search_upload").upload("notes.txt", b"plain text\n" * 20, "text/plain")
    app.run()
    ok(app)
    assert [e.value for e in app.error] == [
        "Cannot use notes.txt: this is not an image file (unrecognized format)."]


# ----------------------------------------------------------------------------- explain


def test_explain_takes_apart_the_search_distance_then_the_channels(app, mini_shard):
    at = by_key(app, first_jpeg(mini_shard)[0])   # a fixed pair: the first image, its nearest
    second = at.session_state["hits"][1]
    at.button(key="hit_1").click().run()
    ok(at)
    metrics = {m.label: m.value for m in at.metric}
    assert float(metrics["Search distance (collection's readout)"]) == pytest.approx(
        second.distance, abs=1e-4)
    recomputed = next(c.value for c in at.caption if "recomputed here: " in c.value)
    assert float(recomputed.split("recomputed here: ")[1].rstrip(").")) == pytest.approx(
        second.distance, abs=1e-4)
    readout = frame(at, "dimension", "query", "hit", "share")
    assert len(readout) == 10 and readout["share"].is_monotonic_decreasing
    heads = [s.value for s in at.subheader]
    assert heads == ["What the search measured", "Second view: the paper's channels (middle block)"]
    assert "Middle-block distance (paper's φ)" in metrics
    drivers = frame(at, "channel", "query", "hit", "share")
    assert len(drivers) and (drivers["share"] > 0).all()
    thumbs = [c.value for c in at.caption if c.value.startswith("channel ")
              and c.value.endswith("Its top images:")]
    assert len(thumbs) == min(4, len(drivers))
    assert len(at.get("image")) >= 2 + len(thumbs)   # query, hit, and each driver's images


def test_explain_leaves_out_channels_active_almost_everywhere(app, mini_store, mini_shard):
    at = by_key(app, first_jpeg(mini_shard)[0])
    at.button(key="hit_1").click().run()
    ok(at)
    left = next(c.value for c in at.caption if "Left out of the lists: " in c.value)
    n_left = int(left.split("Left out of the lists: ")[1].split()[0])
    tables = [frame(at, "channel", "query", "hit", "share"), frame(at, "channel", "query", "hit")]
    drivers = set().union(*(set(t["channel"]) for t in tables if t is not None))
    with open_store(StoreConfig(path=str(mini_store))) as store:
        cat = scan_catalog(store, int(store.meta()["sparse_dim"]))
    common = set(np.flatnonzero(common_channels(cat.mid)).tolist())
    assert n_left == len(common) > 0 and not drivers & common


def test_explain_says_identical_images_for_distance_zero(app):
    at = random_search(app, k=3)
    at.button(key="hit_0").click().run()   # the query's own image
    ok(at)
    assert len(at.success) == 1 and at.success[0].value.startswith("Identical images: ")
    assert not at.dataframe


# ----------------------------------------------------------------------------- channels


def test_channels_page_opens_on_an_informative_channel(app):
    at = on_page(app, "channels")
    ok(at)
    metrics = {m.label: m.value for m in at.metric}
    active = float(next(v for k_, v in metrics.items() if k_.startswith("Active in")).rstrip("%"))
    assert 0 < active < 100
    dead = [c.value for c in at.caption if c.value.startswith("Dead channels: ")]
    assert len(dead) == 1 and "carries no information" in dead[0]


# ----------------------------------------------------------------------------- the functions


def test_explain_readout_is_exact_and_ordered():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=16), rng.normal(size=16)
    rx = explain_readout(a, b, [f"axis {i + 1}" for i in range(16)], top=16)
    assert rx["distance"] == pytest.approx(np.linalg.norm(a - b))
    assert sum(d["share"] for d in rx["drivers"]) == pytest.approx(1.0)
    assert rx["listed_share"] == pytest.approx(1.0)
    shares = [d["share"] for d in rx["drivers"]]
    assert shares == sorted(shares, reverse=True)
    assert explain_readout(a, a, ["x"] * 16)["drivers"][0]["share"] == 0.0


def test_axis_names_and_words_follow_the_readout():
    assert axis_names("blocks+white128+l2", 128, 256)[:2] == ["axis 1", "axis 2"]
    assert axis_names("mid", 4, 4) == ["channel 0", "channel 1", "channel 2", "channel 3"]
    assert axis_names("blocks", 6, 2) == ["encoder dim 0", "encoder dim 1", "encoder dim 2",
                                          "encoder dim 3", "middle channel 0", "middle channel 1"]
    words = readout_words("blocks+sqrt+white64+l2")
    assert "64 principal axes" in words and "unit length" in words and "square-rooted" in words


def test_informative_channel_and_left_out_channels():
    rng = np.random.default_rng(1)
    mid = np.zeros((100, 5), np.float32)
    mid[:, 0] = 1.0 + rng.random(100)          # active everywhere: uninformative
    mid[:30, 1] = rng.random(30) + 0.1          # active in 30%
    mid[:60, 2] = 1.0                           # active in 60%: over half
    mid[:3, 3] = 1.0                            # too few images to fill a grid
    assert informative_channel(mid) == 1         # channel 4 is dead
    assert informative_channel(mid[:, [0, 4]]) == 0   # only the ubiquitous one is alive
    assert common_channels(mid).tolist() == [True, False, False, False, False]
    ex = q.explain(mid[0], mid[50], top=5, leave_out=common_channels(mid))
    assert 0 not in [d["channel"] for d in ex["drivers"]] and ex["left_out"] == 1
    assert ex["left_out_share"] == pytest.approx(
        (mid[0, 0] - mid[50, 0]) ** 2 / ((mid[0] - mid[50]) ** 2).sum())
    assert "left_out" not in q.explain(mid[0], mid[50])   # the terminal's shape is unchanged
