"""Import local images as TFDS array_record datasets readable by name, TF-free.

  # label dataset from class sub-folders (DIR/<class>/<image>, sub-folders of a class too):
  python -m mmjax.data.build --images_dir DIR --name my_labels --data_dir ~/datasets \
      --val_fraction 0.1
  # caption dataset from a .csv (header with columns image and caption; Excel's "CSV UTF-8"
  # is fine) or a .jsonl ({"image": ..., "caption": ...} per line; a caption may be a list):
  python -m mmjax.data.build --captions_file caps.csv --name my_captions --data_dir ~/datasets
  # caption (or, with --label, label) dataset from WebDataset shards, built with Apache Beam
  # on all local cores or a cluster (pip install -e '.[beam]'; mmjax/ingest/beam.py):
  python -m mmjax.data.build --webdataset 'shards/{00000..00099}.tar' --name my_web \
      --data_dir ~/datasets

Relative image paths in a captions file are resolved against the file's folder; rows of one
image are merged into one record with several captions. Every image is read and decoded
once with mmjax.data.decode_image (the decoder training uses): files that cannot be read
or decoded, and images without a non-blank caption, are left out and listed (`--strict`
makes them fatal). Class folders without images and files that are not images by their
extension are reported as warnings. The dataset is validated before anything is written:
its name, the columns, every row.

Features: `image` (the file's own bytes), `file_name` (the path relative to the images
folder or to the captions file), and `label` (ClassLabel over the class folders that hold
images, sorted) or `captions` (Sequence(Text)). Splits: `train`, and with
`--val_fraction F` a `validation` split: per class (for captions: overall), the
round(F x n) files (at least one when n >= 2) that come first in the order of the
SHA-256 of their file_name, so the split is deterministic and changes little when files
are added. The summary ends with the config overrides that train and evaluate on it.
Read it back with `tfds.data_source(name, split=..., data_dir=...)` or a config source.

Mistakes (a bad --name, a missing column, a malformed row, an existing dataset) are one
line naming the file, line and fix, exit status 2.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator, Sequence

import PIL
import tensorflow_datasets as tfds

from mmjax import errors
from mmjax.data.images import decode_image

IMAGE_EXTS = (".jpg", ".jpeg", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff",
              ".avif")
CSV_DELIMITERS = (",", ";", "\t")  # Excel writes ';' in locales with a decimal comma
SPLITS = ("train", "validation")
_LISTED = 20  # skipped files and warnings listed one per line, then a count


@dataclasses.dataclass
class Record:
  path: str  # the image file
  file_name: str  # relative to the images folder / captions file
  label: str = ""  # class folder name (label datasets)
  captions: list[str] = dataclasses.field(default_factory=list)  # caption datasets
  where: str = ""  # for messages: "pairs.csv line 7"


@dataclasses.dataclass
class BuildReport:
  """What a build wrote and left out; `summary()` is what the CLI prints."""
  name: str
  data_dir: str  # as given (may start with ~)
  dataset_dir: str
  kind: str  # "label" | "caption"
  splits: dict[str, int]
  class_names: list[str] | None
  skipped: list[tuple[str, str]]  # (file or row, reason)
  warnings: list[str]

  def summary(self) -> str:
    total = sum(self.splits.values())
    parts = ", ".join(f"{k} {v}" for k, v in self.splits.items())
    lines = [f"Built {self.kind} dataset {self.name!r} in {self.dataset_dir}",
             f"  records: {total} ({parts})"]
    if self.class_names is not None:
      shown = ", ".join(self.class_names[:_LISTED])
      more = f", ... ({len(self.class_names) - _LISTED} more)" if len(
          self.class_names) > _LISTED else ""
      lines.append(f"  classes: {len(self.class_names)} ({shown}{more})")
    lines.append(f"  skipped: {len(self.skipped)}")
    lines += _listed([f"{where}: {why}" for where, why in self.skipped])
    if self.warnings:
      lines.append(f"  warnings: {len(self.warnings)}")
      lines += _listed(self.warnings)
    lines += ["", "Train on it (in place of one of configs/shapes.py's sources):"]
    lines.append("  " + " ".join(self.train_overrides()))
    evals = self.eval_overrides()
    if evals:
      lines += ["Evaluate on its validation split:", "  " + " ".join(evals)]
    else:
      lines.append("No validation split (--val_fraction 0): point the evaluators elsewhere.")
    return "\n".join(lines)

  def train_overrides(self) -> list[str]:
    if self.kind == "label":
      return [f"--config.data_dir={self.data_dir}",
              f"--config.data.sources.labels.name={self.name}",
              "--config.data.sources.labels.label_key=label"]
    return [f"--config.data_dir={self.data_dir}",
            f"--config.data.sources.captions.name={self.name}",
            "--config.data.sources.captions.text_key=captions"]

  def eval_overrides(self) -> list[str]:
    if "validation" not in self.splits:
      return []
    if self.kind == "label":
      # Trained on, its classes are seen classes (closed-set, configs/shapes.py's
      # evals.seen_classes); evals.zeroshot is for classes no training label has.
      return [f"--config.evals.seen_classes.dataset={self.name}",
              "--config.evals.seen_classes.split=validation",
              "--config.evals.zeroshot.num_examples=0",
              f"--config.evals.linear_probe.dataset={self.name}",
              "--config.evals.linear_probe.train_split=train",
              "--config.evals.linear_probe.split=validation"]
    return [f"--config.evals.retrieval.dataset={self.name}",
            "--config.evals.retrieval.split=validation",
            f"--config.evals.captioning.dataset={self.name}",
            "--config.evals.captioning.split=validation"]


def _listed(items: Sequence[str]) -> list[str]:
  lines = [f"    {item}" for item in items[:_LISTED]]
  if len(items) > _LISTED:
    lines.append(f"    ... and {len(items) - _LISTED} more")
  return lines


# --- names ----------------------------------------------------------------------------
def validate_name(name: str, data_dir: str) -> None:
  """Raises UsageError unless `name` is a new, readable TFDS dataset name in `data_dir`."""
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name or ""):
    fixed = re.sub(r"[^a-z0-9]+", "_", (name or "").lower()).strip("_")
    fixed = fixed if re.match(r"[a-z]", fixed) else f"data_{fixed}".rstrip("_")
    raise errors.UsageError(f"--name {name!r}: TFDS dataset names are lowercase snake_case "
                            f"(a-z, 0-9, _; starting with a letter): use --name {fixed}")
  if name == "shapes" or name in tfds.list_builders(with_community_datasets=False):
    raise errors.UsageError(f"--name {name!r} is a TFDS catalog dataset, so reading it back "
                            f"would use the catalog's builder: pick another, e.g. "
                            f"--name my_{name}")
  existing = os.path.join(os.path.expanduser(data_dir), name)
  if os.path.isdir(existing) and any(not d.startswith(".") for d in os.listdir(existing)):
    raise errors.UsageError(f"dataset {name!r} already exists in {existing}: pick another "
                            "--name, or remove that folder to rebuild it")


# --- inputs ---------------------------------------------------------------------------
def scan_images_dir(images_dir: str) -> tuple[list[Record], list[str], list[str]]:
  """DIR/<class>/**/<image> -> (records, class folder names (sorted), warnings)."""
  root = os.path.expanduser(images_dir)
  if not os.path.isdir(root):
    raise errors.UsageError(f"--images_dir {images_dir}: no such folder")
  entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
  classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
  loose = [e for e in entries if e not in classes]
  if not classes:
    raise errors.UsageError(f"--images_dir {images_dir}: no class sub-folders (put each "
                            "class's images in a folder named after the class)")
  warnings = []
  if loose:
    warnings.append(f"{_count(loose, 'file')} directly in --images_dir ignored (images "
                    f"belong in a class folder): {', '.join(loose[:5])}")
  records, ignored = [], []
  for cls in classes:
    found = 0
    for path in _files_under(os.path.join(root, cls)):
      rel = os.path.relpath(path, root)
      if path.lower().endswith(IMAGE_EXTS):
        records.append(Record(path=path, file_name=rel, label=cls, where=rel))
        found += 1
      else:
        ignored.append(rel)
    if not found:
      warnings.append(f"class folder {cls!r} holds no images: it is not a class")
  if ignored:
    exts = sorted({os.path.splitext(f)[1].lower() or "(none)" for f in ignored})
    warnings.append(f"{_count(ignored, 'file')} ignored, not images by their extension "
                    f"({', '.join(exts)}; read: {', '.join(IMAGE_EXTS)}): "
                    f"{', '.join(ignored[:5])}")
  return records, classes, warnings


def _count(items: Sequence, noun: str) -> str:
  return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _files_under(folder: str) -> Iterator[str]:
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for f in sorted(filenames):
      if not f.startswith("."):  # .DS_Store and friends
        yield os.path.join(dirpath, f)


def read_captions_file(path: str, image_column: str = "image",
                       caption_column: str = "caption") -> list[Record]:
  """.csv/.tsv (header row) or .jsonl -> one Record per row. Raises UsageError naming the
  file and line of a malformed row."""
  full = os.path.expanduser(path)
  if not os.path.isfile(full):
    raise errors.UsageError(f"--captions_file {path}: no such file")
  name = os.path.basename(full)
  text = _read_utf8(full, name)
  if full.lower().endswith((".csv", ".tsv")):
    rows = _csv_rows(text, name, image_column, caption_column)
  elif full.lower().endswith(".jsonl"):
    rows = _jsonl_rows(text, name, image_column, caption_column)
  else:
    raise errors.UsageError(f"--captions_file {path}: expected a .csv, .tsv or .jsonl file")
  base = os.path.dirname(os.path.abspath(full))
  records = []
  for where, image, captions in rows:
    image_path = os.path.join(base, os.path.expanduser(image))
    records.append(Record(path=image_path, file_name=os.path.relpath(image_path, base),
                          captions=[c.strip() for c in captions], where=where))
  if not records:
    raise errors.UsageError(f"{name}: no rows")
  return records


def _read_utf8(path: str, name: str) -> str:
  with open(path, "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8-sig")  # Excel's "CSV UTF-8" starts with a byte-order mark
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise errors.UsageError(f"{name} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                            "save it as UTF-8 (Excel: 'CSV UTF-8')") from None


def _csv_rows(text: str, name: str, image_column: str,
              caption_column: str) -> Iterator[tuple[str, str, list[str]]]:
  header_line = text.splitlines()[0] if text.strip() else ""
  delimiter = next((d for d in CSV_DELIMITERS
                    if {image_column, caption_column} <= _header(header_line, d)), None)
  if delimiter is None:
    columns = sorted(_header(header_line, ","))
    missing = [c for c in (image_column, caption_column) if c not in _header(header_line, ",")]
    flag = {image_column: "--image_column", caption_column: "--caption_column"}
    raise errors.UsageError(
        f"{name}: no column {missing[0]!r} ({flag[missing[0]]}) in the header; its columns "
        f"are {', '.join(repr(c) for c in columns) or 'none'} (the first line must name the "
        f"columns, e.g. {image_column},{caption_column})")
  reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
  try:
    header = [h.strip() for h in next(reader)]
    image_at, caption_at = header.index(image_column), header.index(caption_column)
    for row in reader:
      where = f"{name} line {reader.line_num}"
      if not any(cell.strip() for cell in row):
        continue  # blank line
      if len(row) != len(header):
        raise errors.UsageError(
            f"{where}: {len(row)} fields, the header has {len(header)} (a caption holding "
            f"{delimiter!r} must be in double quotes)")
      if not row[image_at].strip():
        raise errors.UsageError(f"{where}: empty {image_column!r} field")
      yield where, row[image_at].strip(), [row[caption_at]]
  except csv.Error as e:
    raise errors.UsageError(f"{name} line {reader.line_num}: {e}") from None


def _header(line: str, delimiter: str) -> set[str]:
  return {h.strip() for h in next(csv.reader([line], delimiter=delimiter), [])}


def _jsonl_rows(text: str, name: str, image_column: str,
                caption_column: str) -> Iterator[tuple[str, str, list[str]]]:
  for number, line in enumerate(text.splitlines(), start=1):
    where = f"{name} line {number}"
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise errors.UsageError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
      raise errors.UsageError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for column, flag in ((image_column, "--image_column"), (caption_column, "--caption_column")):
      if column not in row:
        raise errors.UsageError(f"{where}: no {column!r} field ({flag}); it has "
                                f"{', '.join(repr(k) for k in row) or 'none'}")
    image, caption = row[image_column], row[caption_column]
    if not isinstance(image, str) or not image.strip():
      raise errors.UsageError(f"{where}: {image_column!r} must be a non-empty path string")
    captions = [caption] if isinstance(caption, str) else caption
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
      raise errors.UsageError(f"{where}: {caption_column!r} must be a string or a list of "
                              f"strings, got {json.dumps(caption)[:40]}")
    yield where, image.strip(), captions


# --- checking, splitting, writing -----------------------------------------------------
def check_images(records: list[Record]) -> tuple[list[Record], list[tuple[str, str]]]:
  """Keeps the records whose file reads and decodes (mmjax.data.decode_image); returns
  (kept, [(file or row, reason)]). Decoding runs on a thread pool (Pillow releases the GIL)."""
  def problem(record: Record) -> str:
    try:
      with open(record.path, "rb") as f:
        data = f.read()
    except OSError as e:
      return f"cannot read ({e.strerror or e})"
    if not data:
      return "empty file"
    try:
      decode_image(data)
    except PIL.UnidentifiedImageError:
      return "not an image (no format Pillow reads)"
    except Exception as e:  # whatever Pillow raises for this file
      return f"not a decodable image ({errors.one_line(str(e)) or type(e).__name__})"
    return ""

  workers = min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    problems = list(pool.map(problem, records))
  kept = [r for r, p in zip(records, problems) if not p]
  return kept, [(_where(r), p) for r, p in zip(records, problems) if p]


def _fail_if_strict(skipped: list[tuple[str, str]], strict: bool) -> None:
  if strict and skipped:
    raise errors.UsageError(f"{len(skipped)} records cannot be used (--strict): " + "; ".join(
        f"{w}: {p}" for w, p in skipped[:3]) + ("; ..." if len(skipped) > 3 else ""))


def _where(record: Record) -> str:
  return record.file_name if record.where == record.file_name else (
      f"{record.where} ({record.file_name})")


def validation_split(groups: dict[str, list[Record]], fraction: float
                     ) -> tuple[list[Record], list[Record]]:
  """(train, validation): per group, the first round(fraction x n) records (>= 1 when
  n >= 2, <= n - 1) in SHA-256 order of their file_name go to validation."""
  train, validation = [], []
  for group in groups.values():
    ordered = sorted(group, key=lambda r: hashlib.sha256(r.file_name.encode()).hexdigest())
    k = 0
    if fraction > 0 and len(group) >= 2:
      k = min(len(group) - 1, max(1, round(fraction * len(group))))
    validation += ordered[:k]
    train += ordered[k:]
  key = lambda r: (r.label, r.file_name)
  return sorted(train, key=key), sorted(validation, key=key)


class _ImportBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the per-dataset builders made by `_builder_class`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Imported with mmjax.data.build."}
  _features: dict
  _splits: dict[str, list[dict]]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    return None  # nothing to download; TFDS's module-path lookup needs importlib_resources

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        self._features))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(examples)
            for split, examples in self._splits.items()}

  def _generate_examples(self, examples: list[dict]) -> Iterator[tuple[int, dict]]:
    for i, ex in enumerate(examples):
      yield i, ex


def write_dataset(name: str, data_dir: str, features: dict,
                  splits: dict[str, list[dict]]) -> str:
  """Writes TFDS dataset `name` (array_record) with `splits` {split: [example dicts]} into
  `data_dir` as given: image features may hold a path or encoded bytes, which are stored
  as-is (also undecodable ones: use check_images first). Returns the dataset folder."""
  splits = {k: v for k, v in splits.items() if v}
  if not splits:
    raise errors.UsageError(f"no examples for dataset {name!r}")
  # A fresh unregistered class per call: TFDS derives the on-disk folder from `name`, and
  # later reads go through the files (tfds.builder_from_files), not this code.
  cls = type(f"Import_{name}", (_ImportBuilder,),
             {"name": name, "_features": features, "_splits": splits},
             skip_registration=True)
  builder = cls(data_dir=os.path.expanduser(data_dir))
  if builder.is_prepared():
    raise errors.UsageError(f"dataset {name!r} already exists in {builder.data_dir}; pick "
                            "another --name or remove it")
  with contextlib.redirect_stdout(io.StringIO()):  # TFDS's "Downloading and preparing..."
    builder.download_and_prepare(file_format="array_record")
  return builder.data_dir


def build_from_images_dir(images_dir: str, name: str, data_dir: str, *,
                          val_fraction: float = 0.0, strict: bool = False) -> BuildReport:
  """DIR/<class>/**/<image files> -> label dataset `name` (image, file_name, label)."""
  validate_name(name, data_dir)
  _check_fraction(val_fraction)
  records, folders, warnings = scan_images_dir(images_dir)
  kept, skipped = check_images(records)
  _fail_if_strict(skipped, strict)
  classes = sorted({r.label for r in kept})
  for folder in folders:
    if folder not in classes and any(r.label == folder for r in records):
      warnings.append(f"class folder {folder!r} holds no decodable image: it is not a class")
  if not classes:
    raise errors.UsageError(f"--images_dir {images_dir}: no decodable images")
  groups = {c: [r for r in kept if r.label == c] for c in classes}
  train, validation = validation_split(groups, val_fraction)
  example = lambda r: {"image": r.path, "file_name": r.file_name,
                       "label": classes.index(r.label)}
  features = {"image": tfds.features.Image(shape=(None, None, 3)),
              "file_name": tfds.features.Text(),
              "label": tfds.features.ClassLabel(names=classes)}
  splits = {"train": [example(r) for r in train],
            "validation": [example(r) for r in validation]}
  out = write_dataset(name, data_dir, features, splits)
  return BuildReport(name=name, data_dir=data_dir, dataset_dir=out, kind="label",
                     splits={k: len(v) for k, v in splits.items() if v}, class_names=classes,
                     skipped=skipped, warnings=warnings)


def build_from_captions_file(captions_file: str, name: str, data_dir: str, *,
                             image_column: str = "image", caption_column: str = "caption",
                             val_fraction: float = 0.0, strict: bool = False) -> BuildReport:
  """Caption file -> caption dataset `name` (image, file_name, captions)."""
  validate_name(name, data_dir)
  _check_fraction(val_fraction)
  rows = read_captions_file(captions_file, image_column, caption_column)
  merged: dict[str, Record] = {}
  for row in rows:  # rows of one image: one record with all its captions
    if row.path in merged:
      merged[row.path].captions += row.captions
    else:
      merged[row.path] = dataclasses.replace(row, captions=list(row.captions))
  records, skipped = [], []
  for record in merged.values():
    record.captions = [c for c in record.captions if c]
    if record.captions:
      records.append(record)
    else:
      skipped.append((_where(record), f"no non-blank {caption_column!r}"))
  kept, unusable = check_images(records)
  skipped += unusable
  _fail_if_strict(skipped, strict)
  if not kept:
    raise errors.UsageError(f"{captions_file}: no row has a decodable image and a caption")
  train, validation = validation_split({"": kept}, val_fraction)
  example = lambda r: {"image": r.path, "file_name": r.file_name, "captions": r.captions}
  features = {"image": tfds.features.Image(shape=(None, None, 3)),
              "file_name": tfds.features.Text(),
              "captions": tfds.features.Sequence(tfds.features.Text())}
  splits = {"train": [example(r) for r in train],
            "validation": [example(r) for r in validation]}
  out = write_dataset(name, data_dir, features, splits)
  return BuildReport(name=name, data_dir=data_dir, dataset_dir=out, kind="caption",
                     splits={k: len(v) for k, v in splits.items() if v}, class_names=None,
                     skipped=skipped, warnings=[])


def _check_fraction(val_fraction: float) -> None:
  if not 0.0 <= val_fraction < 1.0:
    raise errors.UsageError(f"--val_fraction {val_fraction}: must be in [0, 1)")
