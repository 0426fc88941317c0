"""A training run's state beside its checkpoint, as tensors in safetensors (never pickled):
Adam's moments and step counts, the noise generator, and the run's counters."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def save_state(path: Path, opt: torch.optim.Optimizer, meta: dict,
               generator: torch.Generator | None = None) -> None:
    tensors = {}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        st = opt.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                tensors[f"{i}.{k}"] = st[k].detach().float().contiguous().cpu()
        if "step" in st:
            tensors[f"{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    if generator is not None:
        tensors["generator"] = generator.get_state()
    _write(path, tensors, meta)


def _write(path: Path, tensors: dict, meta: dict) -> None:
    """Write a state file atomically (a temporary, then a rename)."""
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def _read(path: Path) -> tuple[dict, dict]:
    """A state file's counters and tensors."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        return meta, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)


def load_state(path: Path, opt: torch.optim.Optimizer,
               generator: torch.Generator | None = None) -> dict:
    """Restore Adam's state (and the generator's, when saved) into `opt`; returns the counters."""
    meta, tensors = _read(path)
    for i, p in enumerate(opt.param_groups[0]["params"]):
        if f"{i}.exp_avg" in tensors:
            opt.state[p] = {"step": tensors[f"{i}.step"].reshape(()).clone(),
                            "exp_avg": tensors[f"{i}.exp_avg"].to(p.device),
                            "exp_avg_sq": tensors[f"{i}.exp_avg_sq"].to(p.device)}
    if generator is not None and "generator" in tensors:
        generator.set_state(tensors["generator"])
        meta["generator_restored"] = True
    return meta


def dataset_size(urls: list[str]) -> int:
    """Samples in the shards, from the folder's manifest.json when it lists them."""
    total = 0
    for url in urls:
        manifest = Path(url).parent / "manifest.json"
        n = None
        if manifest.is_file():
            for split in json.loads(manifest.read_text()).get("splits", {}).values():
                for sh in split.get("shards", []):
                    if sh.get("file") == Path(url).name:
                        n = sh.get("samples")
        total += n if n else 1000
    return total


BRANCH_FILES = ("model.safetensors", "model.json", "ema.safetensors", "ema.json")


def branch(src: Path, dst: Path) -> dict:
    """A new run folder that continues `src` exactly (weights, moving average, Adam's moments,
    counters and CPU time) but starts its own lr schedule at the branch step: how a recipe
    decision tries a schedule from a point of a running arm without an Adam restart (STACK.md:
    a warm restart moves the weights before it helps). Returns the branch's counters."""
    src, dst = Path(src), Path(dst)
    state = src / "train_state.safetensors"
    if not state.is_file() or not (src / "model.safetensors").is_file():
        raise FileNotFoundError(f"{src}: no run to branch (needs model and train_state)")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst}: exists and is not empty")
    _copy(src, dst, BRANCH_FILES)
    meta, tensors = _read(state)
    meta.update(schedule_start=None, branched_from=f"{src}@{meta.get('step')}")
    _write(dst / "train_state.safetensors", tensors, meta)
    return meta


KEEP_FILES = (*BRANCH_FILES, "train_state.safetensors", "train_log.jsonl")


def saved_steps(run: Path) -> dict[str, int | None]:
    """The step each of a run's files records (model, moving average, Adam's state)."""
    run = Path(run)

    def json_steps(name: str) -> int | None:
        p = run / name
        return json.loads(p.read_text()).get("steps") if p.is_file() else None

    state = run / "train_state.safetensors"
    return {"model": json_steps("model.json"), "ema": json_steps("ema.json"),
            "state": _read(state)[0].get("step") if state.is_file() else None}


def keep(run: Path, dst: Path, tries: int = 60, wait: float = 5.0) -> int:
    """Copy one consistent save of a run (every file at the same step) to `dst`, replacing it:
    how a run outlives a session whose run folders are not kept (scripts/keep_run.py). A copy
    that catches the trainer between files waits for its next save. Returns the step."""
    run, dst = Path(run), Path(dst)
    if not (run / "model.safetensors").is_file():
        raise FileNotFoundError(f"{run}: no run to keep")
    for attempt in range(tries):
        s = saved_steps(run)
        if len({v for v in s.values() if v is not None}) == 1:
            tmp = dst.with_name(dst.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            _copy(run, tmp, KEEP_FILES)
            if saved_steps(tmp) == s:      # no save landed while we copied
                shutil.rmtree(dst, ignore_errors=True)
                tmp.rename(dst)
                return s["model"]
            shutil.rmtree(tmp)
        if attempt + 1 < tries:
            time.sleep(wait)
    raise RuntimeError(f"{run}: its files do not agree on a step: {saved_steps(run)}")


def restore(kept: Path, run: Path) -> int:
    """Put a kept run back into a run folder, to resume it exactly; never over a run."""
    kept, run = Path(kept), Path(run)
    if not (kept / "model.safetensors").is_file():
        raise FileNotFoundError(f"{kept}: no kept run")
    if (run / "model.safetensors").exists():
        raise FileExistsError(f"{run}: already holds a run; not overwritten")
    _copy(kept, run, KEEP_FILES)
    return saved_steps(run)["model"]


def _copy(src: Path, dst: Path, names: tuple[str, ...]) -> None:
    """Copy those of `names` that `src` holds into `dst` (made if missing)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
