"""`idx eval`'s result as a Markdown table (the order: φ first, then its baselines)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from phisearch.search.metrics import METRICS


def _order(reps: Sequence[str]) -> list[str]:
    first = ["phi", "phi_mid_raw", "phi_sigma0"]
    groups = [
        [r for r in first if r in reps],
        sorted(r for r in reps if r.startswith("phi_") and r not in first
               and not r.startswith("phi_s")),
        [r for r in ("random_init", "random_init_mid_raw") if r in reps],
        sorted(r for r in reps if r.startswith("random_init_") and r != "random_init_mid_raw"),
        [r for r in ("pixels", "pixels16", "pixels16+white64") if r in reps],
        [r for r in reps if r.startswith("phi_s") and r != "phi_sigma0"],
    ]
    seen = [r for gr in groups for r in gr]
    return seen + [r for r in reps if r not in seen]


def _files(part: dict) -> str:
    """The shard names of a split (the first and last of a long list)."""
    names = [u.rsplit("/", 1)[-1] for u in part["urls"]]
    return ", ".join(names) if len(names) <= 4 else \
        f"{len(names)} shards: {names[0]} … {names[-1]}"


def _subset(s: dict, which: str) -> str:
    n = s.get(f"{which}_per_class")
    skip = s.get(f"{which}_skip_per_class") or 0
    if not n:
        return ""
    return f"; {n} of each class" + (f" after the first {skip}" if skip else "")


def markdown(result: dict[str, Any]) -> str:
    """The result as a markdown table (one row per representation)."""
    s = result["settings"]
    cached = set(s.get("cached_representations", ()))
    q_files, g_files = _files(s["queries"]), _files(s["gallery"])
    lines = [f"# idx eval: `{result['checkpoint']}`", ""]
    lines.append(f"- model sha256 `{result['model_sha256'][:16]}…`; readout of `phi`: "
                 f"`{result['readout']}`; φ σ={s['sigma']:g}, draws={s['draws']}, "
                 f"seed={s['seed']}")
    lines.append(f"- queries: {s['queries']['count']} images, {s['queries']['classes']} classes "
                 f"({q_files}{_subset(s, 'queries')}); gallery: {s['gallery']['count']} images "
                 f"({g_files}{_subset(s, 'gallery')}); "
                 f"self-matches left out: {s['excluded_self_matches']}")
    for rep, note in s["whitening"].items():
        lines.append(f"- whitening of `{rep}`: {note}")
    for warning in result.get("warnings", ()):
        lines.append(f"- **warning**: {warning}")
    lines.append(f"- total {result['seconds']['total']:.0f} s; img/s = φ pass speed on this "
                 f"machine ({s['device']}, {s['torch_threads']} torch threads)")
    header = ("| representation | knn@1 | knn@10 | p@10 | mAP | NMI | ARI | purity "
              "| Δ/s classes | Δ/s clusters | img/s |")
    if cached:
        lines.append("- img/s marked * : vectors read from --cache; the speed is from the run "
                     "that computed them")
    lines += ["", header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    reps, seps, ips = result["representations"], result["separation"], result["img_per_s"]
    for rep in _order(list(reps)):
        m, sp = reps[rep], seps[rep]
        speed = f"{ips[rep]:.0f}" if ips.get(rep) else "–"
        if rep in cached:
            speed += "*"
        lines.append(f"| `{rep}` | " + " | ".join(f"{m[k]:.3f}" for k in METRICS)
                     + f" | {sp['classes']:.2f} | {sp['clusters']:.2f} | {speed} |")
    return "\n".join(lines) + "\n"
