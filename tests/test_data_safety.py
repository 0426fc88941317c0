"""Data that must never be lost (issue 27, items 1-4): a folder path that cannot be read keeps its
points (offline / unreadable, reported), a shard rewritten while indexed is indexed again, a
changed shard's sweep spares a shard of the same name elsewhere, and a key in two shards of one
dataset is kept from the first and reported."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_folders
import webdataset as wds
from fixtures import read_samples
from phisearch.indexer.cli.status import status_lines
from phisearch.indexer.ingest.pipeline import build, collection_meta, sync_pass
from phisearch.indexer.ingest.summary import status
from phisearch.indexer.model.embedder import Embedder
from phisearch.indexer.store import StoreConfig, open_store, point_id
from test_folders import cfg_for, vectors, write_pngs

pixels = test_folders.pixels   # the fixture: real imagenette images as arrays

# ---------------------------------------------------------------- folders (item 1)


def album_with_drive(tmp_path: Path, pixels) -> tuple[Path, Path]:
    """album/{a0,a1,a2}.png and album/drive -> ext/ (another "disk") holding e0..e2.png."""
    root, ext = tmp_path / "album", tmp_path / "ext"
    write_pngs(root, pixels, ["a0.png", "a1.png", "a2.png"], 0)
    write_pngs(ext, pixels, ["e0.png", "e1.png", "e2.png"], 3)
    os.symlink(ext, root / "drive")
    return root, ext


def drive_ids() -> set[str]:
    return {point_id("album", f"drive/e{i}.png") for i in range(3)}


def test_offline_subfolder_keeps_its_points_and_is_reported(tmp_path, pixels, tiny_ckpt):
    root, ext = album_with_drive(tmp_path, pixels)
    store = tmp_path / "store"
    cfg = cfg_for(store, [root], tiny_ckpt)
    assert build(cfg)["points"] == 6
    before = vectors(store)
    ext.rename(tmp_path / "unplugged")            # the drive goes away: the link dangles
    away = build(cfg)
    assert (away["deleted"], away["points"], away["unchanged"]) == (0, 6, 3)
    assert vectors(store).keys() == before.keys()
    [entry] = away["unavailable"]
    assert (entry["path"], entry["reason"], entry["kept"]) == (str(root / "drive"), "offline", 3)
    assert entry["folder"] == str(root) and "missing" in entry["detail"]
    assert away["folders"][str(root)]["kept"] == 3 and away["skipped"] == {"offline": 1}
    assert json.loads(json.dumps(away))["unavailable"][0]["kept"] == 3   # the --json object
    from phisearch.indexer.cli.build import unavailable_lines

    lines = unavailable_lines(away["unavailable"])
    assert "kept 3 points" in lines[0] and str(root / "drive") in lines[1]
    # idx status (JSON and the lines a person reads) says it too, until the drive is back
    st = status(StoreConfig(path=str(store)))
    assert [(a["path"], a["reason"], a["kept"]) for a in st["unavailable"]] == \
        [(str(root / "drive"), "offline", 3)]
    text = "\n".join(status_lines(st, "here"))
    assert "OFFLINE since" in text and f"{root / 'drive'}" in text and "3 points kept" in text
    (tmp_path / "unplugged").rename(ext)          # plugged in again: nothing to redo
    back = build(cfg)
    assert (back["indexed"], back["deleted"], back["unchanged"], back["unavailable"]) == \
        (0, 0, 6, [])
    assert status(StoreConfig(path=str(store)))["unavailable"] == []
    (root / "drive").unlink()                     # the link itself removed: verifiably gone
    gone = build(cfg)
    assert gone["deleted"] == 3 and gone["points"] == 3
    assert not drive_ids() & vectors(store).keys()


def test_dangling_file_link_keeps_its_point_as_unreadable(tmp_path, pixels, tiny_ckpt):
    root, elsewhere = tmp_path / "album", tmp_path / "elsewhere"
    write_pngs(root, pixels, ["a0.png"], 0)
    write_pngs(elsewhere, pixels, ["photo.png"], 1)
    os.symlink(elsewhere / "photo.png", root / "linked.png")
    cfg = cfg_for(tmp_path / "store", [root], tiny_ckpt)
    assert build(cfg)["points"] == 2
    (elsewhere / "photo.png").unlink()
    again = build(cfg)
    assert (again["deleted"], again["points"]) == (0, 2)
    assert [(a["rel"], a["reason"], a["kept"]) for a in again["unavailable"]] == \
        [("linked.png", "unreadable", 1)]


@contextlib.contextmanager
def unlistable(path: Path) -> Iterator[None]:
    """`path` cannot be listed by this thread: mode 000 and, as root, CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH dropped from this thread's effective capabilities (the kernel then
    refuses root too). A build with workers=0 walks in this thread. Restored afterwards."""

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    hdr, caps = Header(0x20080522, 0), (Data * 2)()   # _LINUX_CAPABILITY_VERSION_3
    saved = None
    os.chmod(path, 0)
    try:
        if os.geteuid() == 0 and libc.capget(ctypes.byref(hdr), caps) == 0:
            saved = [caps[0].effective, caps[1].effective]
            caps[0].effective &= ~((1 << 1) | (1 << 2))   # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.capset(ctypes.byref(hdr), caps) != 0:
                saved = None
        try:
            os.listdir(path)
        except PermissionError:
            pass
        else:
            pytest.skip("cannot make a directory unreadable on this host")
        yield
    finally:
        if saved is not None:
            caps[0].effective, caps[1].effective = saved
            libc.capset(ctypes.byref(hdr), caps)
        os.chmod(path, 0o755)


def test_unlistable_folder_keeps_its_points_and_an_unlistable_root_deletes_nothing(
        tmp_path, pixels, tiny_ckpt):
    root = tmp_path / "album"
    write_pngs(root, pixels, ["a0.png", "locked/l0.png", "locked/l1.png"], 0)
    store = tmp_path / "store"
    cfg = cfg_for(store, [root], tiny_ckpt)
    assert build(cfg)["points"] == 3
    with unlistable(root / "locked"):
        sub = build(cfg)
    assert (sub["deleted"], sub["points"]) == (0, 3)
    assert [(a["rel"], a["reason"], a["kept"]) for a in sub["unavailable"]] == \
        [("locked", "unreadable", 2)]
    with unlistable(root):
        top = build(cfg)
    assert (top["deleted"], top["points"]) == (0, 3)
    assert [(a["path"], a["reason"], a["kept"]) for a in top["unavailable"]] == \
        [(str(root), "unreadable", 3)]


def test_missing_folder_is_offline_when_indexed_before_and_an_error_otherwise(
        tmp_path, pixels, tiny_ckpt):
    root = tmp_path / "album"
    write_pngs(root, pixels, ["a0.png", "sub/a1.png"], 0)
    store = tmp_path / "store"
    cfg = cfg_for(store, [root], tiny_ckpt)
    assert build(cfg)["points"] == 2
    root.rename(tmp_path / "away")                # the whole folder's drive is unplugged
    away = build(cfg)
    assert (away["deleted"], away["points"]) == (0, 2)
    [entry] = away["unavailable"]
    assert (entry["path"], entry["reason"], entry["kept"]) == (str(root), "offline", 2)
    with pytest.raises(FileNotFoundError, match="no such folder or shard file"):
        build(cfg_for(store, [tmp_path / "never-indexed"], tiny_ckpt))
    (tmp_path / "away").rename(root)
    assert build(cfg)["unchanged"] == 2


@contextlib.contextmanager
def tmpfs(path: Path) -> Iterator[None]:
    """A real mount at `path` (a drive), unmounted at the end if the test has not."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "phisearch-test", str(path)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield
    finally:
        if os.path.ismount(path):
            subprocess.run(["umount", "-l", str(path)], check=False)


def test_unmounted_drive_leaves_an_empty_mount_point_and_keeps_its_points(
        tmp_path, pixels, tiny_ckpt):
    root, card = tmp_path / "album", tmp_path / "card"
    write_pngs(root, pixels, ["a0.png"], 0)
    store = tmp_path / "store"
    with tmpfs(root / "camera"), tmpfs(card):
        write_pngs(root / "camera", pixels, ["c0.png", "c1.png"], 1)   # a drive inside
        write_pngs(card, pixels, ["k0.png", "k1.png"], 3)               # a drive as the root
        cfg, card_cfg = cfg_for(store, [root], tiny_ckpt), cfg_for(store, [card], tiny_ckpt)
        assert build(cfg)["points"] == 3 and build(card_cfg)["points"] == 5
        subprocess.run(["umount", str(root / "camera")], check=True)
        subprocess.run(["umount", str(card)], check=True)
        inside, whole = build(cfg), build(card_cfg)   # the mount points are empty folders now
    assert (inside["deleted"], whole["deleted"], whole["points"]) == (0, 0, 5)
    assert [(a["rel"], a["reason"], a["kept"]) for a in inside["unavailable"]] == \
        [("camera", "offline", 2)]
    assert [(a["rel"], a["reason"], a["kept"]) for a in whole["unavailable"]] == \
        [("", "offline", 2)]
    assert "not mounted" in whole["unavailable"][0]["detail"]


def test_watch_sync_of_a_path_under_an_offline_link_deletes_nothing(tmp_path, pixels,
                                                                    tiny_ckpt):
    """What `--watch` does on an event (pipeline.sync_pass with the changed paths), run directly
    so no file-watcher timing is involved."""
    root, ext = album_with_drive(tmp_path, pixels)
    store = tmp_path / "store"
    cfg = cfg_for(store, [root], tiny_ckpt)
    assert build(cfg)["points"] == 6
    shutil.rmtree(ext)
    emb = Embedder.create(tiny_ckpt, cfg.phi, "cpu")
    with open_store(cfg.store) as st:
        out = sync_pass(st, collection_meta(emb), emb, cfg, [], [str(root)],
                        only={str(root): ("drive", "drive/e0.png")})
    assert (out["deleted"], out["points"]) == (0, 6)
    assert {(a["rel"], a["reason"]) for a in out["unavailable"]} == {("drive", "offline")}
    assert drive_ids() <= vectors(store).keys()


def test_index_page_shows_offline_paths(tmp_path, pixels, tiny_ckpt, monkeypatch):
    from streamlit.testing.v1 import AppTest
    from test_ui_apptest import APP, on_page, use_store

    root, ext = album_with_drive(tmp_path, pixels)
    cfg = cfg_for(tmp_path / "store", [root], tiny_ckpt)
    build(cfg)
    shutil.rmtree(ext)
    build(cfg)
    use_store(monkeypatch, cfg.store, hold_s="0")
    at = on_page(AppTest.from_file(APP, default_timeout=180).run(), "index")
    assert not at.exception, [e.value for e in at.exception]
    warning = " ".join(w.value for w in at.warning)
    assert "could not be read" in warning and "3 points are kept" in warning
    table = at.dataframe[0].value
    assert list(table["path"]) == [str(root / "drive")] and list(table["state"]) == ["offline"]


# ---------------------------------------------------------------- shards (items 2-4)


_WRITES = iter(range(1_000_000_000, 2_000_000_000))


def write_shard(path: Path, rows: list[tuple[str, dict[str, bytes]]]) -> str:
    """A shard of (key, {ext: bytes}) rows; its mtime moved on and its members' tar headers
    carry a time no other write has, so a rewrite, even of the same rows, is always a change."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    with wds.TarWriter(str(tmp), mtime=next(_WRITES)) as w:
        for key, parts in rows:
            w.write({"__key__": key, **parts})
    if path.exists():
        st = os.stat(path)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    os.replace(tmp, path)   # a reader that has the old file open goes on reading the old one
    return str(path)


def named(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"name": name}))
    return folder


def shard_cfg(store: Path, data: list[str], ckpt_path: str, **kw):
    return cfg_for(store, data, ckpt_path, batch_size=kw.pop("batch_size", 8), **kw)


def keys_in(store: Path) -> dict[str, str]:
    """key -> the shard_url of its point."""
    with open_store(StoreConfig(path=str(store))) as st:
        return {h.payload["key"]: h.payload["shard_url"] for h in st.scroll()}


def test_shard_rewritten_while_indexed_is_indexed_again(tmp_path, mini_shard, tiny_ckpt):
    rows = read_samples(mini_shard, 10)
    shard = named(tmp_path / "ds", "ds") / "s.tar"
    write_shard(shard, rows[:6])
    store = tmp_path / "store"
    rewritten = []

    def rewrite_once(progress: dict) -> None:   # after the first batch, mid-shard
        if not rewritten:
            rewritten.append(write_shard(shard, rows[6:]))

    first = build(shard_cfg(store, [str(shard)], tiny_ckpt, batch_size=2),
                  on_progress=rewrite_once)
    assert rewritten and first["indexed"] == 6   # the old content, read from the open file
    second = build(shard_cfg(store, [str(shard)], tiny_ckpt, batch_size=2))
    assert (second["shards_changed"], second["indexed"]) == (1, 4)
    assert sorted(keys_in(store)) == sorted(k for k, _ in rows[6:])


def test_a_shard_with_a_new_mtime_and_the_same_bytes_stays_done(tmp_path, mini_shard, tiny_ckpt):
    """A dataset copied or re-provisioned (new mtimes, same bytes) is not re-embedded and its
    points keep what was stored on them; the same size with other bytes is still a change."""
    rows = read_samples(mini_shard, 6)
    shard = named(tmp_path / "ds", "ds") / "s.tar"
    write_shard(shard, rows)
    store = tmp_path / "store"
    cfg = shard_cfg(store, [str(shard)], tiny_ckpt)
    assert build(cfg)["indexed"] == 6
    key = os.path.realpath(shard)
    with open_store(StoreConfig(path=str(store))) as st:
        st.set_payload({h.id: {"cluster": 7} for h in st.scroll()})
        records = st.get_doc("shards")
        assert len(records[key].pop("sha256")) == 64   # as an index built before hashes were kept
        st.put_doc("shards", records)
    assert build(cfg)["shards_already_done"] == 1      # ... which this run backfills
    copy = tmp_path / "copy.tar"
    shutil.copy(shard, copy)                 # a copy: same bytes, a new mtime
    os.replace(copy, shard)
    with open_store(StoreConfig(path=str(store))) as st:
        assert st.get_doc("shards")[key]["fingerprint"] != f"{os.stat(shard).st_size}:" \
            f"{os.stat(shard).st_mtime_ns}"
    again = build(cfg)
    assert (again["indexed"], again["shards_already_done"], again["shards_changed"]) == (0, 1, 0)
    with open_store(StoreConfig(path=str(store))) as st:
        assert [h.payload.get("cluster") for h in st.scroll()] == [7] * 6
        rec = st.get_doc("shards")[key]
    assert rec["fingerprint"] == f"{os.stat(shard).st_size}:{os.stat(shard).st_mtime_ns}"
    size = os.stat(shard).st_size
    write_shard(shard, rows)                 # the same rows, other header bytes: same size
    assert os.stat(shard).st_size == size
    changed = build(cfg)
    assert (changed["indexed"], changed["shards_changed"]) == (6, 1)


def test_changed_shard_keeps_the_points_of_a_shard_with_its_name_elsewhere(
        tmp_path, mini_shard, tiny_ckpt):
    rows = read_samples(mini_shard, 8)
    a = write_shard(named(tmp_path / "a", "same") / "shard-000000.tar", rows[:4])
    b = write_shard(named(tmp_path / "b", "same") / "shard-000000.tar", rows[4:])
    store = tmp_path / "store"
    assert build(shard_cfg(store, [a, b], tiny_ckpt))["points"] == 8
    write_shard(Path(a), rows[:2])                # a loses two samples
    out = build(shard_cfg(store, [a, b], tiny_ckpt))
    assert (out["shards_changed"], out["shards_already_done"], out["points"]) == (1, 1, 6)
    held = keys_in(store)
    assert sorted(held) == sorted(k for k, _ in rows[:2] + rows[4:])
    assert {held[k] for k, _ in rows[4:]} == {b}
    with open_store(StoreConfig(path=str(store))) as st:
        recs = st.get_doc("shards")
    assert recs[a]["deleted"] == 2 and "deleted" not in recs[b]


def test_remove_by_a_shard_name_two_folders_share_asks_for_the_path(tmp_path, mini_shard,
                                                                    tiny_ckpt):
    """`idx remove --shard NAME` matched the file name only, like the sweep of item 3: it took
    both folders' points. A shared name is now refused; a path removes that shard alone."""
    from phisearch.indexer.manage.remove import remove, selection
    from phisearch.indexer.store import StoreError

    rows = read_samples(mini_shard, 8)
    a = write_shard(named(tmp_path / "a", "same") / "shard-000000.tar", rows[:4])
    b = write_shard(named(tmp_path / "b", "same") / "shard-000000.tar", rows[4:])
    store = tmp_path / "store"
    assert build(shard_cfg(store, [a, b], tiny_ckpt))["points"] == 8
    cfg = StoreConfig(path=str(store))
    with pytest.raises(StoreError, match="names 2 shards in different folders"):
        remove(cfg, selection(shard="shard-000000.tar"))
    assert len(keys_in(store)) == 8
    out = remove(cfg, selection(shard=str(tmp_path / "b" / "shard-000000.tar")))
    assert out["deleted"] == 4 and out["records_removed"] == [b]
    assert set(keys_in(store).values()) == {a}
    again = build(shard_cfg(store, [a, b], tiny_ckpt))   # a stays done, b comes back
    assert (again["shards_already_done"], again["points"]) == (1, 8)


def test_key_in_two_shards_is_kept_from_the_first_and_reported(tmp_path, mini_shard,
                                                               tiny_ckpt, caplog):
    rows = read_samples(mini_shard, 8)
    ds = named(tmp_path / "ds", "ds")
    first = write_shard(ds / "s1.tar", rows[:4])
    # s2 repeats s1's last two keys with other images, then has two of its own
    second_rows = [(k, rows[4 + i][1]) for i, (k, _) in enumerate(rows[2:4])] + rows[6:8]
    second = write_shard(ds / "s2.tar", second_rows)
    store = tmp_path / "store"
    cfg = shard_cfg(store, [first, second], tiny_ckpt)
    with caplog.at_level(logging.WARNING):
        out = build(cfg)
    dup_keys = sorted(k for k, _ in rows[2:4])
    assert (out["points"], out["indexed"], out["skipped"]) == (6, 6, {"duplicate_key": 2})
    assert sorted((s["shard"], s["key"]) for s in out["skipped_samples"]) == \
        [(second, k) for k in dup_keys]
    assert all(first in s["detail"] for s in out["skipped_samples"])
    assert sum(second in r.message and first in r.message for r in caplog.records) == 2
    held = keys_in(store)
    assert all(held[k] == first for k in dup_keys)
    with open_store(StoreConfig(path=str(store))) as st:
        rec = st.get_doc("shards")[second]
    assert (rec["indexed"], rec["skipped"], rec["duplicate_of"]) == \
        (2, {"duplicate_key": 2}, {first: 2})
    # reruns never flip it: s2 changed (touched) is redone and still defers; s1 redone is
    # rewriting its own points, no duplicate
    write_shard(Path(second), second_rows)
    again = build(cfg)
    assert (again["shards_changed"], again["skipped"], again["points"]) == \
        (1, {"duplicate_key": 2}, 6)
    write_shard(Path(first), rows[:4])
    own = build(cfg)
    assert (own["shards_changed"], own["skipped"], own["indexed"]) == (1, {}, 4)
    assert all(keys_in(store)[k] == first for k in dup_keys)
    # s1 drops the shared keys: s2, which left them to s1, is redone and now holds them
    write_shard(Path(first), rows[:2])
    dropped = build(cfg)
    assert dropped["shards_changed"] == 1
    assert status(StoreConfig(path=str(store)))["pending"] == [second]
    redo = build(cfg)
    assert (redo["shards_changed"], redo["skipped"], redo["points"]) == (1, {}, 6)
    assert all(keys_in(store)[k] == second for k in dup_keys)
