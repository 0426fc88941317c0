"""A checkpoint split into parts under a size limit, and joined back: a lent GPU machine returns
files of at most 16 MiB each (a paper64 fp16 checkpoint is about 27 MB).

    python -m phisearch.indexer.model.parts split RUN/model.safetensors OUT [--max-mb 15]
    python -m phisearch.indexer.model.parts join OUT/model.part*.safetensors DEST.safetensors

Parts are safetensors files holding a subset of the tensors (fp16) with the original metadata;
the JSON record travels as NAME.json. Joining checks the recorded weights sha256 (of the fp16
weights) before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from phisearch.indexer.model.checkpoint import weights_sha256
from safetensors import safe_open
from safetensors.torch import save_file


def split(src: str | os.PathLike, out_dir: str | os.PathLike, max_mb: float = 15.0,
          dtype: torch.dtype = torch.float16) -> list[Path]:
    """Write SRC's tensors (weights cast to `dtype`) as parts of at most max_mb each, plus the
    JSON record; returns the part paths. The metadata records the fp16 weights' sha256."""
    src, out = Path(src), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: (v.to(dtype) if not k.startswith("extra.") and v.is_floating_point() else v)
               for k, v in tensors.items()}
    meta["weights_sha256"] = weights_sha256({k: v for k, v in tensors.items()
                                             if not k.startswith("extra.")})
    limit = int(max_mb * 2**20) - 64 * 1024   # room for the header
    groups: list[dict] = [{}]
    size = 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if groups[-1] and size + n > limit:
            groups.append({})
            size = 0
        groups[-1][k] = tensors[k].contiguous()
        size += n
    paths = []
    for i, g in enumerate(groups):
        p = out / f"{src.stem}.part{i}.safetensors"
        save_file(g, str(p), metadata=dict(meta, part=f"{i}/{len(groups)}"))
        paths.append(p)
    info = src.with_suffix(".json")
    if info.exists():
        record = json.loads(info.read_text())
        record["weights_sha256"] = meta["weights_sha256"]
        (out / f"{src.stem}.json").write_text(json.dumps(record, indent=1, sort_keys=True))
    return paths


def join(parts: list[str | os.PathLike], dst: str | os.PathLike) -> Path:
    """One checkpoint from its parts (any order); refuses a missing part or a sha mismatch."""
    tensors, meta, seen = {}, {}, set()
    for p in parts:
        with safe_open(str(p), framework="pt") as f:
            m = dict(f.metadata() or {})
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
        i, n = m.pop("part").split("/")
        seen.add(int(i))
        meta = m
    if seen != set(range(int(n))):
        raise ValueError(f"parts {sorted(seen)} of {n}: some are missing")
    sha = weights_sha256({k: v for k, v in tensors.items() if not k.startswith("extra.")})
    if sha != meta.get("weights_sha256"):
        raise ValueError("joined weights do not match the recorded sha256")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata=meta)
    record = Path(parts[0]).parent / (Path(parts[0]).name.split(".part")[0] + ".json")
    if record.exists():
        dst.with_suffix(".json").write_text(record.read_text())
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("src")
    s.add_argument("out_dir")
    s.add_argument("--max-mb", type=float, default=15.0)
    j = sub.add_parser("join")
    j.add_argument("parts", nargs="+")
    j.add_argument("dst")
    a = ap.parse_args()
    if a.cmd == "split":
        for p in split(a.src, a.out_dir, a.max_mb):
            print(p)
    else:
        print(join(a.parts, a.dst))


if __name__ == "__main__":
    main()
