"""Opening TFDS datasets for random access (TF-free) and the unified label space.

A *source* is one entry of ``config.data.sources`` (see configs/schema.py:source).
Sources with weight > 0 are taken in sorted key order: that order defines the ``source`` id
of an example and the offsets of the unified label space (class ids of the 2nd label source are
offset by the number of classes of the 1st, and so on).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from tensorflow_datasets.core import read_only_builder

from mmjax import errors
from mmjax.data import classnames
from mmjax.data import shapes  # registers the `shapes` builder with TFDS
from mmjax.data.images import decode_image

KINDS = ("label", "caption")


def expand_dir(path: str) -> str:
  return os.path.expanduser(path) if path else path


@dataclasses.dataclass
class OpenedSource:
  """A random-access TFDS split whose image feature is left encoded (bytes).

  Attributes:
    name: TFDS name, e.g. "shapes/labels".
    split: TFDS split, e.g. "train" or "validation[:100]".
    data_source: `tfds.data_source`-like; `data_source[i]` is a dict whose image feature is
      the encoded bytes (decode with mmjax.data.decode_image).
    class_names: the names prompts use for the ClassLabel `label_key` (see
      `classnames.resolve_class_names`), or None.
  """
  name: str
  split: str
  data_source: Any
  class_names: list[str] | None

  def __len__(self) -> int:
    return len(self.data_source)


@dataclasses.dataclass(frozen=True)
class ConfigKeys:
  """Where the config names a dataset's parts, for error messages ("" = not from a config)."""
  name: str = ""  # e.g. "data.sources.labels.name" or "evals.zeroshot.dataset"
  split: str = ""
  data_dir: str = "data_dir"
  image_key: str = ""
  label_key: str = ""
  text_key: str = ""
  class_names: str = "class_names"

  @classmethod
  def of_source(cls, config: ml_collections.ConfigDict, key: str) -> "ConfigKeys":
    prefix = f"data.sources.{key}"
    own_dir = bool(config.data.sources[key].data_dir)
    return cls(name=f"{prefix}.name", split=f"{prefix}.split",
               data_dir=f"{prefix}.data_dir" if own_dir else "data_dir",
               image_key=f"{prefix}.image_key", label_key=f"{prefix}.label_key",
               text_key=f"{prefix}.text_key", class_names=f"{prefix}.class_names")


def open_source(name: str, split: str, data_dir: str, *, image_key: str = "image",
                label_key: str = "", text_key: str = "", class_names: str = "",
                refuse_wordnet_ids: bool = False,
                keys: ConfigKeys = ConfigKeys()) -> OpenedSource:
  """Opens TFDS `name`/`split` from `data_dir` for random access (no TensorFlow), with the
  image left encoded: every read path decodes with mmjax.data.decode_image.

  `shapes/*` datasets are built on first use. With `label_key`, the feature must be a
  ClassLabel; `class_names` is then the names prompts use, resolved from its names by
  `classnames.resolve_class_names` (the config value `class_names`; WordNet ids refused
  with `refuse_wordnet_ids`); with `text_key`, that feature must exist. A dataset that is not
  in `data_dir`, a missing split or feature raise errors.UsageError naming the config `keys`.
  """
  data_dir = expand_dir(data_dir)
  if name.split("/")[0] == "shapes":
    known = [f"shapes/{c.name}" for c in shapes.Shapes.BUILDER_CONFIGS]
    if name.split(":")[0] not in known:
      raise errors.UsageError(f"dataset {name!r}{_config(keys.name)} does not exist: the "
                              f"embedded shapes datasets are {', '.join(known)}")
    shapes.ensure_built(name, data_dir)
  builder = _builder(name, data_dir, keys)
  features = builder.info.features
  image_feature = _feature(features, image_key)
  if image_feature is None:
    raise errors.UsageError(
        f"dataset {name!r} has no image feature {image_key!r}{_config(keys.image_key)}; its "
        f"features are {sorted(features.keys())}")
  names = None
  if label_key:
    feat = _feature(features, label_key)
    if not isinstance(feat, tfds.features.ClassLabel):
      raise errors.UsageError(
          f"dataset {name!r}: label_key {label_key!r}{_config(keys.label_key)} is not a "
          f"ClassLabel feature; its features are {sorted(features.keys())}")
    names = classnames.resolve_class_names(feat.names, class_names, key=keys.class_names,
                                           dataset=name, refuse_wordnet_ids=refuse_wordnet_ids)
  if text_key and _feature(features, text_key) is None:
    raise errors.UsageError(
        f"dataset {name!r} has no text feature {text_key!r}{_config(keys.text_key)}; its "
        f"features are {sorted(features.keys())}")
  decoders = _nested(image_key, tfds.decode.SkipDecoding())
  try:
    src = builder.as_data_source(split=split, decoders=decoders)
  except Exception as e:  # not prepared, no such split, a format random access cannot read
    raise _open_error(builder, name, split, data_dir, keys, e) from None
  return OpenedSource(name=name, split=split, data_source=src, class_names=names)


def _config(key: str) -> str:
  return f" (config {key})" if key else ""


def _builder(name: str, data_dir: str, keys: ConfigKeys) -> Any:
  """tfds.builder, or the prepared files alone when the catalog builder's code needs
  TensorFlow (coco_captions); TFDS's warnings about absent folders and its banner about
  TensorFlow are kept quiet (the error raised instead says what to do)."""
  previous = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    try:
      with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints a banner when TF is absent
        return tfds.builder(name, data_dir=data_dir)
    except ImportError:
      return read_only_builder.builder_from_files(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise errors.UsageError(_missing(name, data_dir, keys)) from None
  except ValueError as e:  # an unparsable name, e.g. "My-Pets"
    raise errors.UsageError(
        f"dataset name {name!r}{_config(keys.name)} is not a TFDS name "
        f"({errors.one_line(str(e)).split('. ')[0]})") from None
  finally:
    logging.set_verbosity(previous)


def _missing(name: str, data_dir: str, keys: ConfigKeys) -> str:
  held = sorted(d for d in (os.listdir(data_dir) if os.path.isdir(data_dir) else [])
                if os.path.isdir(os.path.join(data_dir, d)) and not d.startswith(".")
                and d not in ("tokenizers", "downloads"))
  where = (f"{data_dir} (config {keys.data_dir}; it holds {', '.join(held)})" if held else
           f"{data_dir} (config {keys.data_dir}; it holds no datasets)")
  base = name.split(":")[0].split("/")[0]
  if base in tfds.list_builders(with_community_datasets=False):
    make = (f"prepare it with `tfds build {name.split(':')[0]} --data_dir {data_dir} "
            "--file_format=array_record`")
  else:
    make = f"import your images as {base!r} with `python -m mmjax.data.build`"
  return (f"dataset {name!r}{_config(keys.name)} is not in {where}: point the config at the "
          f"folder that holds it, or {make}")


def _open_error(builder: Any, name: str, split: str, data_dir: str, keys: ConfigKeys,
                error: Exception) -> errors.UsageError:
  with shapes.quiet_tfds():  # "Variant folder ... has no dataset_info.json"
    prepared = builder.is_prepared()
  if not prepared:
    return errors.UsageError(_missing(name, data_dir, keys))
  splits = sorted(builder.info.splits.keys())
  base = split.split("[")[0]
  if base not in splits:
    return errors.UsageError(
        f"dataset {name!r} has no split {base!r}{_config(keys.split)}; it has "
        f"{', '.join(splits)} (datasets made by `python -m mmjax.data.build` get a "
        "'validation' split with --val_fraction)")
  first = errors.one_line(str(error)).split(". ")[0]
  hint = (" (mmjax reads array_record datasets: prepare it with --file_format=array_record)"
          if isinstance(error, NotImplementedError) else "")
  return errors.UsageError(f"cannot read dataset {name!r} split {split!r} in {data_dir}: "
                           f"{first}{hint}")


def _feature(features: Any, key: str) -> Any:
  for part in key.split("/"):
    if part not in features.keys():
      return None
    features = features[part]
  return features


def _nested(key: str, value: Any) -> dict:
  """"a/b" -> {"a": {"b": value}}: TFDS decoders mirror the nesting of features."""
  *parents, leaf = key.split("/")
  out = {leaf: value}
  for part in reversed(parents):
    out = {part: out}
  return out


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
      raise errors.UsageError(f"config data.sources.{key}.kind={kind!r}; expected one of "
                              f"{KINDS}")
    if kind == "label" and not label_key:
      raise errors.UsageError(f"config data.sources.{key}.label_key is required for "
                              "kind='label'")
    if kind == "caption" and not text_key:
      raise errors.UsageError(f"config data.sources.{key}.text_key is required for "
                              "kind='caption'")
    if len(opened) == 0:
      raise errors.UsageError(f"source {key!r} ({opened.name}, split {opened.split}) is empty")
    self.opened, self.key, self.source_index, self.kind = opened, key, source_index, kind
    self.image_key, self.label_key, self.text_key = image_key, label_key, text_key
    self.label_offset = label_offset

  def __len__(self) -> int:
    return len(self.opened)

  def _try(self, j: int) -> dict[str, Any] | None:
    try:
      rec = self.opened.data_source[j]
    except Exception:  # an unreadable record is a bad record too
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
    try:
      image = decode_image(field(rec, self.image_key))
    except Exception:  # any undecodable image is a bad record; counted, not fatal
      return None
    return {"image": image, "label": np.int32(label), "texts": texts,
            "source": np.int32(self.source_index)}

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self)
    for k in range(n):
      out = self._try((int(index) + k) % n)
      if out is not None:
        out["skipped"] = np.int32(k)
        return out
    wanted = "a decodable image" + (" and a non-blank caption" if self.kind == "caption" else "")
    raise errors.UsageError(
        f"source {self.key!r} ({self.opened.name}, split {self.opened.split}): none of its "
        f"{n} records has {wanted}; check the dataset and its image_key / text_key")


@dataclasses.dataclass
class TrainSources:
  """The configured train sources in sorted key order and their unified label space."""
  keys: list[str]
  sources: list[CleanSource]
  weights: list[float]
  class_names: list[str]  # unified label space; class id = index


def _source_dir(config: ml_collections.ConfigDict, s: ml_collections.ConfigDict) -> str:
  return expand_dir(s.data_dir or config.data_dir)


def active_source_keys(config: ml_collections.ConfigDict) -> list[str]:
  """The keys of `config.data.sources` with weight > 0, sorted: a source with weight 0 is off
  (locked configs cannot drop keys: `--config.data.sources.labels.weight=0`)."""
  return sorted(k for k, s in config.data.sources.items() if s.weight > 0)


def open_configured_source(config: ml_collections.ConfigDict, key: str) -> OpenedSource:
  """`config.data.sources[key]`, opened; a label source's names are the prompt names."""
  s = config.data.sources[key]
  is_label = s.kind == "label"
  return open_source(s.name, s.split, _source_dir(config, s), image_key=s.image_key,
                     label_key=s.label_key if is_label else "",
                     text_key=s.text_key if s.kind == "caption" else "",
                     class_names=s.class_names,
                     refuse_wordnet_ids=is_label and not config.data.allow_wordnet_ids,
                     keys=ConfigKeys.of_source(config, key))


def open_train_sources(config: ml_collections.ConfigDict) -> TrainSources:
  """Opens every active `config.data.sources.*` (sorted by key) with unified label offsets."""
  keys = active_source_keys(config)
  if not keys:
    raise errors.UsageError("config data.sources: no source has a weight > 0")
  out, weights, names = [], [], []
  for i, key in enumerate(keys):
    s = config.data.sources[key]
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
  for key in active_source_keys(config):
    s = config.data.sources[key]
    opened = open_configured_source(config, key)
    if s.kind == "label":
      texts += [t.format(n) for n in opened.class_names for t in templates]
    else:
      for i in range(len(opened)):
        raw = field(opened.data_source[i], s.text_key)
        raw = [raw] if isinstance(raw, (bytes, str)) else list(raw)
        texts += [t for t in (_text(x).strip() for x in raw) if t]
  return texts
