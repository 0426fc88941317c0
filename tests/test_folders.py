"""Folders as a source for `idx build`: formats, bad files, sync (new / changed / deleted),
--dry-run, --hash, interrupted runs and --watch. Real files in tmp_path made from real imagenette
pixels, a real Edge store, a tiny untrained checkpoint."""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from fixtures import read_samples
from phisearch.indexer.ingest.pipeline import BuildConfig, build
from phisearch.indexer.ingest.summary import status
from phisearch.indexer.ingest.watch import dry_run
from phisearch.indexer.model.config import PhiConfig
from phisearch.indexer.model.embedder import Embedder
from phisearch.indexer.sources import images
from phisearch.indexer.sources.folders import doc_name
from phisearch.indexer.store import StoreConfig, open_store, point_id
from PIL import Image

IDX = [sys.executable, "-m", "phisearch.ui"]
ENV = dict(os.environ, PHISEARCH_NO_PROGRESS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@pytest.fixture(scope="module")
def pixels(mini_shard) -> list[np.ndarray]:
    """Real imagenette images as decoded (H, W, 3) uint8 arrays."""
    out = []
    for _, parts in read_samples(mini_shard, 24):
        img = Image.open(io.BytesIO(parts["jpg"]))
        out.append(np.asarray(img.convert("RGB")))
    return out


def encode(arr: np.ndarray | Image.Image, fmt: str, **kw) -> bytes:
    img = Image.fromarray(arr) if isinstance(arr, np.ndarray) else arr
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def cfg_for(store: Path, data: list, ckpt_path: str, **kw) -> BuildConfig:
    return BuildConfig(data=tuple(str(d) for d in data), store=StoreConfig(path=str(store)),
                       checkpoint=ckpt_path, phi=PhiConfig(sigma=0.2, draws=2, seed=0),
                       batch_size=kw.pop("batch_size", 4), workers=kw.pop("workers", 0),
                       device="cpu", **kw)


def vectors(store: Path) -> dict[str, np.ndarray]:
    with open_store(StoreConfig(path=str(store))) as st:
        return {h.id: np.asarray(h.vector, np.float32) for h in st.scroll(with_vectors=True)}


def phi_of(store: Path, data: bytes) -> np.ndarray:
    """φ of an encoded image with the collection's own settings (as an upload would get)."""
    with open_store(StoreConfig(path=str(store))) as st:
        emb = Embedder.from_meta(st.meta(), "cpu")
    return emb(images.decode(data)[None])[0][0]


def test_folder_formats_and_bad_files(tmp_path, mini_shard, pixels, tiny_ckpt):
    root = tmp_path / "My Photos"
    (root / "nested" / "deeper").mkdir(parents=True)
    real_jpg = read_samples(mini_shard, 1)[0][1]["jpg"]
    gif = Image.fromarray(pixels[4]).convert("P")
    second = Image.fromarray(pixels[5]).convert("P")
    files = {
        "a.jpg": real_jpg,
        "nested/b.png": encode(pixels[1], "PNG"),
        "nested/deeper/c.webp": encode(pixels[2], "WEBP", lossless=True),
        "nested/d.bmp": encode(pixels[3], "BMP"),
        "nested/e.gif": encode(gif, "GIF", save_all=True, append_images=[second], duration=100),
        "nested/deeper/f.tiff": encode(pixels[6], "TIFF"),
        "g.TIF": encode(pixels[7], "TIFF"),
        "corrupt.jpg": real_jpg[:4] + bytes(np.random.default_rng(0).integers(0, 256, 2000,
                                                                            np.uint8)),
        "empty.png": b"",
        "text.jpg": b"this is not an image, just some text\n" * 4,
        "notes.txt": b"not an image name: ignored, not counted",
        ".hidden/h.jpg": real_jpg,
    }
    # a camera held sideways: pixels stored rotated, EXIF orientation 6 turns them upright
    exif = Image.Exif()
    exif[0x0112] = 6
    files["nested/rot.jpg"] = encode(Image.fromarray(pixels[8]).transpose(
        Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    os.symlink("..", root / "nested" / "deeper" / "loop")   # deeper/loop -> nested: a cycle
    store = tmp_path / "store"
    summary = build(cfg_for(store, [mini_shard, root], tiny_ckpt))
    good = ["a.jpg", "g.TIF", "nested/b.png", "nested/d.bmp", "nested/deeper/c.webp",
            "nested/deeper/f.tiff", "nested/e.gif", "nested/rot.jpg"]
    assert summary["indexed"] == 100 + len(good)
    assert summary["skipped"] == {"corrupt_image": 1, "empty": 1, "not_an_image": 1,
                                  "symlink_loop": 1}
    by_key = {(s["key"], s["reason"]) for s in summary["skipped_samples"]}
    assert by_key == {("corrupt.jpg", "corrupt_image"), ("empty.png", "empty"),
                      ("text.jpg", "not_an_image"), ("nested/deeper/loop", "symlink_loop")}
    f = summary["folders"][str(root.resolve())]
    assert (f["new"], f["changed"], f["deleted"], f["unchanged"]) == (len(good) + 3, 0, 0, 0)
    assert f["dataset"] == "My Photos" and f["complete"] and summary["shards_indexed"] == 1
    assert summary["points"] == 100 + len(good)
    with open_store(StoreConfig(path=str(store))) as st:
        hits = list(st.scroll({"dataset": "My Photos"}, with_vectors=True))
        assert sorted(h.payload["key"] for h in hits) == good
        for h in hits:
            p = h.payload
            assert h.id == point_id("My Photos", p["key"])
            assert p["label"] is None and p["split"] is None and p["label_name"] is None
            assert p["shard"] == "My Photos" and p["shard_url"] == str(root.resolve())
            assert p["path"] == str(root.resolve() / p["key"]) and p["thumb"]
        assert st.count({"dataset": "imagenette-64"}) == 100
    vec = {h.payload["key"]: np.asarray(h.vector, np.float32) for h in hits}
    # lossless formats: the stored φ is exactly the φ of the same pixels sent as a PNG
    for rel, i in (("nested/b.png", 1), ("nested/deeper/c.webp", 2), ("nested/d.bmp", 3),
                   ("nested/deeper/f.tiff", 6), ("g.TIF", 7)):
        assert np.array_equal(vec[rel], phi_of(store, encode(pixels[i], "PNG"))), rel
    # a GIF is indexed by its first frame
    first = encode(Image.open(io.BytesIO(files["nested/e.gif"])).convert("RGB"), "PNG")
    assert np.array_equal(vec["nested/e.gif"], phi_of(store, first))
    assert not np.array_equal(vec["nested/e.gif"], phi_of(store, encode(second.convert("RGB"),
                                                                          "PNG")))
    # the rotated JPEG is stored upright: nearer its upright pixels than its stored orientation
    upright = phi_of(store, encode(pixels[8], "PNG"))
    sideways = phi_of(store, encode(np.asarray(Image.fromarray(pixels[8]).transpose(
        Image.Transpose.ROTATE_90)), "PNG"))
    d = vec["nested/rot.jpg"]
    assert np.linalg.norm(d - upright) < np.linalg.norm(d - sideways)
    st = status(StoreConfig(path=str(store)))
    assert st["folders"][str(root.resolve())]["files"] == len(good)
    assert st["skipped"] == {"corrupt_image": 1, "empty": 1, "not_an_image": 1}


def test_exif_rotated_jpeg_and_png_of_its_pixels_get_identical_phi(tmp_path, pixels, tiny_ckpt):
    upright = Image.fromarray(pixels[0]).resize((96, 64), Image.Resampling.BICUBIC)  # not square
    exif = Image.Exif()
    exif[0x0112] = 6   # rotate 90° clockwise to display
    jpg = encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=100,
                 exif=exif.tobytes())
    raw = Image.open(io.BytesIO(jpg))
    raw.load()
    assert raw.size == (64, 96)   # stored sideways
    root = tmp_path / "cam"
    root.mkdir()
    (root / "IMG_0001.jpg").write_bytes(jpg)
    # exactly the JPEG's decoded pixels, turned upright by hand
    (root / "IMG_0001.png").write_bytes(encode(raw.transpose(Image.Transpose.ROTATE_270), "PNG"))
    store = tmp_path / "store"
    assert build(cfg_for(store, [root], tiny_ckpt))["indexed"] == 2
    v = vectors(store)
    a, b = v[point_id("cam", "IMG_0001.jpg")], v[point_id("cam", "IMG_0001.png")]
    assert np.array_equal(a, b)
    # and a query with the file itself finds both at distance 0 (upload path = index path)
    query = phi_of(store, jpg)
    with open_store(StoreConfig(path=str(store))) as st:
        hits = st.search(query, limit=2)
    assert {h.payload["key"] for h in hits} == {"IMG_0001.jpg", "IMG_0001.png"}
    assert max(h.distance for h in hits) < 1e-5


def write_pngs(root: Path, pixels: list[np.ndarray], names: list[str], offset: int) -> None:
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(encode(pixels[offset + i], "PNG"))


def test_sync_add_modify_delete_and_dry_run(tmp_path, pixels, tiny_ckpt):
    root = tmp_path / "album"
    names = [f"{'sub/' if i % 3 == 0 else ''}img{i:02d}.png" for i in range(10)]
    write_pngs(root, pixels, names, 0)
    store = tmp_path / "store"
    cfg = cfg_for(store, [root], tiny_ckpt)
    first = build(cfg)
    assert (first["indexed"], first["new"], first["points"]) == (10, 10, 10)
    before = vectors(store)
    ids = {n: point_id("album", n) for n in names}
    # add 3, modify 2, delete 4
    added = ["new0.png", "sub/new1.png", "deep/er/new2.png"]
    write_pngs(root, pixels, added, 10)
    modified, deleted = names[:2], names[2:6]
    unchanged = names[6:]
    for i, n in enumerate(modified):
        (root / n).write_bytes(encode(pixels[20 + i], "PNG"))
        st = os.stat(root / n)   # a distinct mtime even on a coarse-clock filesystem
        os.utime(root / n, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    for n in deleted:
        (root / n).unlink()
    docs = store / "phisearch" / "docs"
    doc_before = (docs / f"{doc_name(str(root.resolve()))}.json").read_bytes()
    r = subprocess.run(IDX + ["build", "--data", str(root), "--store", str(store), "--dry-run",
                              "--json"], env=ENV, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert (plan["new"], plan["changed"], plan["deleted"], plan["unchanged"]) == (3, 2, 4, 4)
    assert plan["dry_run"] is True and plan["points"] == 10
    assert vectors(store).keys() == before.keys()   # nothing changed
    assert (docs / f"{doc_name(str(root.resolve()))}.json").read_bytes() == doc_before
    second = build(cfg)
    assert (second["new"], second["changed"], second["deleted"], second["unchanged"]) == \
        (3, 2, 4, 4)
    assert second["indexed"] == 5 and second["points"] == 10 + 3 - 4
    after = vectors(store)
    assert set(after) == {ids[n] for n in modified + unchanged} | {point_id("album", n)
                                                                     for n in added}
    for n in unchanged:
        assert np.array_equal(after[ids[n]], before[ids[n]])
    for i, n in enumerate(modified):
        assert not np.array_equal(after[ids[n]], before[ids[n]])
        assert np.array_equal(after[ids[n]], phi_of(store, encode(pixels[20 + i], "PNG")))
    for n in deleted:
        assert ids[n] not in after
    third = build(cfg)   # in sync: nothing to do
    assert (third["indexed"], third["new"], third["changed"], third["deleted"],
            third["unchanged"]) == (0, 0, 0, 0, 9)
    # --hash: a touched file with the same bytes is not a change (the first --hash run records
    # the hashes, so it re-indexes once, with identical vectors)
    hashed = cfg_for(store, [root], tiny_ckpt, hash_files=True)
    assert build(hashed)["changed"] == 9
    assert all(np.array_equal(v, after[k]) for k, v in vectors(store).items())
    st = os.stat(root / unchanged[0])
    os.utime(root / unchanged[0], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert dry_run(cfg)["changed"] == 1
    assert (dry_run(hashed)["changed"], dry_run(hashed)["unchanged"]) == (0, 9)


def test_interrupted_sync_keeps_finished_files(tmp_path, pixels, tiny_ckpt):
    root = tmp_path / "pics"
    names = [f"p{i:02d}.png" for i in range(10)]
    write_pngs(root, pixels, names, 0)
    store = tmp_path / "store"
    cfg = cfg_for(store, [root], tiny_ckpt, batch_size=3)
    stop = threading.Event()
    with pytest.raises(KeyboardInterrupt):
        build(cfg, on_progress=lambda p: stop.set(), stop=stop)   # stop after the first batch
    doc = json.loads((store / "phisearch" / "docs" /
                      f"{doc_name(str(root.resolve()))}.json").read_text())
    assert sorted(doc["files"]) == names[:3]
    assert len(vectors(store)) == 3
    rest = build(cfg)
    assert (rest["new"], rest["unchanged"], rest["indexed"], rest["points"]) == (7, 3, 7, 10)


def test_a_large_folder_starts_indexing_without_a_prescan(tmp_path, mini_shard, tiny_ckpt,
                                                          monkeypatch):
    """10,000 files in 100 folders. The first batch is embedded before the walk has listed the
    tree (no pre-scan: order, not seconds); with two loader workers (each walks the tree and
    decodes its share), a stop at the first batch records exactly that batch."""
    root = tmp_path / "big"
    jpgs = [parts["jpg"] for _, parts in read_samples(mini_shard, 20)]
    for d in range(100):
        (root / f"d{d:03d}").mkdir(parents=True)
        for i in range(100):
            (root / f"d{d:03d}" / f"{i:03d}.jpg").write_bytes(jpgs[(d + i) % 20])
    # in-process (workers=0), so the walk's directory listings are counted as they happen
    listed: list[str] = []
    at_first: list[int] = []
    real_scandir = os.scandir

    def counting(path="."):
        if str(path).startswith(str(root)):
            listed.append(str(path))
        return real_scandir(path)

    stop = threading.Event()

    def on_first(p: dict) -> None:
        at_first.append(len(listed))
        stop.set()

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(os, "scandir", counting)
        build(cfg_for(tmp_path / "lazy", [root], tiny_ckpt, batch_size=16), on_progress=on_first,
              stop=stop)
    assert 1 <= at_first[0] < 101, at_first   # a pre-scan lists all 101 directories first

    store = tmp_path / "store"
    cfg = cfg_for(store, [root], tiny_ckpt, batch_size=16, workers=2)
    stop = threading.Event()
    with pytest.raises(KeyboardInterrupt):
        build(cfg, on_progress=lambda p: stop.set(), stop=stop)
    doc = json.loads((store / "phisearch" / "docs" /
                      f"{doc_name(str(root.resolve()))}.json").read_text())
    assert len(doc["files"]) == 16 and len(vectors(store)) == 16
    plan = dry_run(cfg)
    assert (plan["new"], plan["unchanged"], plan["deleted"]) == (10_000 - 16, 16, 0)


def test_dataset_names_of_two_folders_must_differ(tmp_path, pixels, tiny_ckpt):
    a, b = tmp_path / "x" / "photos", tmp_path / "y" / "photos"
    write_pngs(a, pixels, ["1.png"], 0)
    write_pngs(b, pixels, ["1.png"], 1)
    store = tmp_path / "store"
    build(cfg_for(store, [a], tiny_ckpt))
    with pytest.raises(ValueError, match="already used by folder"):
        build(cfg_for(store, [b], tiny_ckpt))
    assert build(cfg_for(store, [b], tiny_ckpt, dataset="photos-y"))["indexed"] == 1
    with pytest.raises(ValueError, match="was indexed as dataset 'photos'"):
        build(cfg_for(store, [a], tiny_ckpt, dataset="other"))


def test_large_jpeg_is_drafted_but_close_to_a_full_decode(pixels):
    big = Image.fromarray(pixels[0]).resize((2400, 1800), Image.Resampling.BICUBIC)
    data = encode(big, "JPEG", quality=95)
    fast = images.decode(data)
    full = Image.open(io.BytesIO(data))
    full.load()   # no draft: every pixel decoded
    ref = images.from_pil(full)
    assert fast.shape == ref.shape == (64, 64, 3)
    assert np.abs(fast.astype(int) - ref.astype(int)).mean() < 2.0


class Lines:
    """A subprocess's stdout lines, read in a thread so the test can wait with a deadline."""

    def __init__(self, proc: subprocess.Popen):
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.q.put(line)

    def next_json(self, timeout: float) -> dict:
        return json.loads(self.q.get(timeout=timeout))


def test_watch_indexes_new_files_and_deletes_gone_ones(tmp_path, pixels, tiny_ckpt):
    root = tmp_path / "watched"
    write_pngs(root, pixels, ["keep.png", "gone.png"], 0)
    store = tmp_path / "store"
    proc = subprocess.Popen(IDX + ["build", "--data", str(root), "--store", str(store),
                                   "--checkpoint", tiny_ckpt, "--draws", "2", "--workers", "0",
                                   "--device", "cpu", "--watch", "--json"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = Lines(proc)
        initial = lines.next_json(timeout=120)
        assert (initial["new"], initial["indexed"], initial["points"]) == (2, 2, 2)
        (root / "sub").mkdir()
        (root / "sub" / "fresh.png").write_bytes(encode(pixels[5], "PNG"))
        (root / "gone.png").unlink()
        seen = {"new": 0, "deleted": 0}
        while seen["new"] < 1 or seen["deleted"] < 1:   # the timeout only bounds a failure
            s = lines.next_json(timeout=120)
            seen["new"] += s["new"]
            seen["deleted"] += s["deleted"]
        assert seen == {"new": 1, "deleted": 1} and s["points"] == 2
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "stopped watching" in err and "Traceback" not in err
    v = vectors(store)
    assert set(v) == {point_id("watched", "keep.png"), point_id("watched", "sub/fresh.png")}
    assert np.array_equal(v[point_id("watched", "sub/fresh.png")],
                          phi_of(store, encode(pixels[5], "PNG")))
    # the record is complete: a plain sync afterwards has nothing to do
    again = build(cfg_for(store, [root], tiny_ckpt))
    assert (again["indexed"], again["unchanged"], again["deleted"]) == (0, 2, 0)


def test_unchanged_files_are_not_opened(tmp_path, pixels, tiny_ckpt, monkeypatch):
    """Size and mtime decide (README): a resync reads no unchanged file, only the touched one;
    with --hash every file is read (that is what hashing costs)."""
    from phisearch.indexer.sources import folders

    root = tmp_path / "album"
    names = [f"img{i:02d}.png" for i in range(6)]
    write_pngs(root, pixels, names, 0)
    store = tmp_path / "store"
    assert build(cfg_for(store, [root], tiny_ckpt))["new"] == 6
    reads: list[str] = []
    real = folders.read_file
    monkeypatch.setattr(folders, "read_file", lambda p: reads.append(p) or real(p))
    again = build(cfg_for(store, [root], tiny_ckpt))   # workers=0: the scan runs in-process
    assert again["unchanged"] == 6 and reads == []
    st = os.stat(root / names[0])
    os.utime(root / names[0], ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    touched = build(cfg_for(store, [root], tiny_ckpt))
    assert touched["changed"] == 1 and [os.path.basename(p) for p in reads] == [names[0]]
    reads.clear()
    hashed = build(cfg_for(store, [root], tiny_ckpt, hash_files=True))
    assert len(reads) == 6 and hashed["indexed"] == 6   # first hashed sync: no hashes stored yet
