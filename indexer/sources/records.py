"""The records that flow from sources to the build: samples, skips, shard and folder events,
and the batches that carry them. A leaf module: sources and build both import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from phisearch.indexer.sources import images

Fingerprint = list   # [size, mtime_ns, sha256 | None]: a folder file's identity for sync


@dataclass
class Sample:
    key: str
    shard: str               # the shard's url or path, as given (after brace expansion)
    dataset: str
    image: np.ndarray        # (64, 64, 3) uint8
    label: int | None = None
    label_name: str | None = None
    split: str | None = None
    path: str | None = None  # folder sources: the file, so a hit can be opened
    fp: list | None = None   # folder sources: the file's fingerprint (folders.Fingerprint)


@dataclass
class Skip:
    shard: str
    key: str | None
    reason: str              # short counter key: corrupt_image, truncated_tar, no_image, ...
    detail: str = ""
    fp: list | None = None   # folder files: recorded, so an unchanged bad file is not retried
    kept: int | None = None  # folder paths that cannot be read (offline, unreadable): how many
                             # recorded files lie under it, their points kept (not deleted)


@dataclass
class ShardFailed:
    """A shard that could not be read as a whole (not a tar, empty, a failed pipe command): an
    error for that shard, never recorded as done, so the next run tries it again."""
    shard: str
    reason: str              # not_a_tar | empty_shard | pipe_failed | unreadable_shard
    detail: str = ""


@dataclass
class FileEvent:
    """A folder file that needs no decoding: unchanged, gone (deleted), or (dry run) new/changed."""
    root: str
    key: str
    kind: str                                   # unchanged | deleted | new | changed | mount


@dataclass(frozen=True)
class ShardDone:
    """The stream has passed the last sample of this shard (its points can be recorded)."""
    shard: str


@dataclass(frozen=True)
class FolderDone:
    """This worker has walked the whole folder."""
    root: str


@dataclass
class Batch:
    """What a loader worker hands over: decoded samples and everything else it met since the
    previous batch, in order, so the writer can record a shard once its last point is stored."""
    samples: list[Sample] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    shards_done: list[str] = field(default_factory=list)
    shards_failed: list[ShardFailed] = field(default_factory=list)
    events: list[FileEvent] = field(default_factory=list)   # folder files: unchanged, deleted
    folders_done: list[str] = field(default_factory=list)   # folder roots this worker walked

    def images(self) -> np.ndarray:
        """(N, 64, 64, 3) uint8."""
        if not self.samples:
            return np.zeros((0, images.SIZE, images.SIZE, 3), np.uint8)
        return np.stack([s.image for s in self.samples])

    def __len__(self) -> int:
        return len(self.samples)


# Skip.reason -> words for people (idx status): "2 corrupt or truncated (corrupt_image)".
SKIP_WORDS = {
    "empty": "empty file",
    "not_an_image": "not an image (unrecognized format)",
    "corrupt_image": "corrupt or truncated image",
    "too_small": f"too small (under {images.MIN_SIDE} px a side)",
    "too_large": f"too large (over {images.MAX_PIXELS:,} pixels or {images.MAX_BYTES >> 20} MiB)",
    "no_image": "no image in the sample",
    "duplicate_key": "key seen twice in a dataset (in one shard or two; the first kept)",
    "truncated_tar": "shard cut short",
    "corrupt_tar": "corrupt tar data",
    "unreadable_shard": "shard could not be opened",
    "read_error": "read error",
    "not_a_file": "not a regular file",
    "unreadable": "file or folder could not be read (its points kept)",
    "offline": "folder or link target away, e.g. an unplugged drive (its points kept)",
    "symlink_loop": "link back to a folder already walked",
}


def skip_words(counts: dict[str, int]) -> str:
    """{reason: count} in words, every reason named, most frequent first: "3 skipped: 2 corrupt
    or truncated image (corrupt_image), 1 empty (zero bytes) (empty)"; "none skipped"."""
    total = sum(counts.values())
    if not total:
        return "none skipped"
    parts = [f"{n} {SKIP_WORDS.get(r, r.replace('_', ' '))} ({r})"
             for r, n in sorted(counts.items(), key=lambda rn: (-rn[1], rn[0]))]
    return f"{total} skipped: " + ", ".join(parts)
