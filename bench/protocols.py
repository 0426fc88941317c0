"""The fixed evaluation protocols of issue 26, one place for every script that scores a model.

kNN@10 etc. by `idx eval` (search.evaluate) on two sets:
- tiny:       Tiny ImageNet (201 classes). Gallery: the first 50 training images of each class
              in shard order (10,050). Test queries: the first 10 of each class of the official
              val split (2,010); validation queries: the next 10 of each class (2,010, disjoint).
- imagenette: test-000000 (1,000 queries) against train 0-4 (5,000); validation queries are
              test-000001 against the same gallery. Since issue 26 these are classes the
              Tiny-trained models have never seen.
Shipping decisions read the validation protocols; the test protocols are reported.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("PHISEARCH_DATA", REPO.parent / "shared" / "data"))
TINY = DATA / "tinyimagenet-64"
NETTE = DATA / "imagenette-64"

TINY_VAL_SPLIT = str(TINY / "tinyimagenet-val-{000000..000010}.tar.gz")
TINY_TRAIN = str(TINY / "tinyimagenet-train-{000000..000088}.tar.gz")
NETTE_GALLERY = str(NETTE / "imagenette-train-{000000..000004}.tar")

# name -> (query shards, gallery shards, EvalSettings fields)
PROTOCOLS: dict[str, tuple[str, str, dict]] = {
    "tiny-test": (TINY_VAL_SPLIT, TINY_TRAIN,
                  {"queries_per_class": 10, "queries_skip_per_class": 0, "gallery_per_class": 50}),
    "tiny-val": (TINY_VAL_SPLIT, TINY_TRAIN,
                 {"queries_per_class": 10, "queries_skip_per_class": 10, "gallery_per_class": 50}),
    "imagenette-test": (str(NETTE / "imagenette-test-000000.tar"), NETTE_GALLERY, {}),
    "imagenette-val": (str(NETTE / "imagenette-test-000001.tar"), NETTE_GALLERY, {}),
}


def cli_args(name: str) -> list[str]:
    """The `idx eval` options of a protocol (what the docs quote)."""
    queries, gallery, sel = PROTOCOLS[name]
    args = ["--queries", queries, "--gallery", gallery]
    for key, flag in (("queries_per_class", "--queries-per-class"),
                      ("queries_skip_per_class", "--queries-skip-per-class"),
                      ("gallery_per_class", "--gallery-per-class")):
        if sel.get(key):
            args += [flag, str(sel[key])]
    return args
