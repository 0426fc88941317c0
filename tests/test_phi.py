import numpy as np
import pytest
import torch
from phisearch.indexer.model import checkpoint as ckpt
from phisearch.indexer.model import phi as phimod
from phisearch.indexer.model.phi import as_float, phi
from phisearch.indexer.train.loop import load_images


@pytest.fixture(scope="module")
def images(mini_shard) -> np.ndarray:
    return load_images([mini_shard], 20)  # (20, 64, 64, 3) uint8, real photos


@pytest.fixture(scope="module")
def model():
    return ckpt.untrained("tiny", seed=0).model


def test_shape_and_sign(model, images):
    v = phi(model, images[:5], sigma=0.2, draws=4, seed=0)
    assert v.shape == (5, model.mid_channels) and v.dtype == torch.float32
    assert (v >= 0).all() and v.sum() > 0


def test_same_image_same_phi_in_any_batch(model, images):
    i = 3
    alone = phi(model, images[i:i + 1], 0.2, 4, 0)[0]
    in_ten = phi(model, images[:10], 0.2, 4, 0)[i]
    perm = np.random.default_rng(0).permutation(20)
    shuffled = phi(model, images[perm], 0.2, 4, 0)[int(np.flatnonzero(perm == i)[0])]
    assert torch.allclose(alone, in_ten, atol=1e-5, rtol=0)
    assert torch.allclose(alone, shuffled, atol=1e-5, rtol=0)
    # ... and the noise really differs between images: a different image gives another φ
    assert not torch.allclose(alone, phi(model, images[i + 1:i + 2], 0.2, 4, 0)[0], atol=1e-3)


def test_uint8_and_float_inputs_agree(model, images):
    a = phi(model, images[:6], 0.2, 4, 7)
    b = phi(model, as_float(images[:6]), 0.2, 4, 7)  # (N, 3, H, W) float in [0, 1]
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_seed_changes_phi(model, images):
    a = phi(model, images[:4], 0.2, 4, 0)
    b = phi(model, images[:4], 0.2, 4, 1)
    assert (a - b).abs().max() > 1e-4
    assert torch.equal(a, phi(model, images[:4], 0.2, 4, 0))  # and the same seed repeats


@torch.no_grad()
def test_sigma_zero_is_one_clean_pass(model, images):
    a = phi(model, images[:4], sigma=0.0, draws=4, seed=0)
    clean = model.encode(as_float(images[:4]))[0].mean(dim=(-2, -1))
    assert torch.allclose(a, clean, atol=1e-6, rtol=0)


@torch.no_grad()
def test_draws_are_averaged(model, images):
    sigma, draws, seed = 0.3, 4, 5
    x = as_float(images[:3])
    z = phimod.noise(images[:3], draws, seed)                     # (draws, N, 3, H, W)
    assert z.shape == (draws, 3, 3, 64, 64)
    per_draw = [model.encode(x + sigma * z[j])[0].mean(dim=(-2, -1)) for j in range(draws)]
    manual = torch.stack(per_draw).mean(0)
    assert torch.allclose(phi(model, images[:3], sigma, draws, seed), manual, atol=1e-5, rtol=0)
    # the draws differ from each other, so the average is not a single pass
    assert (per_draw[0] - per_draw[1]).abs().max() > 1e-4


def test_poolings_of_the_middle_block_agree_with_the_mean_even_with_decoder_taps() -> None:
    """Extra poolings (the readout sweep's 2x2 quadrant means and max) average back to the
    spatial mean and bound it, with or without a decoder tap in the same pass (they used to
    turn into "unknown taps" when a decoder tap was asked for too)."""
    from phisearch.indexer.model import checkpoint as ckpt
    from phisearch.indexer.model.phi import MID, features

    model = ckpt.untrained("tiny", seed=0).model.eval()
    imgs = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    pools = {"max": lambda m: m.amax(dim=(-2, -1)),
             "2x2": lambda m: torch.nn.functional.adaptive_avg_pool2d(m, 2).flatten(1)}
    for taps in ((MID,), (MID, "D1.out")):
        f = features(model, imgs, 0.2, 2, 0, taps, poolings=pools)
        c = f[MID].shape[1]
        assert f["2x2"].shape == (3, 4 * c) and f["max"].shape == (3, c)
        assert torch.allclose(f["2x2"].reshape(3, c, 4).mean(-1), f[MID], atol=1e-5)
        assert (f["max"] >= f[MID] - 1e-6).all()


def test_per_draw_prefix_means_are_phi_with_fewer_draws(model, images):
    """Draw j's noise does not depend on the number of draws, so one 8-draw pass kept per draw
    gives φ for every d <= 8 exactly (what bench/draws_sweep.py relies on)."""
    from phisearch.indexer.model.phi import MID, features

    per = features(model, images[:5], 0.2, 8, 3, (MID,), per_draw=True)[MID]
    assert per.shape == (8, 5, model.mid_channels)
    for d in (1, 2, 4, 8):
        assert torch.allclose(per[:d].mean(0), phi(model, images[:5], 0.2, d, 3), atol=1e-5,
                              rtol=0)
    assert (per[0] - per[1]).abs().max() > 1e-4
