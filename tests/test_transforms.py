"""Per-example transforms: crops and resizes stay uint8 pixels (the model normalises them on
the device), the centre crop is the centre, and the train transform's outputs."""
import numpy as np
import pytest
from PIL import Image

import helpers
from mmjax.data import transforms


def _ramp(height: int, width: int) -> np.ndarray:
  """uint8 [H, W, 3]: red = column, green = row, blue = 7 (positions readable from pixels)."""
  rows, cols = np.mgrid[:height, :width]
  return np.stack([cols, rows, np.full_like(rows, 7)], -1).astype(np.uint8)


def test_center_crop_keeps_the_centred_square_as_uint8_pixels():
  image = _ramp(64, 96)  # the centred 64 x 64 square is columns 16..79
  out = transforms.center_crop_resize(image, 64)
  assert out.dtype == np.uint8 and out.shape == (64, 64, 3)
  np.testing.assert_array_equal(out, image[:, 16:80])
  tall = transforms.center_crop_resize(_ramp(100, 40), 40)  # rows 30..69
  np.testing.assert_array_equal(tall, _ramp(100, 40)[30:70])


def test_center_crop_resize_is_pillows_bilinear_resize_of_that_square():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)
  out = transforms.center_crop_resize(image, 32)
  assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
  expected = np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR,
                                                      box=(15, 0, 65, 50)))
  np.testing.assert_array_equal(out, expected)
  same = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  np.testing.assert_array_equal(transforms.center_crop_resize(same, 32), same)


def test_random_resized_crop_is_uint8_seeded_and_keeps_a_constant_colour():
  image = _ramp(120, 90)
  crop = lambda seed: transforms.random_resized_crop(image, 48, np.random.default_rng(seed),
                                                     min_area=0.3)
  a, b, c = crop(1), crop(1), crop(2)
  assert a.dtype == np.uint8 and a.shape == (48, 48, 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert (a[..., 2] == 7).all()  # a constant channel stays exactly that value
  flat = np.full((30, 70, 3), (200, 3, 99), np.uint8)
  out = transforms.random_resized_crop(flat, 16, np.random.default_rng(0), min_area=0.5)
  np.testing.assert_array_equal(out, np.broadcast_to(flat[:16, :16], out.shape))


@pytest.mark.parametrize("modality", ["paired", "text"])
def test_train_transform_emits_uint8_images(modality):
  config = helpers.tiny_config(**{"data.augment.random_resized_crop": False,
                                  "data.augment.flip": False})
  size = config.data.image_size

  class Tokenizer:
    def encode(self, texts, max_len):
      return np.ones((len(texts), max_len), np.int32)

  transform = transforms.TrainTransform(config, Tokenizer(), kinds=["caption"],
                                        modalities=[modality])
  image = _ramp(size, size + 20)
  rec = dict(image=image, texts=["a caption"], label=-1, source=0, skipped=0)
  out = transform.random_map(rec, np.random.default_rng(0))
  assert out["image"].dtype == np.uint8 and out["image"].shape == (size, size, 3)
  if modality == "text":  # the image is dropped: all zeros, read by no loss
    assert not out["image"].any() and out["has_image"] == 0
  else:
    np.testing.assert_array_equal(out["image"], image[:, 10:10 + size])
