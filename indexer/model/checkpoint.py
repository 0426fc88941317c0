"""Checkpoints: NAME.safetensors (weights, config in its metadata) + NAME.json (training record).

Never pickled. `weights_sha256` hashes tensor names, dtypes, shapes and bytes in sorted name
order, so editing metadata never changes a model's identity (CONTRACT.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from phisearch.indexer.model.config import UNetConfig, preset
from phisearch.indexer.model.unet import UNet
from safetensors import safe_open
from safetensors.torch import save_file

BUILTIN_DIR = Path(__file__).parent / "checkpoints"
DEFAULT_CHECKPOINT = "small64"


def weights_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Checkpoint:
    """A loaded model with what is known about it."""

    model: UNet
    path: Path | None          # the .safetensors file (None for a fresh, untrained model)
    sha256: str
    info: dict = field(default_factory=dict)  # the JSON record (training data, steps, PSNR, ...)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # non-weight tensors (readouts)
    weights_dtype: torch.dtype = torch.float32  # as stored (shipped checkpoints are fp16)

    @property
    def name(self) -> str:
        return self.path.stem if self.path else f"untrained-{self.info.get('preset', '?')}"


def resolve(name_or_path: str | os.PathLike | None) -> Path:
    """A path to a .safetensors file, or the name of a built-in checkpoint."""
    if name_or_path is None:
        name_or_path = DEFAULT_CHECKPOINT
    p = Path(name_or_path)
    if p.suffix == ".safetensors" or p.exists():
        if p.is_dir():
            p = p / "model.safetensors"
        if not p.exists():
            raise FileNotFoundError(f"checkpoint not found: {p}")
        return p
    builtin = BUILTIN_DIR / f"{name_or_path}.safetensors"
    if builtin.exists():
        return builtin
    names = sorted(x.stem for x in BUILTIN_DIR.glob("*.safetensors"))
    raise FileNotFoundError(f'no checkpoint "{name_or_path}": not a file, built-ins are {names}')


def save(model: UNet, path: str | os.PathLike, info: dict | None = None,
         dtype: torch.dtype | None = None, preset_name: str | None = None,
         extras: dict[str, torch.Tensor] | None = None) -> str:
    """Write PATH (.safetensors) and PATH.json atomically. Returns weights_sha256.
    `extras` are extra tensors (e.g. a whitening fitted for a readout), stored under 'extra.'."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu()
               for k, v in model.state_dict().items()}
    sha = weights_sha256(tensors)
    for k, v in (extras or {}).items():
        tensors[f"extra.{k}"] = v.detach().contiguous().cpu()
    info = dict(info or {})
    info.update(config=json.loads(model.cfg.to_json()), weights_sha256=sha)
    if preset_name:
        info["preset"] = preset_name
    meta = {"config": model.cfg.to_json(), "weights_sha256": sha,
            "preset": info.get("preset") or "", "format": "phisearch-unet-v1"}
    tmp = path.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    json_tmp = path.with_suffix(".json.tmp")
    json_tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
    os.replace(tmp, path)
    os.replace(json_tmp, path.with_suffix(".json"))
    return sha


def load(name_or_path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
         ) -> Checkpoint:
    """Rebuild the model from the config stored in the file; weights cast to fp32."""
    path = resolve(name_or_path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"{path} is not a phisearch checkpoint (no config in its metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    extras = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
    weights = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
    sha = weights_sha256(weights)
    if meta.get("weights_sha256") and meta["weights_sha256"] != sha:
        raise ValueError(f"{path}: weights do not match their recorded sha256 (corrupt file?)")
    model = UNet(UNetConfig.from_dict(json.loads(meta["config"])))
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    model.to(device).eval()
    json_path = path.with_suffix(".json")
    info = json.loads(json_path.read_text()) if json_path.exists() else {}
    info.setdefault("preset", meta.get("preset", ""))
    dtype = next(iter(weights.values())).dtype if weights else torch.float32
    return Checkpoint(model=model, path=path, sha256=sha, info=info, extras=extras,
                      weights_dtype=dtype)


def untrained(preset_name: str | UNetConfig, seed: int = 0, device: str = "cpu") -> Checkpoint:
    """A randomly initialized network: the 'same network, untrained' baseline."""
    cfg = preset(preset_name) if isinstance(preset_name, str) else preset_name
    with torch.random.fork_rng(devices=[]):   # the caller's global RNG is left as it was
        torch.manual_seed(seed)
        model = UNet(cfg).to(device).eval()
    sha = weights_sha256(model.state_dict())
    return Checkpoint(model=model, path=None, sha256=sha,
                      info={"preset": preset_name if isinstance(preset_name, str) else "custom",
                            "init_seed": seed})


def ship(src: str | os.PathLike, name: str, dtype: torch.dtype = torch.float16) -> Path:
    """Copy a trained checkpoint into the package as built-in NAME (fp16 halves its size).
    The JSON record travels with it; its weights_sha256 becomes that of the fp16 weights."""
    c = load(src)
    dst = BUILTIN_DIR / f"{name}.safetensors"
    info = dict(c.info, shipped_from=str(src), shipped_dtype=str(dtype))
    save(c.model, dst, info, dtype=dtype, preset_name=c.info.get("preset") or name,
         extras=c.extras)
    return dst
