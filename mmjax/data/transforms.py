"""Per-example transforms: image resizing/augmentation and text selection + tokenisation.

All randomness comes from the `rng` Grain passes to `random_map`, which is seeded by
(seed, global index): an example is the same whichever process or worker loads it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from PIL import Image

from mmjax.tokenizer import Tokenizer

TEXT_TYPE_CAPTION = 0
TEXT_TYPE_LABEL = 1


def to_float(img: Image.Image) -> np.ndarray:
  """uint8 PIL image -> float32 [H, W, 3] in [-1, 1]."""
  return np.asarray(img, np.float32) * (2.0 / 255.0) - 1.0


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [size, size, 3] in [-1, 1]: largest centred square, resized."""
  h, w = image.shape[:2]
  s = min(h, w)
  y0, x0 = (h - s) // 2, (w - s) // 2
  img = Image.fromarray(image)
  if (h, w) != (size, size):
    img = img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + s, y0 + s))
  return to_float(img)


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                        min_area: float) -> np.ndarray:
  """Inception-style crop of area fraction in [min_area, 1], aspect in [3/4, 4/3]."""
  h, w = image.shape[:2]
  for _ in range(10):
    area = h * w * rng.uniform(min_area, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
      img = Image.fromarray(image).resize((size, size), Image.BILINEAR,
                                          box=(x0, y0, x0 + cw, y0 + ch))
      return to_float(img)
  return center_crop_resize(image, size)


class TrainTransform(grain.transforms.RandomMap):
  """Record from `CleanSource` -> model example (see pipeline.make_train_iterator)."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer,
               kinds: Sequence[str]):
    d = config.data
    self.size, self.max_len = int(d.image_size), int(d.max_text_len)
    self.templates = tuple(d.label_templates)
    self.rrc, self.min_area = bool(d.augment.random_resized_crop), float(d.augment.min_crop_area)
    self.flip = bool(d.augment.flip)
    self.tokenizer = tokenizer
    self.kinds = tuple(kinds)  # per source index

  def random_map(self, rec: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    if self.rrc:
      image = random_resized_crop(rec["image"], self.size, rng, self.min_area)
    else:
      image = center_crop_resize(rec["image"], self.size)
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    is_label = self.kinds[int(rec["source"])] == "label"
    if is_label:  # one class name: a random prompt template
      text = self.templates[rng.integers(len(self.templates))].format(rec["texts"][0])
    else:  # several paraphrases: a random one
      text = rec["texts"][rng.integers(len(rec["texts"]))]
    return {
        "image": np.ascontiguousarray(image, np.float32),
        "text": self.tokenizer.encode([text], self.max_len)[0],
        "label": np.int32(rec["label"]),
        "text_type": np.int32(TEXT_TYPE_LABEL if is_label else TEXT_TYPE_CAPTION),
        "source": np.int32(rec["source"]),
        "skipped": np.int32(rec["skipped"]),
    }
