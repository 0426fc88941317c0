"""How algorithm A re-noises between levels (search/schedules.py RENOISE): the arithmetic on
known noise, and on the shipped model that "ancestral" draws images where "fresh" draws grey."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from phisearch.indexer.model import checkpoint as ckpt
from phisearch.search import recon_report as rr
from phisearch.search import reconstruct as rc


def _known_noise(sigma_prev: float = 0.5, n: int = 200_000):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, generator=g)
    eps = torch.randn(n, generator=g)
    z = torch.randn(n, generator=g)
    return x, eps, z, x + sigma_prev * eps


def test_fresh_adds_new_noise_and_ignores_the_last_level():
    x, _, z, y_prev = _known_noise()
    y = rc._renoise(x, z, 0.3, y_prev, 0.5, "fresh")
    assert torch.equal(y, x + 0.3 * z)
    assert torch.equal(rc._renoise(x, z, 0.3, None, 0.0, "ancestral"), x + 0.3 * z)  # first level


def test_ddim_keeps_the_estimated_noise_scaled_to_the_new_level():
    x, eps, z, y_prev = _known_noise()
    y = rc._renoise(x, z, 0.3, y_prev, 0.5, "ddim")
    torch.testing.assert_close(y, x + 0.3 * eps, rtol=0, atol=1e-6)


def test_ancestral_has_the_level_s_noise_and_keeps_sigma_over_sigma_prev_of_the_old():
    x, eps, z, y_prev = _known_noise()
    noise = rc._renoise(x, z, 0.3, y_prev, 0.5, "ancestral") - x
    assert float(noise.std()) == pytest.approx(0.3, rel=0.01)       # total noise is σ_k
    corr = float(torch.corrcoef(torch.stack([noise, eps]))[0, 1])
    assert corr == pytest.approx(0.3 / 0.5, abs=0.01)              # DDPM's posterior share


def test_schedule_refuses_an_unknown_renoise():
    with pytest.raises(ValueError, match="renoise"):
        rc.Schedule(renoise="fresh-ish")


def test_unguided_ancestral_samples_have_the_detail_fresh_ones_lack():
    """The shipped model, the default schedule unguided: "fresh" collapses to a smooth average
    (SPEC §4's algorithm A is a guided sampler), "ancestral" keeps drawing an image."""
    model = ckpt.load().model
    sch = replace(rc.SCHEDULES["fast"], inner_steps=0)
    stats = {}
    for how in ("fresh", "ancestral"):
        rec = rc.reconstruct(model, n=4, sch=replace(sch, renoise=how), seed=0)
        stats[how] = rr.image_stats(rec.images())
    # Measured (ancestral vs fresh): small64 at 21,919 steps (Imagenette only) pixel std 0.053 vs
    # 0.029, high-frequency share 0.56 vs 0.18; at 45,079 (+ Tiny ImageNet) 0.038 vs 0.023 and
    # 0.45 vs 0.31 (real photos: 0.21, 0.30); with today's default (20 levels from σ 5;
    # bench/results/recon_contrast_45079.json) 0.157 vs 0.053 and 0.43 vs 0.14.
    assert stats["ancestral"]["pixel_std"] > 1.5 * stats["fresh"]["pixel_std"], stats
    assert stats["ancestral"]["high_freq_fraction"] > 1.3 * stats["fresh"]["high_freq_fraction"], \
        stats


def test_default_schedule_draws_unguided_samples_with_the_contrast_of_photos(mini_shard):
    """The default schedule starts at σ 5 (search/schedules.py): from σ 1 an unguided sample keeps
    the mean image's flat colour, because an image's coarse components vary far more than σ 1."""
    import numpy as np
    import webdataset as wds
    from phisearch.indexer.sources import images

    model = ckpt.load().model
    sch = replace(rc.SCHEDULES["fast"], inner_steps=0)
    stats = {s: rr.image_stats(rc.reconstruct(model, n=4, sch=replace(sch, sigma_max=s),
                                              seed=0).images()) for s in (1.0, sch.sigma_max)}
    photos = np.stack([images.decode(x["jpg"]) for x in wds.WebDataset(mini_shard,
                                                                        shardshuffle=False)])
    real = rr.image_stats(photos)["pixel_std"]
    # Measured (45,079-step model, 20 levels, 4 samples, seed 0; bench/results/
    # recon_contrast_45079.json): pixel std 0.046 from σ 1 and 0.157 from σ 5; photos 0.22.
    assert stats[sch.sigma_max]["pixel_std"] > 2 * stats[1.0]["pixel_std"], stats
    assert stats[sch.sigma_max]["pixel_std"] > 0.5 * real, (stats, real)
    assert stats[sch.sigma_max]["flat_fraction"] == 0.0, stats
