"""Preprocessing against tests/data/conformance/pixels.npz (the official evaluation transform)."""
import numpy as np
import pytest
import torch
from PIL import Image

from avarc import AvarcError, preprocess_image
from avarc.io.preprocess import open_image, preprocess_pil
from tests.conftest import CONFORMANCE

PIXELS = np.load(CONFORMANCE / "pixels.npz")
STEMS = ("gray", "landscape", "palette", "portrait", "rgba", "tiny")


@pytest.mark.parametrize("size", (256, 512))
@pytest.mark.parametrize("stem", STEMS)
def test_pixels_match_official(stem, size):
    path = next((CONFORMANCE / "images").glob(f"{stem}.*"))
    assert np.array_equal(preprocess_pil(open_image(path), size), PIXELS[f"pixels{size}_{stem}"])
    x = preprocess_image(path, size)
    assert x.shape == (3, size, size) and x.dtype == torch.float32
    assert torch.allclose(x, torch.from_numpy(PIXELS[f"pixels{size}_{stem}"]).permute(2, 0, 1).float() / 255 * 2 - 1)


def test_cmyk_and_16bit(tmp_path):
    cmyk = Image.new("CMYK", (40, 30), (0, 255, 255, 0))   # pure red
    cmyk.save(tmp_path / "c.jpg")
    out = preprocess_pil(open_image(tmp_path / "c.jpg"), 16)
    assert out.shape == (16, 16, 3) and out[..., 0].mean() > 200 and out[..., 1].mean() < 60
    deep = Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16))
    deep.save(tmp_path / "d.png")
    out = preprocess_pil(open_image(tmp_path / "d.png"), 8)
    assert out.min() == 255   # full-scale 16-bit white stays white (not clipped from 65535 to 255 by chance)
    half = Image.fromarray(np.full((20, 20), 32896, dtype=np.uint16))
    assert abs(int(preprocess_pil(half, 8)[0, 0, 0]) - 128) <= 1


def test_resize_mode_keeps_whole_image():
    img = Image.fromarray(np.tile(np.arange(8, dtype=np.uint8)[None, :] * 30, (8, 1)))
    out = preprocess_pil(img, 32, "resize")
    assert out.shape == (32, 32, 3) and out[:, 0].mean() < out[:, -1].mean()


@pytest.mark.parametrize("content, reason", [(b"", "empty file"), (b"\x89PNG\r\n\x1a\nbroken", "not a readable image")])
def test_bad_image_is_one_line_error(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(AvarcError) as e:
        open_image(path)
    assert str(path) in str(e.value) and reason in str(e.value) and "\n" not in str(e.value)
