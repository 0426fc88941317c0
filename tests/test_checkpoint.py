import json

import numpy as np
import pytest
import torch
from phisearch.indexer.model import checkpoint as ckpt
from safetensors import safe_open
from safetensors.torch import save_file


@pytest.fixture()
def model():
    return ckpt.untrained("tiny", seed=3).model


@torch.no_grad()
def test_round_trip(tmp_path, model):
    sha = ckpt.save(model, tmp_path / "m.safetensors", {"steps": 7}, preset_name="tiny")
    c = ckpt.load(tmp_path / "m.safetensors")
    assert c.sha256 == sha and c.info["steps"] == 7 and c.info["preset"] == "tiny"
    assert c.info["weights_sha256"] == sha and c.model.cfg == model.cfg
    y = torch.rand(2, 3, 64, 64)
    assert torch.equal(model.eval()(y), c.model(y))


def test_sha_ignores_metadata(tmp_path, model):
    a = ckpt.save(model, tmp_path / "a.safetensors", {"steps": 1, "note": "x"})
    b = ckpt.save(model, tmp_path / "b.safetensors", {"steps": 2, "psnr": {"0.1": 30.0}})
    assert a == b
    # edit the JSON record and the file's metadata: the identity stays the same
    j = tmp_path / "a.json"
    j.write_text(json.dumps(dict(json.loads(j.read_text()), note="edited")))
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        meta = dict(f.metadata(), comment="edited")
        names = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in names}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata=meta)
    c = ckpt.load(tmp_path / "a.safetensors")
    assert c.sha256 == a and c.info["note"] == "edited"
    # ... while a change of weights changes it
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert ckpt.weights_sha256(model.state_dict()) != a


@torch.no_grad()
def test_fp16_save(tmp_path, model):
    sha16 = ckpt.save(model, tmp_path / "h.safetensors", dtype=torch.float16)
    sha32 = ckpt.save(model, tmp_path / "f.safetensors")
    assert sha16 != sha32  # the stored bytes differ, so the identity does
    assert (tmp_path / "h.safetensors").stat().st_size < (tmp_path / "f.safetensors").stat().st_size
    c = ckpt.load(tmp_path / "h.safetensors")
    assert c.sha256 == sha16
    assert all(p.dtype == torch.float32 for p in c.model.parameters())
    y = torch.rand(2, 3, 64, 64)
    diff = (c.model(y) - model.eval()(y)).abs().max().item()
    assert 0 < diff < 1e-2


def test_foreign_safetensors_refused(tmp_path, model):
    p = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(p))
    with pytest.raises(ValueError, match="not a phisearch checkpoint"):
        ckpt.load(p)


def test_tampered_weights_refused(tmp_path, model):
    p = tmp_path / "t.safetensors"
    ckpt.save(model, p)
    raw = bytearray(p.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    assert len(raw) > 8 + header_len + 100
    raw[8 + header_len + 100] ^= 0x01  # one bit of one tensor's data
    p.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        ckpt.load(p)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        ckpt.load(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="built-ins"):
        ckpt.load("no-such-builtin")


def test_shipped_default_loads_with_no_arguments_and_records_its_numbers():
    """The built-in default: its JSON records training, PSNR and eval numbers, and its default
    readout's whitening is inside the safetensors (an index can be built with no arguments)."""
    from phisearch.indexer.model.embedder import Embedder

    c = ckpt.load()
    assert c.info["preset"] == "small64" and c.sha256 == c.info["weights_sha256"]
    assert c.info["steps"] > 0 and c.info["images_seen"] > 0
    de = c.info["denoise_eval"]["sigmas"]
    assert set(de) == {"0.05", "0.1", "0.2", "0.4"}
    for row in de.values():
        assert row["denoised"] > row["baseline"] and row["denoised"] > row["noisy"]
    assert c.info["eval"]["knn@10"]["phi"] > c.info["eval"]["knn@10"]["pixels16"]
    emb = Embedder.create(device="cpu")
    assert emb.phi.readout == c.info["readout"] and emb.meta()["readout"] == c.info["readout"]
    dense, mid = emb(np.zeros((2, 64, 64, 3), np.uint8))
    assert dense.shape == (2, emb.meta()["dim"]) and mid.shape == (2, 256)
