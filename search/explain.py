"""Why two images are near: the search distance taken apart over the readout's own dimensions,
and the channel statistics the UI uses to pick what is worth showing.

The search compares the collection's dense `phi` vectors (its readout: for the shipped default
`blocks+white256+l2`, whitened principal axes of every block's means, scaled to unit length).
The paper's middle-block channels (`query.explain`) are another space: their distance can be
0.04 where the search's is 0.88, so the readout's distance is the one explained first here.
"""

from __future__ import annotations

import numpy as np
from phisearch.indexer.model.phi import participation_ratio
from phisearch.indexer.model.readout import parse_label

IDENTICAL = 1e-5      # a search distance at or below this: the same pixels (φ is deterministic)
COMMON = 0.95         # a channel active in this share of the images or more says little


def is_identical(distance: float) -> bool:
    return float(distance) <= IDENTICAL


def axis_names(readout: str, dim: int, sparse_dim: int) -> list[str]:
    """What each dimension of a readout's vector is, in a few words."""
    spec = parse_label(readout)
    if spec.white is not None:
        return [f"axis {i + 1}" for i in range(dim)]
    if spec.name == "mid":
        return [f"channel {i}" for i in range(dim)]
    first = dim - sparse_dim   # `blocks`: the encoder blocks' means, then the middle block's
    return ([f"encoder dim {i}" for i in range(first)]
            + [f"middle channel {c}" for c in range(dim - first)])


def readout_words(readout: str) -> str:
    """One sentence on the space the search measures in."""
    spec = parse_label(readout)
    what = ("the means of every encoder block and of the middle block" if spec.name == "blocks"
            else "the middle block's channel means (the paper's φ)")
    steps = [what]
    if spec.sqrt:
        steps.append("square-rooted")
    if spec.white is not None:
        steps.append(f"whitened to {spec.white} principal axes of equal variance (axis 1 varies "
                     "most in the training images)")
    if spec.l2:
        steps.append("scaled to unit length")
    return f"The search compares `{readout}` vectors: " + ", ".join(steps) + "."


def explain_readout(a: np.ndarray, b: np.ndarray, names: list[str], top: int = 10) -> dict:
    """The search distance ||a - b|| of two stored vectors, taken apart: each dimension's
    (a_i - b_i)² as a share of the squared distance. Exact: the shares sum to 1 and
    `distance` is what the search reported."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d2 = (a - b) ** 2
    total = float(d2.sum())
    order = np.argsort(-d2)[:top]
    return {
        "distance": float(np.sqrt(total)),
        "drivers": [{"dim": int(i), "name": names[i], "a": float(a[i]), "b": float(b[i]),
                     "share": float(d2[i] / total) if total else 0.0} for i in order],
        "listed_share": float(d2[order].sum() / total) if total else 0.0,
    }


def common_channels(mid: np.ndarray, share: float = COMMON) -> np.ndarray:
    """(C,) bool: channels active (> 0) in at least `share` of the images (N, C)."""
    if not len(mid):
        return np.zeros(mid.shape[1], bool)
    return (mid > 0).mean(0) >= share


def informative_channel(mid: np.ndarray, min_images: int = 24, max_share: float = 0.5) -> int:
    """A channel worth opening first: active in enough images to fill a grid (min_images) but
    in at most max_share of them (then, failing that, under COMMON of them), the most selective
    of those (lowest participation ratio). Failing both, the channel active in the most images
    short of all of them, then any live one."""
    n = len(mid)
    if not n:
        return 0
    active = (mid > 0).sum(0)
    pr = participation_ratio(mid, axis=0, dead=np.inf)
    enough = active >= min(min_images, n)
    for ok in (enough & (active <= max_share * n), enough & (active < COMMON * n)):
        if ok.any():
            cand = np.flatnonzero(ok)
            return int(cand[np.argmin(pr[cand])])
    some = np.where((active > 0) & (active < n), active, -1)
    return int(np.argmax(some)) if some.max() > 0 else int(np.argmax(active))
