import dataclasses

import pytest
import torch
from phisearch.indexer.model.config import UNetConfig, preset
from phisearch.indexer.model.unet import UNet, count_parameters


def test_paper64_parameter_count():
    n = count_parameters(UNet(preset("paper64")))
    assert abs(n - 13.7e6) / 13.7e6 < 0.02, n


def test_small64_parameter_count():
    n = count_parameters(UNet(preset("small64")))
    assert abs(n - 3.4e6) / 3.4e6 < 0.03, n


@pytest.mark.parametrize("name", ["tiny", "small64"])
def test_encode_shape_and_sign(name):
    torch.manual_seed(0)
    cfg = preset(name)
    model = UNet(cfg).eval()
    with torch.no_grad():
        a_m, skips = model.encode(torch.rand(3, 3, 64, 64))
    assert a_m.shape == (3, cfg.widths[3], 8, 8)
    assert (a_m >= 0).all()
    assert a_m.sum() > 0  # not all dead
    assert [s.shape[-1] for s in skips] == [64, 32, 16]


@pytest.mark.parametrize("name", ["tiny", "small64"])
def test_truncated_pass_matches_full_forward(name):
    torch.manual_seed(1)
    model = UNet(preset(name)).eval()
    y = torch.rand(4, 3, 64, 64)
    taps: dict = {}
    with torch.no_grad():
        out = model(y, taps=taps)
        a_m, _ = model.encode(y)
    assert out.shape == y.shape
    assert torch.allclose(a_m.mean(dim=(-2, -1)), taps["M.out"], atol=1e-6, rtol=0)
    assert set(taps) >= {"E1.in", "E1.out", "E3.out", "M.in", "M.out", "D3.out", "D1.out"}


def test_grayscale_end_to_end():
    model = UNet(dataclasses.replace(preset("tiny"), in_channels=1)).eval()
    y = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        out = model(y)
        a_m, _ = model.encode(y)
    assert out.shape == (2, 1, 64, 64)
    assert a_m.shape == (2, 16, 8, 8)
    assert torch.isfinite(out).all()


def test_bias_free_has_no_bias():
    model = UNet(dataclasses.replace(preset("tiny"), bias=False))
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if n.endswith("bias")]
    assert count_parameters(model) < count_parameters(UNet(preset("tiny")))
    assert not any(isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) and m.bias is not None
                   for m in model.modules())
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 3, 64, 64)


@pytest.mark.parametrize("side", [60, 66])
def test_side_not_divisible_by_8(side):
    model = UNet(preset("tiny"))
    with pytest.raises(ValueError, match="divisible by 8"):
        model.encode(torch.rand(1, 3, side, 64))
    with pytest.raises(ValueError):
        model(torch.rand(1, 3, 64, side))


def test_config_json_round_trip():
    cfg = preset("small64")
    import json

    assert UNetConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="unknown"):
        UNetConfig.from_dict({"width": 3})
