"""`shapes`: a deterministic synthetic image-text-label dataset, built locally in seconds.

TFDS configs (array_record, built without TensorFlow):

* ``shapes/labels``: one coloured shape per 64x64 RGB image; ``label`` is a ClassLabel over
  the 64 names ``"<colour> <shape>"`` (8 colours x 8 shapes).
* ``shapes/captions``: one or two shapes per image; ``captions`` holds exactly 3 paraphrases
  whose sizes (small / large) and relation (above / below / left of / right of) are true of
  the picture. Every colour-shape combination occurs in them.
* ``shapes/labels_seen`` and ``shapes/labels_unseen``: the label images of a zero-shot split
  of the 64 classes. 16 classes are held out (`UNSEEN_CLASS_NAMES`): colour i with shapes i
  and i + 3 (mod 8), two diagonals of the 8 x 8 colour-shape grid, so each colour and each
  shape is held out exactly twice and still occurs in 6 of the 48 seen classes.
  ``labels_seen`` (train 4000, validation 500) has a ClassLabel over the 48 seen names and
  only their images; ``labels_unseen`` (validation 1000) one over the 16 held-out names and
  only theirs. A model trained on ``labels_seen`` (plus captions, which may show and name
  any combination) never has a held-out class as a label or a prompt; classifying
  ``labels_unseen`` by prompts then measures zero-shot transfer, and ``labels_seen``
  validation the closed-set accuracy on the training classes.

Every example is a pure function of ``(config, split, index)`` through
``np.random.default_rng((_SEED, config_index, split_index, index))``, so builds are
reproducible and independent of TFDS's write order.

``ensure_built(name, data_dir)`` builds on first use and is safe to call from several
processes at once (``mmjax.locks.file_lock`` in ``data_dir``).
"""
from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import time
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image, ImageDraw

from mmjax import errors
from mmjax.locks import file_lock

IMAGE_SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 10),
    "yellow": (225, 205, 0),
    "green": (30, 160, 40),
    "blue": (30, 70, 225),
    "purple": (140, 40, 180),
    "brown": (120, 70, 30),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross",
                           "hexagon", "ring")
CLASS_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
# Held out of labels_seen (see the module docstring): colour i with shape (i + offset) % 8.
UNSEEN_SHAPE_OFFSETS = (0, 3)
UNSEEN_CLASS_NAMES: tuple[str, ...] = tuple(
    f"{c} {SHAPES[(i + k) % len(SHAPES)]}" for i, c in enumerate(COLOURS)
    for k in UNSEEN_SHAPE_OFFSETS)
SEEN_CLASS_NAMES: tuple[str, ...] = tuple(n for n in CLASS_NAMES if n not in UNSEEN_CLASS_NAMES)
RELATIONS: dict[str, str] = {"above": "below", "below": "above",
                             "left of": "right of", "right of": "left of"}
# Radii (half the bounding box) for the caption sizes: disjoint ranges so "small" and
# "large" stay true at 64px, and two large shapes still fit side by side with a gap.
SMALL_RADIUS = (5, 8)
LARGE_RADIUS = (11, 14)
LABEL_RADIUS = (7, 18)
_SEED = 20240521
_SPLITS = {"train": 0, "validation": 1}


class ShapesConfig(tfds.core.BuilderConfig):
  """A shapes variant; `num_examples` maps split name to size; `index` keys its random
  streams; a label variant draws its classes uniformly from `class_names` (None: the
  original 64-class draw of ``labels``, kept bit-identical)."""

  def __init__(self, *, num_examples: dict[str, int], index: int,
               class_names: tuple[str, ...] | None = None, **kwargs):
    super().__init__(**kwargs)
    self.num_examples = num_examples
    self.index = index
    self.class_names = class_names


def _background(rng: np.random.Generator) -> np.ndarray:
  """A light random colour with a linear gradient and light noise: uint8 [64, 64, 3]."""
  base = rng.uniform(175, 245, size=3)
  tint = rng.uniform(-30, 30, size=3)
  angle = rng.uniform(0, 2 * np.pi)
  ramp = np.linspace(-0.5, 0.5, IMAGE_SIZE)
  grad = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]  # [64, 64]
  img = base + grad[..., None] * tint + rng.normal(0, 4, size=(IMAGE_SIZE, IMAGE_SIZE, 1))
  return np.clip(img, 0, 255).astype(np.uint8)


def _regular(cx: float, cy: float, r: float, n: int, rot: float) -> list[tuple[float, float]]:
  angles = [rot + 2 * math.pi * k / n for k in range(n)]
  return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
               colour: tuple[int, int, int]) -> None:
  """Draws `shape` inside the box [cx-r, cx+r] x [cy-r, cy+r]."""
  box = (cx - r, cy - r, cx + r, cy + r)
  if shape == "circle":
    draw.ellipse(box, fill=colour)
  elif shape == "square":
    s = r * 0.85  # same visual mass as the circle
    draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
  elif shape == "triangle":
    draw.polygon(_regular(cx, cy + r * 0.15, r, 3, -math.pi / 2), fill=colour)
  elif shape == "star":
    pts = []
    for k in range(10):
      rad = r if k % 2 == 0 else r * 0.42
      a = -math.pi / 2 + math.pi * k / 5
      pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    draw.polygon(pts, fill=colour)
  elif shape == "diamond":
    draw.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=colour)
  elif shape == "cross":
    t = max(1.5, r * 0.33)
    draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=colour)
    draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=colour)
  elif shape == "hexagon":
    draw.polygon(_regular(cx, cy, r, 6, 0.0), fill=colour)
  elif shape == "ring":
    draw.ellipse(box, outline=colour, width=max(2, int(round(r * 0.35))))
  else:
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _png(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="PNG", compress_level=1)  # speed over size: the build must be fast
  return buf.getvalue()


def _a(phrase: str) -> str:
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _pick(rng: np.random.Generator) -> tuple[str, str]:
  return list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]


def label_example(rng: np.random.Generator,
                  class_names: tuple[str, ...] | None = None) -> tuple[bytes, int]:
  """One shape of random size and position, of a class drawn uniformly from `class_names`
  (None: any of the 64). Returns (PNG bytes, class index into `class_names` or
  CLASS_NAMES)."""
  if class_names is None:
    colour, shape = _pick(rng)
  else:
    colour, shape = class_names[rng.integers(len(class_names))].split(" ")
  img = Image.fromarray(_background(rng))
  r = rng.uniform(*LABEL_RADIUS)
  cx, cy = rng.uniform(r + 1, IMAGE_SIZE - 1 - r, size=2)
  draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, COLOURS[colour])
  return _png(img), (class_names or CLASS_NAMES).index(f"{colour} {shape}")


def caption_example(rng: np.random.Generator) -> tuple[bytes, list[str]]:
  """One or two shapes and 3 true paraphrases. Returns (PNG bytes, captions)."""
  img = Image.fromarray(_background(rng))
  draw = ImageDraw.Draw(img)
  size_a = "small" if rng.random() < 0.5 else "large"
  col_a, shp_a = _pick(rng)
  radius = lambda size: rng.uniform(*(SMALL_RADIUS if size == "small" else LARGE_RADIUS))
  r_a = radius(size_a)
  if rng.random() < 0.3:
    cx, cy = rng.uniform(r_a + 1, IMAGE_SIZE - 1 - r_a, size=2)
    draw_shape(draw, shp_a, cx, cy, r_a, COLOURS[col_a])
    a = f"{size_a} {col_a} {shp_a}"
    return _png(img), [_a(a), f"a picture of {_a(a)}", f"a single {col_a} {shp_a}"]
  while True:  # the two objects must be told apart by colour or shape
    col_b, shp_b = _pick(rng)
    if (col_b, shp_b) != (col_a, shp_a):
      break
  size_b = "small" if rng.random() < 0.5 else "large"
  r_b = radius(size_b)
  relation = list(RELATIONS)[rng.integers(len(RELATIONS))]
  # Place A then B along the relation axis with a gap of >= 2px between bounding boxes, so
  # the relation holds for every pixel; the other axis is free.
  slack = IMAGE_SIZE - 2 - 2 * r_a - 2 * r_b - 2
  first = rng.uniform(0, slack)
  lo_center = 1 + first + (r_a if relation in ("above", "left of") else r_b)
  hi_center = lo_center + (r_a + r_b + 2 + rng.uniform(0, slack - first))
  a_main, b_main = ((lo_center, hi_center) if relation in ("above", "left of")
                    else (hi_center, lo_center))
  a_off = rng.uniform(r_a + 1, IMAGE_SIZE - 1 - r_a)
  b_off = rng.uniform(r_b + 1, IMAGE_SIZE - 1 - r_b)
  vertical = relation in ("above", "below")
  ca = (a_off, a_main) if vertical else (a_main, a_off)
  cb = (b_off, b_main) if vertical else (b_main, b_off)
  draw_shape(draw, shp_a, *ca, r_a, COLOURS[col_a])
  draw_shape(draw, shp_b, *cb, r_b, COLOURS[col_b])
  a, b = f"{size_a} {col_a} {shp_a}", f"{size_b} {col_b} {shp_b}"
  return _png(img), [f"{_a(a)} {relation} {_a(b)}", f"{_a(b)} {RELATIONS[relation]} {_a(a)}",
                     f"{_a(col_a + ' ' + shp_a)} and {_a(col_b + ' ' + shp_b)}"]


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Synthetic coloured shapes with class labels or compositional captions."""

  # A config's examples are a pure function of (config index, split, example index): adding
  # a config leaves the others' data, and so their cached builds, unchanged (a golden test
  # pins labels and captions). Change a config's data only with a new version.
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      ShapesConfig(name="labels", index=0, description="One shape; 64 colour-shape classes.",
                   num_examples={"train": 4000, "validation": 500}),
      ShapesConfig(name="captions", index=1, description="One or two shapes; 3 captions each.",
                   num_examples={"train": 4000, "validation": 500}),
      ShapesConfig(name="labels_seen", index=2, class_names=SEEN_CLASS_NAMES,
                   description="One shape; the 48 classes not held out for zero-shot.",
                   num_examples={"train": 4000, "validation": 500}),
      ShapesConfig(name="labels_unseen", index=3, class_names=UNSEEN_CLASS_NAMES,
                   description="One shape; the 16 classes held out of labels_seen.",
                   num_examples={"validation": 1000}),
  ]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    # Nothing is downloaded, so there are no checksums to find beside the code; TFDS's
    # lookup of this module's path needs `importlib_resources`, which is not installed.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    image = tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png")
    cfg = self.builder_config
    if cfg.name.startswith("labels"):
      names = list(cfg.class_names or CLASS_NAMES)
      features = {"image": image, "label": tfds.features.ClassLabel(names=names)}
    else:
      features = {"image": image, "captions": tfds.features.Sequence(tfds.features.Text())}
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features),
                                          homepage="https://github.com/mmjax")

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in self.builder_config.num_examples}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    cfg = self.builder_config
    for i in range(cfg.num_examples[split]):
      rng = np.random.default_rng((_SEED, cfg.index, _SPLITS[split], i))
      if cfg.name.startswith("labels"):
        png, label = label_example(rng, cfg.class_names)
        yield i, {"image": png, "label": label}
      else:
        png, captions = caption_example(rng)
        yield i, {"image": png, "captions": captions}


def ensure_built(name: str, data_dir: str) -> None:
  """Builds TFDS dataset `name` (e.g. "shapes/labels") into `data_dir` unless prepared.

  Concurrent callers (xdist workers, several hosts on one filesystem) serialise on
  `<data_dir>/<name>.lock`; the second finds the dataset prepared and returns.
  """
  data_dir = os.path.expanduser(data_dir)
  with quiet_tfds():
    if tfds.builder(name, data_dir=data_dir).is_prepared():
      return
  try:
    with file_lock(os.path.join(data_dir, name.replace("/", "_") + ".lock")), quiet_tfds():
      builder = tfds.builder(name, data_dir=data_dir)  # re-check under the lock
      if builder.is_prepared():
        return
      start = time.time()
      builder.download_and_prepare(file_format="array_record")
    examples = sum(builder.builder_config.num_examples.values())
    print(f"Built {name} ({examples} generated images, nothing downloaded) into {data_dir} "
          f"in {time.time() - start:.0f} s", flush=True)
  except OSError as e:
    if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR,
                       errno.ENOENT):  # ENOENT: a parent that cannot be created
      raise
    what = "is a file" if os.path.isfile(data_dir) else f"cannot be written ({e.strerror})"
    raise errors.UsageError(f"cannot build {name}: data_dir {data_dir} {what}: point config "
                            "data_dir at a writable folder, or at one where it is built") from None


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
  """TFDS's own lines about a first build mislead here ("Downloading and preparing dataset
  Unknown size", "Variant folder ... has no dataset_info.json" while the folder is being
  written): nothing is downloaded. ensure_built prints one line of its own instead; other
  readers use it where a UsageError says what to do about an absent dataset."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    logging.set_verbosity(verbosity)
