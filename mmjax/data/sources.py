"""Opening TFDS datasets for random access (TF-free) and the unified label space.

A *source* is one entry of ``config.data.sources`` (see configs/shapes.py:source_config).
Sources are always taken in sorted key order: that order defines the ``source`` id of an
example and the offsets of the unified label space (class ids of the 2nd label source are
offset by the number of classes of the 1st, and so on).
"""
from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mmjax.data import classnames
from mmjax.data import shapes  # registers the `shapes` builder with TFDS

KINDS = ("label", "caption")


def expand_dir(path: str) -> str:
  return os.path.expanduser(path) if path else path


@dataclasses.dataclass
class OpenedSource:
  """A random-access TFDS split whose image feature is left encoded (bytes).

  Attributes:
    name: TFDS name, e.g. "shapes/labels".
    split: TFDS split, e.g. "train" or "validation[:100]".
    data_source: `tfds.data_source` result; `data_source[i]` is a dict (image decoded to
      uint8 [H, W, C] unless opened with decode_images=False: then encoded bytes).
    class_names: the names prompts use for the ClassLabel `label_key` (see
      `classnames.resolve_class_names`), or None.
  """
  name: str
  split: str
  data_source: Any
  class_names: list[str] | None

  def __len__(self) -> int:
    return len(self.data_source)


def open_source(name: str, split: str, data_dir: str, *, image_key: str = "image",
                label_key: str = "", decode_images: bool = True, class_names: str = "",
                class_names_key: str = "class_names",
                refuse_wordnet_ids: bool = False) -> OpenedSource:
  """Opens TFDS `name`/`split` from `data_dir` through `tfds.data_source` (no TensorFlow).

  `shapes/*` datasets are built on first use. With `label_key`, the feature must be a
  ClassLabel; `class_names` is then the names prompts use, resolved from its names by
  `classnames.resolve_class_names(..., class_names, key=class_names_key,
  refuse_wordnet_ids=...)`. `decode_images=False` leaves the image as encoded bytes (fast
  text scans); it does not work under `tfds.testing.mock_data`, whose encoder needs
  TensorFlow.
  """
  data_dir = expand_dir(data_dir)
  if name.split("/")[0] == "shapes":
    shapes.ensure_built(name, data_dir)
  decoders = None if decode_images else {image_key: tfds.decode.SkipDecoding()}
  src = tfds.data_source(name, split=split, data_dir=data_dir, decoders=decoders)
  features = src.dataset_info.features
  if image_key not in features:
    raise KeyError(f"dataset {name!r} has no image feature {image_key!r}; features are "
                   f"{sorted(features.keys())}")
  names = None
  if label_key:
    feat = features[label_key] if label_key in features else None
    if not isinstance(feat, tfds.features.ClassLabel):
      raise KeyError(f"dataset {name!r}: label_key {label_key!r} is not a ClassLabel feature "
                     f"(features: {sorted(features.keys())})")
    names = classnames.resolve_class_names(feat.names, class_names, key=class_names_key,
                                           dataset=name, refuse_wordnet_ids=refuse_wordnet_ids)
  return OpenedSource(name=name, split=split, data_source=src, class_names=names)


def decode_image(data: bytes) -> np.ndarray:
  """Decodes encoded image bytes to uint8 [H, W, 3] RGB; raises on empty/corrupt data."""
  if not data:
    raise ValueError("zero-byte image")
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(img.convert("RGB"))  # convert() forces the full (lazy) decode


def _text(x: Any) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class CleanSource:
  """A random-access source of decoded, validated records with deterministic substitution.

  `self[i]` reads record i; if its image cannot be decoded (zero bytes, corrupt) or, for a
  caption source, it has no non-blank caption, it reads i+1, i+2, ... (mod len) instead, so
  batch composition never changes. Returns a dict with
    image: uint8 [H, W, 3]; label: int32 unified class id (-1 for captions);
    texts: list[str] (captions, or [class name] for labels); source: int32;
    skipped: int32 number of records substituted to produce this one.
  A label outside the class list raises (naming source and record index): that is a data
  bug, not a bad record.
  """

  def __init__(self, opened: OpenedSource, *, key: str, source_index: int, kind: str,
               image_key: str, label_key: str = "", text_key: str = "", label_offset: int = 0):
    if kind not in KINDS + ("image",):  # "image": evaluation reads with no text/label
      raise ValueError(f"config.data.sources.{key}.kind={kind!r}; expected one of {KINDS}")
    if kind == "label" and not label_key:
      raise ValueError(f"config.data.sources.{key}.label_key is required for kind='label'")
    if kind == "caption" and not text_key:
      raise ValueError(f"config.data.sources.{key}.text_key is required for kind='caption'")
    if len(opened) == 0:
      raise ValueError(f"source {key!r} ({opened.name}, split {opened.split}) is empty")
    self.opened, self.key, self.source_index, self.kind = opened, key, source_index, kind
    self.image_key, self.label_key, self.text_key = image_key, label_key, text_key
    self.label_offset = label_offset

  def __len__(self) -> int:
    return len(self.opened)

  def _try(self, j: int) -> dict[str, Any] | None:
    try:
      rec = self.opened.data_source[j]
    except Exception:  # TFDS decodes the image while reading: zero-byte/corrupt lands here
      return None
    label, texts = -1, []
    if self.kind == "label":
      label = int(field(rec, self.label_key))
      names = self.opened.class_names
      if not 0 <= label < len(names):
        raise ValueError(f"source {self.key!r} ({self.opened.name}, split {self.opened.split}) "
                         f"record {j}: label {label} outside its {len(names)} classes")
      texts = [names[label]]
      label += self.label_offset
    elif self.kind == "caption":
      raw = field(rec, self.text_key)
      raw = [raw] if isinstance(raw, (bytes, str)) else list(raw)
      texts = [t for t in (_text(x).strip() for x in raw) if t]
      if not texts:
        return None
    image = field(rec, self.image_key)
    if isinstance(image, bytes):  # opened with decode_images=False
      try:
        image = decode_image(image)
      except Exception:  # any undecodable image is a bad record; counted, not fatal
        return None
    elif image.ndim == 2 or image.shape[-1] == 1:
      image = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=-1)
    return {"image": image, "label": np.int32(label), "texts": texts,
            "source": np.int32(self.source_index)}

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self)
    for k in range(n):
      out = self._try((int(index) + k) % n)
      if out is not None:
        out["skipped"] = np.int32(k)
        return out
    raise ValueError(f"source {self.key!r} ({self.opened.name}): no record has a decodable "
                     "image and a non-blank text")


@dataclasses.dataclass
class TrainSources:
  """The configured train sources in sorted key order and their unified label space."""
  keys: list[str]
  sources: list[CleanSource]
  weights: list[float]
  class_names: list[str]  # unified label space; class id = index


def _source_dir(config: ml_collections.ConfigDict, s: ml_collections.ConfigDict) -> str:
  return expand_dir(s.data_dir or config.data_dir)


def open_configured_source(config: ml_collections.ConfigDict, key: str, *,
                           decode_images: bool = True) -> OpenedSource:
  """`config.data.sources[key]`, opened; a label source's names are the prompt names."""
  s = config.data.sources[key]
  is_label = s.kind == "label"
  return open_source(s.name, s.split, _source_dir(config, s), image_key=s.image_key,
                     label_key=s.label_key if is_label else "", decode_images=decode_images,
                     class_names=s.class_names, class_names_key=f"data.sources.{key}.class_names",
                     refuse_wordnet_ids=is_label and not config.data.allow_wordnet_ids)


def open_train_sources(config: ml_collections.ConfigDict) -> TrainSources:
  """Opens every `config.data.sources.*` (sorted by key) with unified label offsets."""
  keys = sorted(config.data.sources.keys())
  if not keys:
    raise ValueError("config.data.sources is empty")
  out, weights, names = [], [], []
  for i, key in enumerate(keys):
    s = config.data.sources[key]
    if not s.weight > 0:
      raise ValueError(f"config.data.sources.{key}.weight must be > 0, got {s.weight}")
    opened = open_configured_source(config, key)
    out.append(CleanSource(opened, key=key, source_index=i, kind=s.kind,
                           image_key=s.image_key, label_key=s.label_key, text_key=s.text_key,
                           label_offset=len(names)))
    if s.kind == "label":
      names.extend(opened.class_names)
    weights.append(float(s.weight))
  return TrainSources(keys=keys, sources=out, weights=weights, class_names=names)


def label_texts(config: ml_collections.ConfigDict) -> list[str]:
  """Class names of the unified label space (index = unified class id), for zero-shot."""
  return open_train_sources(config).class_names


def field(record: dict[str, Any], key: str) -> Any:
  """record["a/b"] -> record["a"]["b"]: TFDS nests features (coco_captions: "captions/text")."""
  for part in key.split("/"):
    record = record[part]
  return record


def train_texts(config: ml_collections.ConfigDict) -> list[str]:
  """Every text the train pipeline can emit: all templates x class names, all captions.

  Used to train the tokenizer. Order is deterministic (sorted source keys, record order).
  """
  texts: list[str] = []
  templates = classnames.label_templates(config)
  for key in sorted(config.data.sources.keys()):
    s = config.data.sources[key]
    opened = open_configured_source(config, key, decode_images=False)
    if s.kind == "label":
      texts += [t.format(n) for n in opened.class_names for t in templates]
    else:
      for i in range(len(opened)):
        raw = field(opened.data_source[i], s.text_key)
        raw = [raw] if isinstance(raw, (bytes, str)) else list(raw)
        texts += [t for t in (_text(x).strip() for x in raw) if t]
  return texts
