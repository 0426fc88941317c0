"""What a user meets in the terminal (issue 17, "Terminal"): folder hits with their path, a
readable `idx status`, `idx eval` without the sweep by default, filters that say why they match
nothing, whole option names at 80 columns, and the smaller fixes. The real CLI (in-process
through ui.cli.main, or the console script as a subprocess) on real Edge stores."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from conftest import run_idx
from fixtures import bomb_png, read_samples
from phisearch.indexer.ingest.pipeline import BuildConfig, build
from phisearch.indexer.model.config import PhiConfig
from phisearch.indexer.sources import images
from phisearch.indexer.store import CLUSTERS_DOC, LAST_RUN_DOC, StoreConfig, open_store
from phisearch.ui import cli

IDX = [sys.executable, "-m", "phisearch.ui"]
ENV = dict(os.environ, PHISEARCH_NO_PROGRESS="1", OMP_NUM_THREADS="1")


def run(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """The real command in a subprocess (what main() does before Typer: --debug, exit codes)."""
    return subprocess.run([*IDX, *args], capture_output=True, text=True, env=env or ENV,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def idx(monkeypatch, capsys):
    """`idx ARGS` in this process through cli.main (no interpreter start-up): (exit code,
    stdout, stderr)."""
    monkeypatch.setenv("PHISEARCH_NO_PROGRESS", "1")

    def call(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["idx", *args])
        code = 0
        try:
            cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return call


@pytest.fixture(scope="module")
def folder_store(tmp_path_factory, mini_store: Path, mini_shard: str, tiny_ckpt: str
                 ) -> tuple[Path, Path]:
    """The mini store plus a folder of 4 images from the mini shard and 2 files that are not
    images (one empty, one text): (store root, folder)."""
    base = tmp_path_factory.mktemp("terminal")
    root = base / "store"
    shutil.copytree(mini_store, root)
    folder = base / "pics"
    folder.mkdir()
    for key, parts in read_samples(mini_shard, 4):
        ext = next(e for e in parts if e in ("jpg", "jpeg", "png", "webp"))
        (folder / f"{key}.{ext}").write_bytes(parts[ext])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image\n")
    build(BuildConfig(data=(str(folder),), store=StoreConfig(path=str(root)),
                      checkpoint=tiny_ckpt, phi=PhiConfig(sigma=0.2, draws=2, seed=0),
                      batch_size=50, workers=0, device="cpu"))
    return root, folder


def copy_store(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- query


def test_folder_hits_carry_their_path_and_unlabelled_hits_no_none(idx, folder_store):
    root, folder = folder_store
    image = sorted(folder.glob("ILSVRC*"))[0]
    code, out, err = idx("query", str(image), "-k", "5", "--store", str(root), "--json")
    assert code == 0, err
    hits = json.loads(out)["hits"]
    assert all("path" in h for h in hits)
    own = hits[0]
    assert own["distance"] < 1e-3 and own["path"] == str(image) and Path(own["path"]).is_file()
    assert own["label"] is None and own["dataset"] == "pics"
    assert any(h["path"] is None and h["label"] is not None for h in hits)   # shard samples
    code, out, err = idx("query", str(image), "-k", "5", "--store", str(root))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[2] == image.name and lines[0].endswith(str(image))
    assert "None" not in out and "label=" not in lines[0]
    assert any(re.search(r"label=\d+ \(\w", ln) for ln in lines[1:])


def test_search_hits_carry_their_path(folder_store):
    from fastapi.testclient import TestClient
    from phisearch.search.serve import create_app

    root, folder = folder_store
    image = sorted(folder.glob("ILSVRC*"))[1]
    app = create_app(StoreConfig(path=str(root)), warm=False)
    with TestClient(app) as client:
        r = client.post("/search", params={"k": 3}, content=image.read_bytes())
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert hits[0]["path"] == str(image) and all("path" in h for h in hits)


def test_a_directory_as_the_query_image_says_so(idx, folder_store):
    root, folder = folder_store
    code, out, err = idx("query", str(folder), "--store", str(root))
    assert code == 1 and out == ""
    assert err.strip() == (f"error: {folder} is a directory: give one image file (to index a "
                           f"folder, idx build --data {folder})")


def test_filters_that_cannot_match_say_why(idx, mini_store):
    key = "--key", "ILSVRC2012_val_00009111"
    store = "--store", str(mini_store)
    code, out, err = idx("query", *key, *store, "--cluster", "0")
    assert code == 0, err
    assert out.strip() == ("no hits: cluster 0 cannot match: the collection is not clustered "
                           "yet (run `idx cluster`)")
    code, out, err = idx("query", *key, *store, "--label", "99", "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["hits"] == [] and got["query"]["filter"] == {"label": 99}
    assert got["why_empty"] == "label 99 cannot match: no point in the collection has it"
    with open_store(StoreConfig(path=str(mini_store))) as st:
        pid = next(st.scroll({"label": 3})).id
    code, out, err = idx("query", "--id", pid, *store, "--label", "3", "--dataset", "nope")
    assert code == 0, err
    assert out.strip() == "no hits: dataset 'nope' cannot match: no point in the collection has it"


def test_filters_on_a_clustered_store_say_which_clusters_exist(idx, mini_store, tmp_path):
    root = copy_store(mini_store, tmp_path)
    code, _, err = idx("cluster", "--method", "kmeans", "--k", "3", "--preprocess", "raw",
                       "--store", str(root))
    assert code == 0, err
    code, out, _ = idx("query", "--key", "ILSVRC2012_val_00009111", "--store", str(root),
                       "--cluster", "7")
    assert out.strip() == ("no hits: cluster 7 cannot match: the last `idx cluster` made "
                           "clusters 0..2 and -1 (noise)")
    with open_store(StoreConfig(path=str(root))) as st:   # a label missing from a cluster
        apart = [(lab, c) for lab in range(10) for c in range(3)
                 if not st.count({"label": lab, "cluster_id": c})]
    assert apart, "100 points in 3 clusters: some label is absent from some cluster"
    label, other = apart[0]
    code, out, _ = idx("query", "--key", "ILSVRC2012_val_00009111", "--store", str(root),
                       "--label", str(label), "--cluster", str(other))
    assert out.strip() == f"no hits: no point has label {label} and cluster {other} together"


# ----------------------------------------------------------------------------- status


def test_status_in_words(idx, folder_store, tmp_path):
    root = copy_store(folder_store[0], tmp_path)
    folder = folder_store[1]
    pending = "/data/imagenette-train-000007.tar"
    with open_store(StoreConfig(path=str(root))) as st:
        last = st.get_doc(LAST_RUN_DOC)
        st.put_doc(LAST_RUN_DOC, dict(last, interrupted=True, pending=[pending]))
        sha = st.meta()["model_sha256"]
    code, _, err = idx("alias", "set", "live", "phisearch", "--store", str(root))
    assert code == 0, err
    code, out, err = idx("status", "--store", str(root), "--collection", "live")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"collection live (alias of phisearch) in store {root} (edge)"
    assert lines[1] == "points: 104"
    assert lines[2].startswith(f"model {sha[:12]} (") and sha not in out
    assert lines[3] == "shards: 1 done, 1 pending"
    assert lines[4] == ("  pending (the last run was interrupted; rerun the same idx build to "
                        "resume): imagenette-train-000007.tar")
    assert lines[5] == "folders:"
    assert lines[6].startswith(f"  {folder} (dataset pics): 4 files indexed, 2 skipped: ")
    for words in ("1 empty file (empty)", "1 not an image (unrecognized format) (not_an_image)"):
        assert words in lines[6]
    assert "skipped, all sources: 2 skipped: " in out and "interrupted (1 shards pending" in out
    code, out, err = idx("status", "--store", str(root), "--json")
    st = json.loads(out)
    assert st["shards_pending"] == 1 and st["pending"] == [pending]
    assert st["skipped"] == {"empty": 1, "not_an_image": 1}
    assert st["resolved_collection"] == "phisearch"


def test_a_wrong_collection_lists_the_known_ones(idx, mini_store, tmp_path):
    root = copy_store(mini_store, tmp_path)
    assert idx("alias", "set", "live", "phisearch", "--store", str(root))[0] == 0
    for cmd in (("status",), ("query", "--key", "x"), ("snapshot", "list")):
        code, out, err = idx(*cmd, "--store", str(root), "--collection", "phisearh")
        assert code == 1 and out == "", cmd
        assert err.startswith(f"error: no collection phisearh in store {root} (known: "
                              "phisearch; aliases: live -> phisearch)"), (cmd, err)
        assert err.count("\n") == 1


def test_snapshot_list_of_a_missing_store_is_an_error(idx, tmp_path):
    missing = tmp_path / "typo"
    code, out, err = idx("snapshot", "list", "--store", str(missing))
    assert code == 1 and out == ""
    assert err.strip() == (f"error: no collection phisearch in store {missing} (no such "
                           "folder): no snapshots either")
    code, _, err = idx("status", "--store", str(missing))
    assert code == 1 and "(no such folder)" in err
    assert not missing.exists()   # reading commands create nothing


# ----------------------------------------------------------------------------- eval


def test_eval_runs_the_baselines_only_and_warns_of_a_small_gallery(idx, tiny_ckpt, mini_shard):
    args = ("eval", "--queries", mini_shard, "--gallery", mini_shard, "--checkpoint", tiny_ckpt,
            "--readouts", "mid,mid+white64", "--device", "cpu", "--limit-queries", "20", "--json")
    code, out, err = idx(*args, "--limit-gallery", "30")
    assert code == 0, err
    r = json.loads(out)
    assert r["settings"]["extra"] == []
    assert not [rep for rep in r["representations"] if rep.startswith("phi_s0.")]
    assert {"phi", "phi_sigma0", "pixels", "pixels16", "random_init"} <= set(r["representations"])
    assert sorted(r["settings"]["passes"]) == ["phi@s0.2_d4", "phi@s0_d1", "random_init@s0.2_d4"]
    assert r["warnings"] == [
        "the gallery has 30 images, too few for a whitening to K=64 (N <= K): the scores of "
        "phi_mid+white64, random_init_mid+white64, pixels16+white64 are meaningless; use a "
        "gallery of well over 64 images (--gallery, --limit-gallery)"]
    assert f"warning: {r['warnings'][0]}" in err
    code, out, err = idx(*args, "--limit-gallery", "100", "--sweep", "--sigmas", "0.4",
                         "--draws", "1")
    assert code == 0, err
    r = json.loads(out)
    assert r["warnings"] == [] and "warning:" not in err
    assert "phi_s0.4_d1" in r["representations"] and r["settings"]["extra"] == [[0.4, 1]]


# ----------------------------------------------------------------------------- manage


def test_unknown_filter_keys_are_usage_errors(idx, mini_store, tmp_path):
    root = copy_store(mini_store, tmp_path)
    code, out, err = idx("remove", "--filter", '{"lable": 3}', "--yes", "--store", str(root))
    assert code == 2 and out == ""
    assert err.startswith("error: --filter: unknown payload key(s) lable (keys: dataset, ")
    assert " label, " in err and err.count("\n") == 1
    with open_store(StoreConfig(path=str(root))) as st:
        assert st.count() == 100


def test_payload_keys_cover_what_a_build_stores(folder_store):
    from phisearch.indexer.store.base import PAYLOAD_KEYS

    with open_store(StoreConfig(path=str(folder_store[0]))) as st:
        keys = {k for h in st.scroll() for k in h.payload}
    assert keys <= set(PAYLOAD_KEYS) and "path" in keys


def test_kmeans_with_more_clusters_than_points_is_refused(idx, mini_store, tmp_path):
    root = copy_store(mini_store, tmp_path)
    code, out, err = idx("cluster", "--method", "kmeans", "--k", "500", "--store", str(root))
    assert code == 1 and out == ""
    assert err.strip() == (f"error: k-means cannot make 500 clusters of the 100 points in store "
                           f"{root} collection phisearch: k must be at most 100")
    with open_store(StoreConfig(path=str(root))) as st:
        assert st.get_doc(CLUSTERS_DOC) is None and st.count({"cluster_id": 0}) == 0
    code, _, err = idx("cluster", "--method", "kmeans", "--k", "100", "--preprocess", "raw",
                       "--store", str(root))
    assert code == 0, err


def test_alias_delete_json_and_named_snapshots(idx, mini_store, tmp_path):
    root = copy_store(mini_store, tmp_path)
    store = ("--store", str(root))
    assert idx("alias", "set", "live", "phisearch", *store)[0] == 0
    code, out, err = idx("alias", "delete", "live", *store, "--json")
    assert code == 0, err
    assert json.loads(out) == {"alias": "live", "deleted": True, "collection": "phisearch"}
    code, out, err = idx("snapshot", "create", "before-upgrade", *store, "--json")
    assert code == 0, err
    assert json.loads(out)["name"] == "before-upgrade"
    code, out, _ = idx("snapshot", "list", *store, "--json")
    assert [s["name"] for s in json.loads(out)["snapshots"]] == ["before-upgrade"]
    code, _, err = idx("snapshot", "create", "before-upgrade", *store)
    assert code == 1 and "exists already" in err
    code, _, err = idx("snapshot", "create", "../escape", *store)
    assert code == 1 and "invalid snapshot name" in err
    code, out, err = idx("snapshot", "restore", "before-upgrade", "--yes", *store, "--json")
    assert code == 0 and json.loads(out)["points"] == 100, err


def test_the_alias_help_example_works_as_printed(idx, tiny_ckpt, mini_shard, tmp_path,
                                                  monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = idx("alias", "set", "--help")
    printed = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("idx ")]
    assert len(printed) == 4 and [p.split()[1] for p in printed] == ["build", "alias"] * 2
    root = tmp_path / "store"
    for line in printed:   # the printed lines, with this machine's data, model and store
        args = line.split()[1:]
        args = [mini_shard if a == "~/Pictures" else tiny_ckpt if a == "new.safetensors" else a
                for a in args]
        if args[0] == "build":
            args += ["--workers", "0", "--draws", "1", "--device", "cpu"]
            if "--checkpoint" not in args:
                args += ["--checkpoint", tiny_ckpt]
        code, _, err = idx(*args, "--store", str(root))
        assert code == 0, (line, err)
    code, out, _ = idx("status", "--store", str(root), "--collection", "photos")
    assert out.splitlines()[0] == f"collection photos (alias of photos-v2) in store {root} (edge)"


# ----------------------------------------------------------------------------- help


def _commands(group, prefix: tuple[str, ...] = ()):
    """(path, command) of every leaf command under a (Typer's own click) group."""
    ctx = type(group).context_class(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if hasattr(cmd, "list_commands"):
            yield from _commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


def test_help_at_80_columns_shows_whole_option_names(idx, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    commands = list(_commands(typer.main.get_command(cli.app)))
    assert len(commands) >= 20
    for path, cmd in commands:
        code, out, err = idx(*path, "--help")
        assert code == 0, (path, err)
        assert "…" not in out and "<bool>" not in out, path
        for param in cmd.params:
            for opt in param.opts + param.secondary_opts:
                if opt.startswith("--"):
                    assert re.search(rf"(^|[\s,/]){re.escape(opt)}([\s,=/]|$)", out, re.M), \
                        (path, opt)
        assert "Over 80 lines because" not in out, path   # a note for readers of the code


def test_train_help_in_an_80_column_terminal():
    r = run("train", "--help", env=dict(ENV, COLUMNS="80"))
    assert r.returncode == 0, r.stderr
    for opt in ("--halve-every-epochs", "--save-every-minutes", "--eval-every-minutes",
                "--compile / --no-compile", "--resident / --no-resident"):
        assert opt in r.stdout, opt
    assert "<bool>" not in r.stdout and "…" not in r.stdout


# ----------------------------------------------------------------------------- smaller ones


def test_debug_is_accepted_after_the_subcommand(tmp_path):
    missing = ("--store", str(tmp_path / "none"))
    r = run_idx("status", *missing, "--debug")      # main() in this process: conftest.run_idx
    assert r.returncode == 1 and "Traceback" in r.stderr and "No such option" not in r.stderr
    r = run_idx("status", *missing)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert cli.hoist_global_flags(["query", "x.jpg", "--debug", "--", "--debug"]) == [
        "--debug", "query", "x.jpg", "--", "--debug"]
    assert cli.hoist_global_flags(["--debug", "status"]) == ["--debug", "status"]


def test_the_decompression_bomb_message_states_the_real_limit(idx, mini_store, tmp_path):
    with pytest.raises(images.BadImage) as e:
        images.decode(bomb_png())
    assert e.value.reason == "too_large"
    assert e.value.detail == "400,000,000 pixels, over the limit of 64,000,000 pixels"
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png())
    code, _, err = idx("query", str(bomb), "--store", str(mini_store))
    assert code == 1 and err.strip() == (f"error: {bomb}: too_large: 400,000,000 pixels, over "
                                         "the limit of 64,000,000 pixels")


def test_the_final_progress_bar_shows_what_was_written(tmp_path, tiny_ckpt, mini_shard):
    r = run_idx("build", "--data", mini_shard, "--store", str(tmp_path / "s"), "--checkpoint",
                tiny_ckpt, "--draws", "1", "--batch-size", "10", "--workers", "0", "--device",
                "cpu", "--json", env={"PHISEARCH_NO_PROGRESS": "0"})   # the bar on stderr
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["indexed"] == 100
    written = [int(x) for x in re.findall(r"written=(\d+)", r.stderr)]
    assert written and written[-1] == 100, r.stderr[-500:]
