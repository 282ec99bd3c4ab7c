"""Import local images as TFDS array_record datasets readable by name, TF-free.

  # label dataset from class sub-folders (DIR/<class>/<image>):
  python -m mmjax.data.build --images_dir DIR --name my_labels --data_dir ~/data
  # caption dataset from a .csv (header: image,caption) or .jsonl ({"image":..,"caption":..});
  # relative image paths are resolved against the file's folder; rows of one image are merged:
  python -m mmjax.data.build --captions_file caps.csv --name my_captions --data_dir ~/data
  # caption (or, with --label, label) dataset from WebDataset shards, built with Apache Beam
  # on all local cores or a cluster (pip install -e '.[beam]'; see mmjax/data/webdataset_build.py):
  python -m mmjax.data.build --webdataset 'shards/{00000..00099}.tar' --name my_web --data_dir ~/data

Read back with `tfds.data_source("my_labels", split="train", data_dir=...)` or from a config
(`source_config("my_labels", kind="label", label_key="label", ...)`). Features: `image`
(encoded bytes stored as-is: undecodable files are kept and skipped at read time, see
mmjax.data.sources.CleanSource), and `label` (ClassLabel, sorted folder names) or
`captions` (Sequence(Text)).
"""
from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterator

import tensorflow_datasets as tfds
from absl import app, flags

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


class _ImportBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the per-dataset builders made by `_builder_class`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Imported with mmjax.data.build."}
  _features: dict
  _examples: list[dict]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    return None  # nothing to download; TFDS's module-path lookup needs importlib_resources

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        self._features))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[int, dict]]:
    for i, ex in enumerate(self._examples):
      yield i, ex


def _builder_class(name: str, features: dict, examples: list[dict]) -> type:
  # A fresh unregistered class per call: TFDS derives the on-disk folder from `name`, and
  # later reads go through the files (tfds.builder_from_files), not this code.
  return type(f"Import_{name}", (_ImportBuilder,),
              {"name": name, "_features": features, "_examples": examples},
              skip_registration=True)


def _write(name: str, data_dir: str, features: dict, examples: list[dict]) -> str:
  if not examples:
    raise ValueError(f"no examples found for dataset {name!r}")
  data_dir = os.path.expanduser(data_dir)
  builder = _builder_class(name, features, examples)(data_dir=data_dir)
  if builder.is_prepared():
    raise FileExistsError(f"dataset {name!r} already exists in {builder.data_dir}; "
                          "pick another --name or remove it")
  builder.download_and_prepare(file_format="array_record")
  return builder.data_dir


def build_from_images_dir(images_dir: str, name: str, data_dir: str) -> str:
  """DIR/<class>/<image files> -> label dataset `name` (features image, label). Returns its dir."""
  images_dir = os.path.expanduser(images_dir)
  classes = sorted(d for d in os.listdir(images_dir)
                   if os.path.isdir(os.path.join(images_dir, d)))
  if not classes:
    raise ValueError(f"--images_dir {images_dir}: no class sub-folders")
  examples = []
  for label, cls in enumerate(classes):
    for f in sorted(os.listdir(os.path.join(images_dir, cls))):
      if f.lower().endswith(IMAGE_EXTS):
        examples.append({"image": os.path.join(images_dir, cls, f), "label": label})
  features = {"image": tfds.features.Image(shape=(None, None, 3)),
              "label": tfds.features.ClassLabel(names=classes)}
  return _write(name, data_dir, features, examples)


def read_captions_file(path: str) -> list[tuple[str, str]]:
  """(image path, caption) rows of a .csv (columns image, caption) or .jsonl file."""
  path = os.path.expanduser(path)
  base = os.path.dirname(os.path.abspath(path))
  if path.endswith(".csv"):
    with open(path, newline="") as f:
      rows = [(r["image"], r["caption"]) for r in csv.DictReader(f)]
  elif path.endswith(".jsonl"):
    with open(path) as f:
      rows = [(d["image"], d["caption"]) for d in map(json.loads, f) if d]
  else:
    raise ValueError(f"--captions_file {path}: expected .csv or .jsonl")
  return [(p if os.path.isabs(p) else os.path.join(base, p), c) for p, c in rows]


def build_from_captions_file(captions_file: str, name: str, data_dir: str) -> str:
  """Caption file -> caption dataset `name` (features image, captions). Returns its dir."""
  by_image: dict[str, list[str]] = {}
  for p, c in read_captions_file(captions_file):
    by_image.setdefault(p, []).append(c)
  examples = [{"image": p, "captions": caps} for p, caps in by_image.items()]
  features = {"image": tfds.features.Image(shape=(None, None, 3)),
              "captions": tfds.features.Sequence(tfds.features.Text())}
  return _write(name, data_dir, features, examples)


def _define_flags() -> None:
  # Defined only when run as a script, so importing this module (tests, benchmarks) never
  # clashes with the importer's own absl flags.
  flags.DEFINE_string("images_dir", "", "Folder of class sub-folders of images.")
  flags.DEFINE_string("captions_file", "", ".csv/.jsonl of (image, caption).")
  flags.DEFINE_string("name", "", "TFDS dataset name to write.")
  flags.DEFINE_string("data_dir", "~/.cache/mmjax/datasets", "TFDS data_dir.")
  try:
    from mmjax.data import webdataset_build  # needs the `beam` extra
  except ImportError:
    flags.DEFINE_string("webdataset", "", "WebDataset shards; needs pip install -e '.[beam]'.")
  else:
    webdataset_build.define_flags()


def main(argv: list[str]) -> None:
  f = flags.FLAGS
  if f.webdataset:
    if f.images_dir or f.captions_file:
      print("error: give exactly one of --images_dir / --captions_file / --webdataset",
            file=sys.stderr)
      sys.exit(2)
    try:
      from mmjax.data import webdataset_build
    except ImportError as e:
      print(f"error: --webdataset needs Apache Beam: pip install -e '.[beam]' ({e})",
            file=sys.stderr)
      sys.exit(2)
    return webdataset_build.main(argv)
  if not f.name or bool(f.images_dir) == bool(f.captions_file):
    raise app.UsageError("give --name and exactly one of --images_dir / --captions_file")
  if f.images_dir:
    out = build_from_images_dir(f.images_dir, f.name, f.data_dir)
  else:
    out = build_from_captions_file(f.captions_file, f.name, f.data_dir)
  print(out)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
