"""`idx eval`: metric functions on constructed data, whitening, and the whole evaluation (library
and CLI) on the mini shard with a tiny checkpoint."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_idx
from phisearch.indexer.model import checkpoint as ckpt
from phisearch.indexer.model.readout import Readout, Whitening
from phisearch.search import eval_report
from phisearch.search import evaluate as ev
from phisearch.search import metrics as mt

BASELINES = ("phi", "pixels", "pixels16", "random_init", "phi_mid_raw", "random_init_mid_raw",
             "phi_sigma0")


def two_groups(n: int = 60, dim: int = 8, gap: float = 50.0, seed: int = 0):
    """Points around two distant centres; labels 0 / 1."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((2, dim))
    centres[1, 0] = gap
    labels = np.repeat([0, 1], n // 2)
    x = centres[labels] + rng.normal(size=(n, dim))
    return x.astype(np.float32), labels


def check_ranges(metrics: dict[str, float]) -> None:
    assert set(metrics) == set(mt.METRICS)
    for k, v in metrics.items():
        assert isinstance(v, float), (k, type(v))
        lo = -1.0 if k == "ari" else 0.0
        assert lo - 1e-9 <= v <= 1.0 + 1e-9, (k, v)


# ------------------------------------------------------------------------------ metrics


def test_separated_groups_score_perfectly() -> None:
    q, ql = two_groups(seed=1)
    g, gl = two_groups(seed=2)
    m, sep = mt.score(q, ql, g, gl)
    check_ranges(m)
    for k in ("knn@1", "knn@10", "p@10", "map", "nmi", "ari", "purity"):
        assert m[k] == pytest.approx(1.0), k
    assert sep["classes"] > 10 and sep["clusters"] > 10  # Δ = 50, s ≈ 1


def test_random_labels_score_at_chance() -> None:
    q, _ = two_groups(n=400, seed=1)
    g, _ = two_groups(n=400, seed=2)
    rng = np.random.default_rng(3)
    ql, gl = rng.integers(0, 2, len(q)), rng.integers(0, 2, len(g))
    m, sep = mt.score(q, ql, g, gl)
    check_ranges(m)
    assert abs(m["knn@1"] - 0.5) < 0.1
    assert abs(m["p@10"] - 0.5) < 0.1
    assert abs(m["map"] - 0.5) < 0.1
    assert m["nmi"] < 0.05 and abs(m["ari"]) < 0.05
    assert sep["classes"] < 0.5  # random halves of the same cloud barely separate


def test_retrieval_by_hand() -> None:
    # 1-D gallery at 0, 1, 2, 3, 10 with labels; one query at 0.1 (label 0).
    g = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    gl = np.array([0, 1, 0, 1, 0])
    m = mt.retrieval_metrics(np.array([[0.1]]), np.array([0]), g, gl, k=3)
    assert m["knn@1"] == 1.0
    assert m["p@10"] == pytest.approx(2 / 3)           # top-3 labels 0, 1, 0
    assert m["knn@10"] == 1.0                          # majority 0
    # relevant at ranks 1, 3, 5 -> AP = (1/1 + 2/3 + 3/5) / 3
    assert m["map"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_knn_vote_tie_goes_to_the_nearest_label() -> None:
    g = np.array([[1.0], [2.0], [3.0], [4.0]])
    gl = np.array([1, 0, 0, 1])  # 2 votes each; label 1 is met first
    m = mt.retrieval_metrics(np.array([[0.0]]), np.array([1]), g, gl, k=4)
    assert m["knn@10"] == 1.0
    m = mt.retrieval_metrics(np.array([[0.0]]), np.array([0]), g, gl, k=4)
    assert m["knn@10"] == 0.0


def test_self_match_is_left_out() -> None:
    x, labels = two_groups(n=20)
    labels = labels.copy()
    labels[0] = 1  # an odd one out: only its own copy shares its label locally
    without = mt.retrieval_metrics(x, labels, x, labels, exclude=np.arange(len(x)))
    with_self = mt.retrieval_metrics(x, labels, x, labels)
    assert with_self["knn@1"] == 1.0
    assert without["knn@1"] < 1.0


def test_separation_ratio() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 3))
    b = rng.normal(size=(2000, 3)) + np.array([3.0, 0, 0])
    assert mt.separation(a, b) == pytest.approx(3.0, rel=0.05)
    # Spread off the joining line does not count.
    b[:, 1] *= 100
    b[:, 1] -= b[:, 1].mean() - a[:, 1].mean()  # centroids still differ along x only
    assert mt.separation(a, b) == pytest.approx(3.0, rel=0.05)


def test_pixel_vectors() -> None:
    imgs = np.zeros((2, 64, 64, 3), np.uint8)
    imgs[1, :4, :4] = 255
    full, small = ev.pixel_vectors(imgs, 64), ev.pixel_vectors(imgs, 16)
    assert full.shape == (2, 64 * 64 * 3) and small.shape == (2, 16 * 16 * 3)
    assert full.max() == 1.0
    assert small[1, :3].tolist() == [1.0, 1.0, 1.0]     # the first 4x4 block averaged
    assert small[1, 3:].max() == 0.0


# ------------------------------------------------------------------------------ whitening


def test_whitening_round_trip_and_determinism() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 20)) @ rng.normal(size=(20, 20)) + 5.0
    w = Whitening.fit(x, 8)
    y = w.apply(x)
    assert y.shape == (500, 8)
    assert np.abs(y.mean(0)).max() < 1e-4
    assert np.allclose(np.cov(y, rowvar=False), np.eye(8), atol=1e-3)
    w2 = Whitening.fit(x, 8)
    assert np.array_equal(w.mean, w2.mean) and np.array_equal(w.proj, w2.proj)
    assert w.sha256() == w2.sha256()


def test_unstored_whitened_readout_is_refused() -> None:
    with pytest.raises(ValueError):
        Readout.from_checkpoint("mid+white8", {})
    w = Whitening.fit(np.random.default_rng(0).normal(size=(50, 16)), 8)
    r = Readout.from_checkpoint("mid+white8", {k: v for k, v in
                                               w.to_tensors("readout.mid+white8").items()})
    assert r.label == "mid+white8"


def test_l2_readout_uses_the_same_stored_whitening_and_gives_unit_vectors() -> None:
    rng = np.random.default_rng(0)
    w = Whitening.fit(rng.normal(size=(50, 16)), 8)
    extras = w.to_tensors("readout.mid+white8")
    plain, unit = (Readout.from_checkpoint(lab, extras) for lab in ("mid+white8", "mid+white8+l2"))
    assert unit.label == "mid+white8+l2" and unit.sha256() != plain.sha256()
    feats = {"M.out": torch.from_numpy(rng.normal(size=(5, 16)).astype(np.float32))}
    a, b = plain.vectors(feats), unit.vectors(feats)
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert np.allclose(b, a / np.linalg.norm(a, axis=1, keepdims=True), atol=1e-5)
    assert Readout.from_checkpoint("blocks+l2", {}).label == "blocks+l2"


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained network with another init seed than the random_init baseline (0)."""
    path = tmp_path_factory.mktemp("eval-ckpt") / "tiny.safetensors"
    ckpt.save(ckpt.untrained("tiny", seed=7).model, path, info={"steps": 0}, preset_name="tiny")
    return path


def test_evaluate_on_the_mini_shard(tiny_ckpt: Path, mini_shard: str) -> None:
    settings = ev.EvalSettings(extra=((0.4, 1),), limit_queries=40, limit_gallery=60)
    seen: list[str] = []
    r = ev.evaluate(str(tiny_ckpt), [mini_shard], [mini_shard],
                    settings=settings, progress=lambda stage, d, t: seen.append(stage))
    assert {"checkpoint", "readout", "representations", "separation", "settings",
            "seconds"} <= set(r)
    assert r["readout"] == "mid"
    reps = r["representations"]
    for rep in (*BASELINES, "phi_blocks", "phi_blocks+white64", "phi_mid+white64",
                "random_init_blocks+white64", "phi_s0.4_d1"):
        assert rep in reps, rep
        check_ranges(reps[rep])
        sep = r["separation"][rep]
        assert set(sep) == {"classes", "clusters"}
        assert all(v >= 0 or math.isnan(v) for v in sep.values())
    # Without a readout in the checkpoint, `phi` is the paper's readout.
    assert reps["phi"] == reps["phi_mid_raw"]
    assert r["settings"]["queries"]["count"] == 40 and r["settings"]["gallery"]["count"] == 60
    assert r["settings"]["excluded_self_matches"] == 40       # the same shard on both sides
    assert "gallery" in r["settings"]["whitening"]["phi_blocks+white64"]
    assert r["img_per_s"]["phi_s0.4_d1"] > 0
    assert "score" in seen
    json.dumps(r)  # serializable as is
    assert "| `phi` |" in eval_report.markdown(r)


def test_evaluate_uses_a_stored_whitening(tiny_ckpt: Path, mini_shard: str, tmp_path: Path
                                          ) -> None:
    c = ckpt.load(tiny_ckpt)
    w = Whitening.fit(np.random.default_rng(0).normal(size=(100, 48)), 8)
    path = tmp_path / "white.safetensors"
    ckpt.save(c.model, path, info={"readout": "blocks+white8"}, preset_name="tiny",
              extras=w.to_tensors("readout.blocks+white8"))
    settings = ev.EvalSettings(extra=(), readouts=("mid",), limit_queries=20, limit_gallery=30)
    r = ev.evaluate(str(path), [mini_shard], [mini_shard], settings=settings)
    assert r["readout"] == "blocks+white8"
    assert r["settings"]["whitening"]["phi"] == "stored in the checkpoint"
    assert "gallery" in r["settings"]["whitening"]["random_init"]
    # other σ settings get a whitening of their own vectors (a stored one fits only its setting)
    assert "gallery" in r["settings"]["whitening"]["phi_sigma0"]
    assert r["representations"]["phi"] != r["representations"]["phi_mid_raw"]


def test_cli_eval_json(tiny_ckpt: Path, mini_shard: str, tmp_path: Path) -> None:
    out, md = tmp_path / "eval.json", tmp_path / "eval.md"
    p = run_idx("eval", "--queries", mini_shard, "--gallery", mini_shard, "--checkpoint",
                str(tiny_ckpt), "--limit-queries", "30", "--limit-gallery", "40", "--sigmas",
                "0.4", "--draws", "1", "--readouts", "mid,blocks+white64", "--device", "cpu",
                "--json", "--out", str(out), "--markdown", str(md))   # in this process
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert {"checkpoint", "readout", "representations", "separation"} <= set(r)
    assert set(BASELINES) | {"phi_s0.4_d1", "phi_blocks+white64"} <= set(r["representations"])
    for m in r["representations"].values():
        check_ranges(m)
    assert json.loads(out.read_text())["representations"] == r["representations"]
    assert md.read_text().startswith("# idx eval")


def test_cache_reuses_vectors(tiny_ckpt: Path, mini_shard: str, tmp_path: Path) -> None:
    settings = ev.EvalSettings(extra=(), readouts=("mid",), limit_queries=20, limit_gallery=20,
                               cache_dir=str(tmp_path / "cache"))
    a = ev.evaluate(str(tiny_ckpt), [mini_shard], [mini_shard], settings=settings)
    b = ev.evaluate(str(tiny_ckpt), [mini_shard], [mini_shard], settings=settings)
    assert not any(p["cached"] for p in a["settings"]["passes"].values())
    assert all(p["cached"] for p in b["settings"]["passes"].values())
    assert a["representations"] == b["representations"]
    assert "phi" in b["settings"]["cached_representations"]
    assert "*" in eval_report.markdown(b) and "*" not in eval_report.markdown(a).split("| representation")[1]


@pytest.mark.parametrize("label", ["foo", "mid+", "mid+white", "blocks+pca64", "mid+white0",
                                   "mid+l2+white8", "mid+white8+l2+l2"])
def test_bad_readout_labels(label: str) -> None:
    with pytest.raises(ValueError):
        ev.check_readout(label)
    assert ev.check_readout("blocks+white64") == "blocks+white64"


def test_cli_eval_bad_sigmas(tiny_ckpt: Path, mini_shard: str) -> None:
    p = run_idx("eval", "--queries", mini_shard, "--gallery", mini_shard, "--checkpoint",
                str(tiny_ckpt), "--sigmas", "abc")
    assert p.returncode == 2


def test_embed_images_batches_agree(tiny_ckpt: Path, mini_shard: str) -> None:
    imgs, labels, keys = ev.load_split([mini_shard], limit=10)
    assert imgs.shape == (10, 64, 64, 3) and imgs.dtype == np.uint8
    assert len(labels) == len(keys) == 10
    model = ckpt.load(tiny_ckpt).model
    a = ev.embed_images(model, imgs, 0.2, 2, 0, ("M.out", "E1.out"), batch_size=3)
    b = ev.embed_images(model, imgs, 0.2, 2, 0, ("M.out", "E1.out"), batch_size=10)
    assert set(a) == {"M.out", "E1.out"}
    assert torch.allclose(torch.from_numpy(a["M.out"]), torch.from_numpy(b["M.out"]), atol=1e-5)


def test_fit_readout_stores_several_whitenings_from_one_pass(tiny_ckpt: Path, mini_shard: str,
                                                             tmp_path: Path) -> None:
    path = tmp_path / "fit.safetensors"
    shutil.copy(tiny_ckpt, path)
    shutil.copy(Path(tiny_ckpt).with_suffix(".json"), path.with_suffix(".json"))
    before = ckpt.load(str(path)).sha256
    p = run_idx("fit-readout", "--checkpoint", str(path), "--data", mini_shard, "--dims", "8",
                "--dims", "4", "--l2", "--draws", "1", "--limit", "60")
    assert p.returncode == 0, p.stderr
    c = ckpt.load(str(path))
    assert c.sha256 == before                                   # the weights are untouched
    assert c.info["readout"] == "blocks+white8+l2"
    assert set(c.info["readouts"]) == {"blocks+white8+l2", "blocks+white4+l2"}
    assert c.info["readouts"]["blocks+white4+l2"]["images"] == 60
    w8 = Readout.from_checkpoint("blocks+white8", c.extras).whitening
    w4 = Readout.from_checkpoint("blocks+white4+l2", c.extras).whitening
    # PCA-4 is the first 4 axes of PCA-8 fitted on the same vectors.
    np.testing.assert_allclose(w4.proj, w8.proj[:, :4], rtol=1e-4, atol=1e-5)


def test_sqrt_readout_round_trip_through_fit_readout(tiny_ckpt: Path, mini_shard: str,
                                                     tmp_path: Path) -> None:
    from phisearch.indexer.model.readout import parse_label

    assert parse_label("blocks+sqrt+white64+l2") == ("blocks", 64, True, True)
    assert parse_label("blocks+sqrt+white64+l2").whitening_key == "blocks+sqrt+white64"
    with pytest.raises(ValueError):
        parse_label("blocks+white64+sqrt")
    path = tmp_path / "fit.safetensors"
    shutil.copy(tiny_ckpt, path)
    shutil.copy(Path(tiny_ckpt).with_suffix(".json"), path.with_suffix(".json"))
    p = run_idx("fit-readout", "--checkpoint", str(path), "--data", mini_shard, "--dims", "6",
                "--sqrt", "--l2", "--draws", "1", "--limit", "50")
    assert p.returncode == 0, p.stderr
    c = ckpt.load(str(path))
    assert c.info["readout"] == "blocks+sqrt+white6+l2"
    r = Readout.from_checkpoint("blocks+sqrt+white6+l2", c.extras)
    feats = {t: torch.rand(3, n) for t, n in zip(r.taps, c.model.cfg.widths)}
    raw = Readout("blocks").concat(feats)
    np.testing.assert_allclose(r.concat(feats), np.sqrt(raw), rtol=1e-6)
    v = r.vectors(feats)
    assert v.shape == (3, 6) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_a_protocol_sharing_its_gallery_embeds_only_its_own_queries(
        tiny_ckpt: Path, mini_shard: str, tmp_path: Path) -> None:
    """Queries and gallery are cached apart: validation and test queries against one gallery
    pay for the gallery once, and the vectors are those of a pass over everything."""
    base = dict(extra=(), readouts=("mid",), limit_gallery=40, queries_per_class=1)
    cached = dict(base, cache_dir=str(tmp_path / "cache"))
    val = ev.evaluate(str(tiny_ckpt), [mini_shard], [mini_shard],
                      settings=ev.EvalSettings(queries_skip_per_class=1, **cached))
    files = set((tmp_path / "cache").iterdir())
    test = ev.evaluate(str(tiny_ckpt), [mini_shard], [mini_shard],
                       settings=ev.EvalSettings(**cached))
    new = set((tmp_path / "cache").iterdir()) - files
    # one new file per network pass: the test queries only (the gallery parts were found)
    assert len(new) == len([p for p in test["settings"]["passes"].values()])
    assert test["settings"]["queries"]["count"] == 10 == val["settings"]["queries"]["count"]
    fresh = ev.evaluate(str(tiny_ckpt), [mini_shard], [mini_shard], settings=ev.EvalSettings(**base))
    assert test["representations"] == fresh["representations"]
