"""What a demanding user throws at `idx`: interrupted runs, one shard under three names, files
that are not tars, failing pipes, duplicated keys, out-of-range filters, a built-in checkpoint
as a target, usage mistakes and a URL that is not Qdrant. Each answer: one line, the right exit
code, nothing recorded that was not done, nothing counted that was not stored."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import threading
import time
from pathlib import Path

import webdataset as wds
from conftest import Ran, run_idx
from phisearch.indexer.model import checkpoint as ckpt
from phisearch.indexer.sources.shards import read_shard
from phisearch.indexer.store import LAST_RUN_DOC, SHARDS_DOC, StoreConfig, open_store


def idx(*args: str, cwd: str | None = None) -> Ran:
    """`idx ARGS` in this process (conftest.run_idx): exit code, stdout, stderr as the console
    script gives them (test_cli_core runs the real one)."""
    return run_idx(*args, cwd=cwd)


def build(store: Path, ckpt_path: str, *data: str, cwd: str | None = None) -> Ran:
    args = ["build", "--store", str(store), "--checkpoint", ckpt_path, "--draws", "1",
            "--json", "--device", "cpu"]
    for d in data:
        args += ["--data", d]
    return idx(*args, cwd=cwd)


def error_lines(r: Ran) -> list[str]:
    """stderr without log lines (WARNING/INFO) and progress."""
    return [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]


def test_status_of_an_interrupted_and_of_a_killed_run(tmp_path, tiny_ckpt, mini_shard):
    store = tmp_path / "s"
    r = build(store, tiny_ckpt, "pipe:cat /nonexistent")
    assert r.returncode == 1
    st = idx("status", "--store", str(store))
    assert st.returncode == 0, st.stderr
    assert "last run: 0 indexed" in st.stdout and "1 shards failed" in st.stdout
    # A build killed outright leaves only its start-of-run record.
    with open_store(StoreConfig(path=str(store))) as s:
        s.put_doc(LAST_RUN_DOC, {"pending": [mini_shard], "running_since": time.time()})
    st = idx("status", "--store", str(store))
    assert st.returncode == 0, st.stderr
    assert "did not finish" in st.stdout and "1 shards were pending" in st.stdout


def test_one_shard_under_three_names_is_one_shard(tmp_path, tiny_ckpt, mini_shard):
    folder = tmp_path / "data" / "sub"
    folder.mkdir(parents=True)
    shutil.copy(mini_shard, folder / "m.tar")
    store = tmp_path / "s"
    for data, cwd in (("m.tar", folder), ("../sub/m.tar", folder), (str(folder / "m.tar"), None)):
        r = build(store, tiny_ckpt, data, cwd=str(cwd) if cwd else None)
        assert r.returncode == 0, r.stderr
    st = json.loads(idx("status", "--store", str(store), "--json").stdout)
    assert st["points"] == 100 and st["shards_done"] == 1
    assert list(st["shards"]) == [os.path.realpath(folder / "m.tar")]


def test_records_keyed_by_the_path_as_typed_are_migrated(tmp_path, tiny_ckpt, mini_shard):
    folder = tmp_path / "d"
    folder.mkdir()
    shutil.copy(mini_shard, folder / "m.tar")
    store = tmp_path / "s"
    assert build(store, tiny_ckpt, str(folder / "m.tar")).returncode == 0
    cfg = StoreConfig(path=str(store))
    with open_store(cfg) as s:     # as an older version wrote them: relative, twice
        rec = s.get_doc(SHARDS_DOC)[os.path.realpath(folder / "m.tar")]
        s.put_doc(SHARDS_DOC, {"m.tar": rec, "./m.tar": dict(rec, completed_at=0)})
    r = build(store, tiny_ckpt, "m.tar", cwd=str(folder))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["shards_already_done"] == 1 and out["indexed"] == 0 and out["points"] == 100
    with open_store(cfg) as s:
        assert list(s.get_doc(SHARDS_DOC)) == [os.path.realpath(folder / "m.tar")]


def test_files_that_are_not_tars_and_failing_pipes_are_shard_errors(tmp_path, tiny_ckpt,
                                                                    mini_shard):
    empty, text = tmp_path / "empty.tar", tmp_path / "text.tar"
    empty.write_bytes(b"")
    text.write_text("not a tar at all\n" * 50)
    store = tmp_path / "s"
    r = build(store, tiny_ckpt, str(empty), str(text), "pipe:false")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out["indexed"] == 0 and out["shards_indexed"] == 0
    assert {f["reason"] for f in out["shards_failed"]} == {"empty_shard", "not_a_tar",
                                                          "pipe_failed"}
    assert len(error_lines(r)) == 3 and "Traceback" not in r.stderr
    st = json.loads(idx("status", "--store", str(store), "--json").stdout)
    assert st["shards_done"] == 0 and st["shards_pending"] == 3
    # With a good shard beside a bad one: exit 0, the bad one still not recorded as done.
    r = build(store, tiny_ckpt, str(empty), mini_shard)
    assert r.returncode == 0, r.stderr
    st = json.loads(idx("status", "--store", str(store), "--json").stdout)
    assert st["points"] == 100 and list(st["shards"]) == [os.path.realpath(mini_shard)]


def test_a_key_twice_in_one_tar_counts_once(tmp_path, tiny_ckpt, mini_shard):
    raws = [r for r in read_shard(mini_shard) if isinstance(r, dict)][:10]
    tar = tmp_path / "dup.tar"
    with wds.TarWriter(str(tar)) as w:
        for r in raws + raws[3:4]:
            w.write({k: v for k, v in r.items() if k == "__key__" or not k.startswith("__")})
    r = build(tmp_path / "s", tiny_ckpt, str(tar))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["indexed"] == out["points"] == 10 and out["skipped"] == {"duplicate_key": 1}


def test_out_of_range_integer_filter_is_a_usage_error(tmp_path):
    for flag in ("--label", "--cluster"):
        r = idx("query", "--key", "x", flag, "99999999999999999999", "--store", str(tmp_path))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "out of range" in r.stderr


def test_fit_readout_refuses_to_rewrite_a_builtin(tmp_path, mini_shard):
    shipped = ckpt.resolve("small64")
    before = hashlib.sha256(shipped.read_bytes()).hexdigest()
    r = idx("fit-readout", "--checkpoint", "small64", "--data", mini_shard)
    assert r.returncode == 2 and "--out" in r.stderr
    r = idx("fit-readout", "--checkpoint", "small64", "--data", mini_shard, "--out",
            str(shipped))
    assert r.returncode == 2
    out = tmp_path / "copy.safetensors"
    r = idx("fit-readout", "--checkpoint", "small64", "--data", mini_shard, "--out", str(out),
            "--dims", "8", "--draws", "1", "--limit", "40")
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == before
    assert ckpt.load(out).info["readout"] == "blocks+white8"


def test_usage_errors_exit_2(tmp_path, mini_shard):
    r = idx("build", "--data", mini_shard, "--store", str(tmp_path), "--device", "tpu")
    assert r.returncode == 2 and "unknown device" in r.stderr


class _NotQdrant(http.server.BaseHTTPRequestHandler):
    def do_GET(self):   # noqa: N802 - the stdlib's name
        body = b"<html><body><h1>It works!</h1><p>a web server, not Qdrant</p></body></html>"
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_POST = do_GET  # noqa: N815

    def log_message(self, *a):
        pass


def test_a_url_that_is_not_qdrant_is_one_line():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotQdrant)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        r = idx("status", "--qdrant-url", url)
        assert r.returncode == 1 and r.stderr.count("\n") == 1
        assert "not a Qdrant server" in r.stderr and "<html" not in r.stderr
    finally:
        server.shutdown()
