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

from mmjax import vocabulary
from mmjax.data import classnames
from mmjax.data.tokenizer import Tokenizer

# A source's `modality` (FLAVA's unimodal data): which half of each record is kept.
#   "paired": image and text (default); "image": the text is dropped (all PAD);
#   "text": the image is dropped (all pixels 0, which no loss reads: see
#   mmjax.objectives.flava). `kind` still says how records are read.
MODALITIES = ("paired", "image", "text")


def source_modalities(config: ml_collections.ConfigDict, keys: Sequence[str]) -> list[str]:
  """Per-source modality (`data.sources.<key>.modality`) in `keys` order."""
  out = [config.data.sources[k].modality for k in keys]
  for key, m in zip(keys, out):
    if m not in MODALITIES:
      raise ValueError(f"config data.sources.{key}.modality={m!r}: choose one of {MODALITIES}")
  return out


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3]: the largest centred square, resized
  (bilinear). The model maps pixels to [-1, 1] on the device (`vit.normalize_images`)."""
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  s = min(h, w)
  y0, x0 = (h - s) // 2, (w - s) // 2
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR,
                                                  box=(x0, y0, x0 + s, y0 + s)))


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                        min_area: float) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3]: an Inception-style crop of area fraction in
  [min_area, 1] and aspect in [3/4, 4/3], resized (bilinear); the centre crop when ten
  draws find none that fits."""
  h, w = image.shape[:2]
  for _ in range(10):
    area = h * w * rng.uniform(min_area, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
      return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR,
                                                      box=(x0, y0, x0 + cw, y0 + ch)))
  return center_crop_resize(image, size)


class TrainTransform(grain.transforms.RandomMap):
  """Record from `CleanSource` -> model example (see pipeline.make_train_iterator)."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer,
               kinds: Sequence[str], modalities: Sequence[str]):
    d = config.data
    self.size, self.max_len = int(d.image_size), int(d.max_text_len)
    self.templates = classnames.label_templates(config)
    self.rrc, self.min_area = bool(d.augment.random_resized_crop), float(d.augment.min_crop_area)
    self.flip = bool(d.augment.flip)
    self.tokenizer = tokenizer
    self.kinds = tuple(kinds)  # per source index
    self.modalities = tuple(modalities)  # per source index

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
    out = {
        "image": np.ascontiguousarray(image, np.uint8),
        "text": self.tokenizer.encode([text], self.max_len)[0],
        "label": np.int32(rec["label"]),
        "text_type": np.int32(vocabulary.LABEL if is_label else vocabulary.CAPTION),
        "source": np.int32(rec["source"]),
        "skipped": np.int32(rec["skipped"]),
    }
    modality = self.modalities[int(rec["source"])]
    if modality == "image":
      out["text"] = np.zeros_like(out["text"])  # all PAD
    elif modality == "text":
      out["image"] = np.zeros_like(out["image"])
    # Flags say which losses may use the example (see mmjax.objectives.flava).
    out["has_image"] = np.int32(modality != "text")
    out["has_text"] = np.int32(modality != "image")
    out["paired"] = np.int32(modality == "paired")
    return out
