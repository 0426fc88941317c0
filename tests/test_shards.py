import io
from collections import Counter

import numpy as np
import pytest
from fixtures import write_bad_shard, write_truncated_tar
from phisearch.indexer.sources import images
from phisearch.indexer.sources.loader import loader
from phisearch.indexer.sources.records import Sample, Skip
from phisearch.indexer.sources.shards import expand
from PIL import Image


def read_all(urls, batch_size=16):
    samples, skips, done = [], [], []
    for b in loader(urls, batch_size, workers=0):
        samples += b.samples
        skips += b.skips
        done += b.shards_done
    return samples, skips, done


def test_mini_shard(mini_shard, data_dir):
    samples, skips, done = read_all([mini_shard])
    assert len(samples) == 100 and skips == [] and done == [mini_shard]
    assert Counter(s.label for s in samples) == {i: 10 for i in range(10)}
    assert all(s.dataset == "imagenette-64" and s.split == "mini" for s in samples)
    assert all(s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8 for s in samples)
    assert len({s.key for s in samples}) == 100
    names = {}
    for line in (data_dir / "labels.tsv").read_text().splitlines()[1:]:
        i, _, name, *_ = line.split("\t")
        names[int(i)] = name
    assert {s.label: s.label_name for s in samples} == names
    assert names[0] == "tench"


def test_bad_shard(tmp_path, mini_shard):
    path = tmp_path / "bad-000000.tar"
    expected = write_bad_shard(path, mini_shard, n_good=6)
    samples, skips, done = read_all([str(path)], batch_size=4)
    assert all(isinstance(s, Sample) for s in samples) and all(isinstance(s, Skip) for s in skips)
    got = Counter(s.reason for s in skips)
    got["good"] = len(samples)
    assert dict(got) == expected
    assert expected["good"] == 11 and sum(expected.values()) == 18
    for s in samples:
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
    keys = {s.key for s in samples}
    assert {"odd_gray", "odd_rgba", "odd_cmyk", "odd_gray16", "odd_wide"} <= keys
    by_key = {s.key: s.reason for s in skips}
    assert by_key == {"bad_corrupt": "corrupt_image", "bad_truncated": "corrupt_image",
                      "bad_clsonly": "no_image", "bad_text": "not_an_image",
                      "bad_tiny": "too_small", "bad_bomb": "too_large", "bad_empty": "empty"}
    assert done == [str(path)]
    gray = next(s for s in samples if s.key == "odd_gray").image
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    g16 = next(s for s in samples if s.key == "odd_gray16").image
    assert g16.min() < 10 and g16.max() > 245  # 16-bit range scaled to 8 bits, not clipped


def test_truncated_tar(tmp_path, mini_shard):
    path = tmp_path / "cut-000000.tar"
    complete = write_truncated_tar(path, mini_shard, 5)
    assert complete == 4
    samples, skips, done = read_all([str(path)])
    assert len(samples) == complete
    assert [s.reason for s in skips] == ["truncated_tar"]
    assert done == [str(path)]


def test_expand(data_dir):
    pattern = str(data_dir / "imagenette-test-{000000..000003}.tar")
    urls = expand([pattern, str(data_dir / "imagenette-test-000001.tar")])
    assert urls == [str(data_dir / f"imagenette-test-00000{i}.tar") for i in range(4)]
    with pytest.raises(FileNotFoundError, match="000004"):
        expand([str(data_dir / "imagenette-test-{000000..000009}.tar")])
    with pytest.raises(FileNotFoundError):
        expand(["/nonexistent.tar"])


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation():
    rng = np.random.default_rng(0)
    upright = Image.fromarray(rng.integers(0, 256, (48, 80, 3), np.uint8))  # 80 wide, 48 high
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    jpg = _encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    # the PNG holds exactly the JPEG's decoded pixels, turned upright
    raw = Image.open(io.BytesIO(jpg))
    raw.load()
    assert raw.size == (48, 80)
    png = _encode(raw.transpose(Image.Transpose.ROTATE_270), "PNG")
    a, b = images.decode(jpg), images.decode(png)
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, b)
    # without the tag the same pixels decode differently: the rotation was applied
    assert not np.array_equal(images.decode(_encode(stored, "JPEG", quality=95)), a)


def test_decode_errors():
    with pytest.raises(images.BadImage) as e:
        images.decode(b"")
    assert e.value.reason == "empty"
    with pytest.raises(images.BadImage) as e:
        images.decode(b"GIF89a garbage")
    assert e.value.reason in ("corrupt_image", "not_an_image")
