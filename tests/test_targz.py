"""`.tar.gz` shards (Tiny ImageNet's format) are read everywhere a `.tar` is: build and its resume
records, embed, eval, train, denoise-eval, fit-readout, brace patterns and a folder of shards; a
cut or damaged `.tar.gz` is a counted shard error and nothing already read is lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from phisearch.indexer.ingest.pipeline import BuildConfig, build
from phisearch.indexer.model.config import PhiConfig
from phisearch.indexer.sources.shards import expand, read_shard
from phisearch.indexer.store import StoreConfig, open_store
from phisearch.ui.cli import app
from typer.testing import CliRunner

VAL_LAST = "tinyimagenet-val-000010.tar.gz"   # the val split's last shard: 50 images


@pytest.fixture(scope="module")
def tiny_dir(data_dir: Path) -> Path:
    d = data_dir.parent / "tinyimagenet-64"
    if not (d / VAL_LAST).is_file():
        pytest.fail(f"Tiny ImageNet shards not found in {d} (PHISEARCH_DATA)", pytrace=False)
    return d


@pytest.fixture()
def gz_folder(tiny_dir: Path, tmp_path: Path) -> Path:
    """Two real .tar.gz shards of 50 images each (one renamed .tgz), with the set's manifest and
    labels, so the dataset name is the set's own."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    for f in ("manifest.json", "labels.tsv"):
        shutil.copy(tiny_dir / f, folder / f)
    shutil.copy(tiny_dir / VAL_LAST, folder / "part-000000.tar.gz")
    # a second shard: the same 50 images under other keys, written as .tgz
    import webdataset as wds

    raws = [r for r in read_shard(str(tiny_dir / VAL_LAST)) if isinstance(r, dict)]
    with wds.TarWriter(str(folder / "part-000001.tgz"), compress=True) as w:
        for r in raws:
            w.write({"__key__": "copy_" + r["__key__"],
                     **{k: v for k, v in r.items() if not k.startswith("__")}})
    return folder


def run_build(store: Path, data: list[str], ckpt: str) -> dict:
    return build(BuildConfig(data=tuple(data), store=StoreConfig(path=str(store)),
                             checkpoint=ckpt, phi=PhiConfig(sigma=0.2, draws=1, seed=0),
                             batch_size=50, workers=0, device="cpu"))


def test_build_reads_targz_by_brace_pattern_and_resumes_by_fingerprint(gz_folder, tmp_path,
                                                                         tiny_ckpt):
    s = run_build(tmp_path / "store", [str(gz_folder / "part-{000000..000000}.tar.gz"),
                                       str(gz_folder / "part-000001.tgz")], tiny_ckpt)
    assert s["indexed"] == 100 and s["skipped"] == {}
    with open_store(StoreConfig(path=str(tmp_path / "store"))) as st:
        assert st.count() == 100
        shards = {h.payload["shard"] for h in st.scroll({})}
        datasets = {h.payload["dataset"] for h in st.scroll({})}
    assert shards == {"part-000000.tar.gz", "part-000001.tgz"} and datasets == {"tinyimagenet"}
    again = run_build(tmp_path / "store", [str(gz_folder)], tiny_ckpt)   # a folder of shards
    assert again["indexed"] == 0 and again["shards_already_done"] == 2


def test_a_cut_targz_is_a_counted_error_and_keeps_what_was_read(gz_folder, tmp_path, tiny_ckpt):
    data = (gz_folder / "part-000000.tar.gz").read_bytes()
    cut = gz_folder / "part-000000.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    read = [r for r in read_shard(str(cut))]
    samples = [r for r in read if isinstance(r, dict)]
    errors = [r for r in read if not isinstance(r, dict)]
    assert 0 < len(samples) < 50
    assert [e.reason for e in errors] == ["truncated_tar"]
    s = run_build(tmp_path / "store", [str(gz_folder)], tiny_ckpt)
    assert s["skipped"] == {"truncated_tar": 1}
    assert s["indexed"] == len(samples) + 50          # the cut shard's readable part + the other


def test_a_damaged_member_header_no_longer_ends_the_shard_silently(gz_folder):
    """tarfile stops at the first invalid header after the first member, without an error: the
    samples behind it were dropped without a word. Now that is a corrupt_tar skip."""
    import gzip

    raw = gzip.decompress((gz_folder / "part-000000.tar.gz").read_bytes())
    bad = bytearray(raw)
    at = raw.index(b"ustar", len(raw) // 2) - 257       # a member header in the second half
    bad[at:at + 512] = b"\x07" * 512
    for name, blob in (("bad-000000.tar", bytes(bad)), ("bad-000001.tar.gz", gzip.compress(bad))):
        path = gz_folder / name
        path.write_bytes(blob)
        read = list(read_shard(str(path)))
        assert 0 < sum(isinstance(r, dict) for r in read) < 50
        assert [r.reason for r in read if not isinstance(r, dict)] == ["corrupt_tar"], name
    # a flipped byte inside the compressed data: gzip's CRC catches it at the end at the latest
    blob = bytearray((gz_folder / "part-000000.tar.gz").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (gz_folder / "flip-000000.tar.gz").write_bytes(bytes(blob))
    read = list(read_shard(str(gz_folder / "flip-000000.tar.gz")))
    errors = [r.reason for r in read if not isinstance(r, dict)]
    assert errors in (["corrupt_tar"], ["truncated_tar"], ["not_a_tar"]), errors


def test_a_folder_without_shards_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shards"):
        expand([str(tmp_path / "empty")])


def test_the_model_commands_read_targz(gz_folder, tmp_path, tiny_checkpoint):
    """embed, eval, denoise-eval, fit-readout and train, each on a .tar.gz shard."""
    cli = CliRunner()
    shard = str(gz_folder / "part-000000.tar.gz")
    ck = str(tiny_checkpoint)

    r = cli.invoke(app, ["embed", "--data", shard, "--checkpoint", ck, "--draws", "1",
                         "--out", str(tmp_path / "e.npz"), "--device", "cpu", "--workers", "0"])
    assert r.exit_code == 0, r.output
    got = np.load(tmp_path / "e.npz")
    assert len(got["keys"]) == 50 and len(np.unique(got["labels"])) > 1

    r = cli.invoke(app, ["denoise-eval", "--data", shard, "--checkpoint", ck, "--images", "8",
                         "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["sigmas"]["0.1"]["denoised"] > 0

    r = cli.invoke(app, ["eval", "--queries", shard, "--gallery", str(gz_folder / "part-000001.tgz"),
                         "--checkpoint", ck, "--readouts", "mid", "--phi-draws", "1",
                         "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert ev["settings"]["queries"]["count"] == 50 and ev["settings"]["gallery"]["count"] == 50
    # the gallery holds the same images under other keys: φ finds each query's copy first
    assert ev["representations"]["phi"]["knn@1"] == pytest.approx(1.0)

    copy = tmp_path / "ck.safetensors"
    shutil.copy(ck, copy)
    shutil.copy(Path(ck).with_suffix(".json"), copy.with_suffix(".json"))
    r = cli.invoke(app, ["fit-readout", "--checkpoint", str(copy), "--data", shard,
                         "--dims", "8", "--draws", "1"])
    assert r.exit_code == 0, r.output

    r = cli.invoke(app, ["train", "--data", str(gz_folder), "--out", str(tmp_path / "run"),
                         "--preset", "tiny", "--steps", "2", "--batch-size", "4",
                         "--dtype", "fp32", "--workers", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "run" / "model.json").read_text())
    assert info["steps"] == 2 and len(info["data"]["shards"]) == 2
