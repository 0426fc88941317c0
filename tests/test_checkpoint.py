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


@pytest.mark.slow   # PHISEARCH_SLOW=1 and CI run it
def test_shipped_model_quality_recomputed_on_the_mini_shard(mini_shard):
    """Not read back from its JSON: on the 100 mini images the shipped denoiser beats the noisy
    input by > 6 dB at σ 0.1 and the best Gaussian blur at every σ, and its default readout
    retrieves the query's class more often than 16x16 pixels (leave-one-out kNN@5)."""
    from phisearch.indexer.model.embedder import Embedder
    from phisearch.indexer.sources.loader import first_samples
    from phisearch.indexer.train.denoise_eval import denoise_eval
    from phisearch.search.evaluate import pixel_vectors

    samples = first_samples([mini_shard], 100)
    imgs = np.stack([s.image for s in samples])
    labels = np.array([s.label for s in samples])
    c = ckpt.load()
    table = denoise_eval(c.model, imgs, batch_size=50)
    assert table["0.1"]["denoised"] > table["0.1"]["noisy"] + 6
    assert all(r["denoised"] > r["baseline"] for r in table.values())

    def knn5(x: np.ndarray) -> float:
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        nn = np.argsort(d, 1)[:, :5]
        return float(np.mean([np.bincount(labels[r]).argmax() == lab
                              for r, lab in zip(nn, labels)]))

    dense, _ = Embedder.create(device="cpu")(imgs)
    assert knn5(dense) > knn5(pixel_vectors(imgs, 16))


def test_untrained_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    a = ckpt.untrained("tiny", seed=5)
    assert torch.equal(torch.rand(3), want)
    assert a.sha256 == ckpt.untrained("tiny", seed=5).sha256 != ckpt.untrained("tiny", 6).sha256


def test_a_whitening_is_tied_to_the_phi_settings_it_was_fitted_on(tmp_path, mini_shard):
    """blocks+white8 fitted at σ 0.2 / 4 draws: an embedder at σ 0 refuses it in one line that
    says how to fit one; a whitening fitted at σ 0 (into a new file) is accepted there."""
    from phisearch.indexer.model.config import PhiConfig
    from phisearch.indexer.model.embedder import Embedder
    from phisearch.indexer.train.fit_readout import fit_into_checkpoint

    base = tmp_path / "t.safetensors"
    ckpt.save(ckpt.untrained("tiny", seed=1).model, base, {}, preset_name="tiny")
    fit_into_checkpoint(str(base), [mini_shard], "blocks", 8, 0.2, 4, 0, limit=40)
    Embedder.create(str(base), PhiConfig(sigma=0.2, draws=4, readout="blocks+white8"), "cpu")
    with pytest.raises(ValueError, match=r"fitted on φ at σ 0.2 with 4 draw.*--sigma 0 --draws 1"):
        Embedder.create(str(base), PhiConfig(sigma=0, draws=4, readout="blocks+white8"), "cpu")
    with pytest.raises(ValueError, match="fitted on"):
        Embedder.create(str(base), PhiConfig(sigma=0.2, draws=1, readout="blocks+white8"), "cpu")
    at0 = tmp_path / "t0.safetensors"
    fit_into_checkpoint(str(base), [mini_shard], "blocks", 8, 0.0, 1, 0, limit=40, out=str(at0))
    Embedder.create(str(at0), PhiConfig(sigma=0, draws=4, readout="blocks+white8"), "cpu")
