"""WebDataset shards -> batches of decoded 64x64 samples, with every bad sample counted.

Reading and decoding run in DataLoader workers (one shard at a time per worker). A batch carries
its samples, the samples skipped since the last batch (with reasons) and the shards whose last
sample it holds, so the writer can mark a shard complete exactly when its last point is stored.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from braceexpand import braceexpand
from phisearch.indexer.sources import images
from phisearch.indexer.sources.records import Sample, ShardFailed, Skip
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")   # gzip-compressed shards read like plain ones


def is_shard_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(SHARD_SUFFIXES)


def is_shard_folder(folder: str | Path) -> bool:
    """A folder given as --data holds shards (not photos) when it has shard files and no image
    files at its top level."""
    names = [p.name for p in Path(folder).expanduser().iterdir() if p.is_file()]
    return any(is_shard_name(n) for n in names) and not any(
        n.lower().rsplit(".", 1)[-1] in IMAGE_EXTS for n in names if "." in n)


def shards_in(folder: str | Path) -> list[str]:
    """The shard files directly inside a folder, in name order (a folder of shards as --data)."""
    return sorted(str(p) for p in Path(folder).expanduser().iterdir()
                  if p.is_file() and is_shard_name(p.name))


def shard_key(url: str) -> str:
    """A shard's identity for resume records: its resolved absolute path (so `../x.tar`,
    `/abs/x.tar` and `x.tar` from its folder are one shard); `pipe:` commands as given."""
    return url if url.startswith("pipe:") else os.path.realpath(os.path.expanduser(url))


def expand(patterns: Iterable[str]) -> list[str]:
    """Paths, brace patterns, folders of shards and `pipe:` commands -> a list of shard urls
    (local paths resolved, see shard_key). Missing local files, and folders without shards,
    are an error up front, not a skip in the middle of a run."""
    urls: list[str] = []
    for pattern in patterns:
        for entry in braceexpand(str(pattern)):
            found = [entry]
            if not entry.startswith("pipe:") and Path(entry).expanduser().is_dir():
                found = shards_in(entry)
                if not found:
                    raise FileNotFoundError(f"no shards ({', '.join(SHARD_SUFFIXES)}) in folder "
                                            f"{entry}")
            for url in found:
                if not url.startswith("pipe:") and not Path(url).expanduser().is_file():
                    raise FileNotFoundError(f"shard not found: {url}")
                url = shard_key(url)
                if url not in urls:
                    urls.append(url)
    if not urls:
        raise ValueError("no shards given")
    return urls


def fingerprint(url: str) -> str:
    """Identity of a shard's content for resume: size and mtime for files; the command for pipes."""
    if url.startswith("pipe:"):
        return "pipe"
    st = os.stat(url)
    return f"{st.st_size}:{st.st_mtime_ns}"


def content_hash(url: str) -> str | None:
    """sha256 of a shard file's bytes (None for pipes). Resume compares it when a shard's size is
    unchanged and its mtime is not: a copied or restored dataset is then done, not re-embedded."""
    if url.startswith("pipe:"):
        return None
    with open(url, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class FolderInfo:
    dataset: str
    label_names: dict[int, str]


@lru_cache(maxsize=256)
def folder_info(url: str, dataset: str | None = None) -> FolderInfo:
    """Dataset name (manifest.json `name`, else `dataset`, else the folder's name) and label
    names (labels.tsv: id, wnid, label) of the folder a shard lives in."""
    folder = Path(url.removeprefix("pipe:").split()[-1] if url.startswith("pipe:") else url).parent
    name = dataset
    manifest = folder / "manifest.json"
    if name is None and manifest.is_file():
        try:
            name = json.loads(manifest.read_text()).get("name")
        except (OSError, ValueError):
            log.warning("unreadable manifest %s", manifest)
    labels: dict[int, str] = {}
    tsv = folder / "labels.tsv"
    if tsv.is_file():
        for line in tsv.read_text().splitlines()[1:]:
            parts = line.split("\t")
            if len(parts) >= 3 and parts[0].isdigit():
                labels[int(parts[0])] = parts[2]
    return FolderInfo(dataset=name or folder.name or "default", label_names=labels)


def _reason(exn: Exception) -> str:
    if isinstance(exn, (tarfile.ReadError, EOFError)) or "unexpected end" in str(exn).lower():
        return "truncated_tar"
    if isinstance(exn, (gzip.BadGzipFile, zlib.error)):
        return "corrupt_tar"
    if isinstance(exn, (FileNotFoundError, PermissionError)):
        return "unreadable_shard"
    if isinstance(exn, tarfile.TarError):
        return "corrupt_tar"
    return "read_error"


def read_shard(url: str) -> Iterator[dict | Skip | ShardFailed]:
    """Raw webdataset samples of one shard (dicts of bytes) and Skips for what failed to read.
    A shard with no readable sample at all ends with ShardFailed instead (not a tar, an empty
    file, a pipe command that failed), as does a pipe command that exits with an error."""
    errors: list[Exception] = []

    def handler(exn: Exception) -> bool:
        errors.append(exn)
        return True

    truncated = {"seen": False}
    first_error: list[Skip] = []

    def drain() -> Iterator[Skip]:
        while errors:
            exn = errors.pop(0)
            reason = _reason(exn)
            # One damage is reported more than once (a cut: member, then tar; a bad gzip block:
            # zlib, then the tar reader): the shard's reading ended, so count its first report.
            if reason in ("truncated_tar", "corrupt_tar"):
                if truncated["seen"]:
                    continue
                truncated["seen"] = True
            skip = Skip(url, None, reason, str(exn.args[0] if exn.args else exn)[:200])
            if n_raw:
                yield skip
            elif not first_error:  # nothing read yet: judged at the end (a shard failure?)
                first_error.append(skip)

    try:
        raw_stream = gopen(url)
        stream = unzipped(raw_stream)
    except Exception as exn:  # noqa: BLE001 - a failure of this shard; the run goes on
        yield ShardFailed(url, _reason(exn), one_line(exn))
        return
    n_raw = 0
    try:
        files = tar_file_expander([dict(url=url, stream=stream)], handler=handler)
        for raw in group_by_keys(files, handler=handler):
            yield from drain()
            n_raw += 1
            yield raw
        if not errors and n_raw:
            rest_error(stream, errors)
        yield from drain()
    finally:
        try:
            if stream is not raw_stream:
                stream.close()      # a GzipFile does not close the file it reads
            raw_stream.close()
            closed = None
        except OSError as exn:      # gopen's pipe: the command exited with an error
            closed = exn
    if closed is not None:
        yield ShardFailed(url, "pipe_failed", one_line(closed))
    elif not n_raw and first_error:
        detail = first_error[0].detail
        yield ShardFailed(url, "empty_shard" if "empty file" in detail else "not_a_tar", detail)


def unzipped(stream):
    """The shard's tar stream: gzip-compressed shards (`.tar.gz`, `.tgz`, told by their magic
    bytes) are read through Python's gzip module, whose CRC and length checks turn a damaged
    or cut file into an error instead of a silently shorter archive."""
    head = stream.peek(2)[:2] if hasattr(stream, "peek") else b""
    return gzip.GzipFile(fileobj=stream, mode="rb") if head == b"\x1f\x8b" else stream


def rest_error(stream, errors: list[Exception]) -> None:
    """After the last member: what follows must be the archive's zero padding. tarfile ends an
    archive quietly at the first invalid header after the first member, so a damaged header in
    the middle would otherwise drop every later sample without a word. Reading to the end also
    makes gzip check the CRC of the whole file."""
    try:
        while chunk := stream.read(1 << 16):
            if chunk.count(0) != len(chunk):
                errors.append(tarfile.TarError(
                    "the archive ends early: data follows its last readable member (a damaged "
                    "header); the rest of the shard was not read"))
                return
    except (OSError, EOFError, zlib.error) as exn:
        errors.append(exn)


def one_line(exn: BaseException) -> str:
    """An exception as one short line (gopen's pipe errors carry a tuple of arguments)."""
    text = str(exn.args[0] if len(exn.args) == 1 else exn)
    if "exit " in text and "(read)" in text:   # gopen: "(('cmd',), {...}): exit 1 (read) {}"
        text = "exit " + text.split("exit ", 1)[1].split(" (read)")[0]
    return " ".join(text.split())[:200]


def decode_sample(raw: dict, url: str, info: FolderInfo) -> Sample | Skip:
    key = raw.get("__key__", "?")
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        return Skip(url, key, "no_image", f"members: {sorted(k for k in raw if not k.startswith('__'))}")
    try:
        image = images.decode(raw[ext])
    except images.BadImage as e:
        return Skip(url, key, e.reason, e.detail)
    meta: dict = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except ValueError:
            meta = {}
    label = None
    if "cls" in raw:
        try:
            label = int(raw["cls"].decode().strip())
        except (ValueError, UnicodeDecodeError):
            label = None
    label_name = meta.get("label") or (info.label_names.get(label) if label is not None else None)
    return Sample(key=key, shard=url, dataset=info.dataset, image=image, label=label,
                  label_name=label_name, split=meta.get("split"))
