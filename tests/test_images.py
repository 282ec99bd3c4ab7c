"""mmjax.data.decode_image on real files of every Pillow mode, pixel by pixel."""
import io

import numpy as np
import pytest
from PIL import Image

import image_files
from mmjax.data import decode_image

ZOO = image_files.image_zoo()


@pytest.mark.parametrize("case", ZOO, ids=[f.name for f in ZOO])
def test_every_mode_decodes_to_the_expected_rgb(case):
  got = decode_image(case.data)
  assert got.dtype == np.uint8 and got.ndim == 3 and got.shape[-1] == 3
  assert got.flags["C_CONTIGUOUS"]
  assert got.shape == case.expected.shape
  diff = np.abs(got.astype(int) - case.expected.astype(int))
  assert diff.max() == 0, f"{case.name}: {int((diff > 0).sum())} values differ, max {diff.max()}"


def test_the_zoo_holds_the_modes_it_claims():
  modes = {f.name: Image.open(io.BytesIO(f.data)).mode for f in ZOO}
  assert {"RGB", "L", "1", "P", "LA", "RGBA", "CMYK", "I;16", "I;16B", "I", "F"} <= set(
      modes.values()), modes
  assert getattr(Image.open(io.BytesIO(next(f.data for f in ZOO if f.name == "animated.gif"))),
                 "n_frames", 1) == 2
  assert Image.open(io.BytesIO(next(f.data for f in ZOO if f.name == "cmyk_adobe.jpg"))
                    ).info.get("adobe") is not None


def test_sixteen_bits_keep_the_full_range():
  grey16 = next(f for f in ZOO if f.name == "grey16_I16.png")
  got = decode_image(grey16.data)
  assert got.min() == 0 and got.max() == 255  # not clipped, not the low byte


def test_cmyk_jpeg_polarity_gives_the_photo_back():
  """The CMYK JPEG was made from the coffee photo: decoded with the wrong (non-Adobe)
  polarity it would be a negative."""
  coffee = image_files.photos()["coffee"].astype(int)
  for name in ("cmyk_adobe.jpg", "cmyk.tif"):
    got = decode_image(next(f for f in ZOO if f.name == name).data).astype(int)
    assert np.abs(got - coffee).mean() < 3, name


def test_transparent_pixels_become_white():
  cutout = next(f for f in ZOO if f.name == "cutout_RGBA.png")
  rgba = np.asarray(Image.open(io.BytesIO(cutout.data)))
  clear = rgba[..., 3] == 0
  assert clear.any() and (rgba[clear][:, :3] == 0).all()  # stored black
  assert (decode_image(cutout.data)[clear] == 255).all()


def test_lab_tiff_neutrals_are_grey():
  """LAB (TIFF): Pillow converts through LittleCMS; an L ramp with a = b = 0 must come out as
  the sRGB grey of the same lightness (CIE L* -> sRGB, computed here). LittleCMS works in
  16-bit fixed point and rounds once more than this float reference: within 1.5 levels."""
  lightness = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (2, 1))
  lab = np.stack([lightness, np.zeros_like(lightness), np.zeros_like(lightness)], -1)
  data = image_files.encode(Image.frombytes("LAB", lab.shape[1::-1], lab.tobytes()), "TIFF")
  got = decode_image(data).astype(float)
  l_star = lightness.astype(float) * 100 / 255
  y = np.where(l_star > 8, ((l_star + 16) / 116) ** 3, l_star / 903.3)
  srgb = np.where(y <= 0.0031308, 12.92 * y, 1.055 * y ** (1 / 2.4) - 0.055) * 255
  assert np.abs(got - srgb[..., None]).max() <= 1.5
  assert np.abs(got - got[..., :1]).max() <= 1  # neutral


@pytest.mark.parametrize("name, data", list(image_files.bad_files().items()))
def test_undecodable_files_raise(name, data):
  with pytest.raises(Exception):
    decode_image(data)
