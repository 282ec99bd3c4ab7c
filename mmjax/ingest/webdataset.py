"""WebDataset tar shards (img2dataset's layout) read into checked samples; no Beam here.

A shard is a tar, optionally gzipped, whose consecutive members sharing a key form one
sample: `000123.jpg`, `000123.txt`, `000123.json` (and `000123.cls` for labels) are sample
`000123`. As in WebDataset, the key is the member path up to the first dot of its file
name, the rest is the extension (`a/b.seg.png` -> key `a/b`, extension `seg.png`).

Every sample read ends in exactly one outcome, decided in this order (the first that
applies is the one counted):
  skipped (bad data):  no_image, bad_json, no_caption | caption_not_utf8 (caption layout),
                       no_label | unknown_class (label layout), undecodable_image,
                       truncated_shard (the sample being read when its shard ended early)
  filtered (options):  image_too_small, aspect_ratio, caption_too_short, caption_too_long,
                       then duplicate_image (mmjax.ingest.beam, across shards)
  kept.
A shard that cannot be opened or is not a tar is `unreadable` (no sample read from it); one
that ends early is `truncated` (its samples before the break are kept).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

from etils import epath
from PIL import Image

from mmjax.data.images import decode_image  # the one decoder of every read path

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # priority
CAPTION_EXTENSION, JSON_EXTENSION, CLASS_EXTENSION = "txt", "json", "cls"

NO_IMAGE, BAD_JSON, UNDECODABLE_IMAGE, TRUNCATED_SHARD = (
    "no_image", "bad_json", "undecodable_image", "truncated_shard")
NO_CAPTION, CAPTION_NOT_UTF8, NO_LABEL, UNKNOWN_CLASS = (
    "no_caption", "caption_not_utf8", "no_label", "unknown_class")
SKIP_CAUSES = (NO_IMAGE, BAD_JSON, NO_CAPTION, CAPTION_NOT_UTF8, NO_LABEL, UNKNOWN_CLASS,
               UNDECODABLE_IMAGE, TRUNCATED_SHARD)
IMAGE_TOO_SMALL, ASPECT_RATIO, CAPTION_TOO_SHORT, CAPTION_TOO_LONG, DUPLICATE_IMAGE = (
    "image_too_small", "aspect_ratio", "caption_too_short", "caption_too_long",
    "duplicate_image")
FILTER_CAUSES = (IMAGE_TOO_SMALL, ASPECT_RATIO, CAPTION_TOO_SHORT, CAPTION_TOO_LONG,
                 DUPLICATE_IMAGE)

_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACE_GROUP = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


# ---------------------------------------------------------------------------------------
# Shard patterns


@dataclasses.dataclass(frozen=True, order=True)
class Shard:
  """One input shard. `name`: its path relative to the pattern's fixed directory (what the
  report and the `shard` feature show; shards are ordered by it); `index`: its position
  in that order (= the output shard it becomes)."""
  name: str
  path: str
  index: int = 0


def expand_braces(pattern: str) -> list[str]:
  """Shell-style brace expansion, left to right: `{00000..00099}` (zero padding kept: the
  width of the wider bound when either starts with 0), `{a,b,c}`. Braces holding neither a
  range nor a comma are literal."""
  for match in _BRACE_GROUP.finditer(pattern):
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    span = _RANGE.match(body)
    if span:
      lo, hi = span.groups()
      padded = any(len(b.lstrip("-")) > 1 and b.lstrip("-").startswith("0") for b in (lo, hi))
      width = max(len(lo), len(hi)) if padded else 0
      step = 1 if int(hi) >= int(lo) else -1
      choices = [f"{v:0{width}d}" for v in range(int(lo), int(hi) + step, step)]
    elif "," in body:
      choices = body.split(",")
    else:
      continue
    return [p for choice in choices for p in expand_braces(head + choice + tail)]
  return [pattern]


def _fixed_root(pattern: str) -> str:
  """The directory part of `pattern` before its first brace or glob character."""
  cut = min([i for i in (pattern.find(c) for c in "{*?[") if i >= 0], default=len(pattern))
  return pattern[:cut].rpartition("/")[0]


def list_shards(pattern: str) -> list[Shard]:
  """The shards `pattern` names (braces, then globs; local or gs://), ordered by name.

  A brace-expanded path without glob characters is listed even if it does not exist: the
  build reports it as unreadable ("missing"), so a gap in a numbered range is counted, not
  silently ignored. Globs list what exists.
  """
  root = _fixed_root(pattern)
  paths: set[str] = set()
  for expanded in expand_braces(pattern):
    if not _GLOB_CHARS.search(expanded):
      paths.add(expanded)
      continue
    glob_root = _fixed_root(expanded)
    relative = expanded[len(glob_root) + 1:] if glob_root else expanded
    base = epath.Path(glob_root or ".")
    if base.exists():
      paths.update(f"{glob_root}/{p.relative_to(base)}" if glob_root else str(p.relative_to(base))
                   for p in base.glob(relative))
  names = sorted((p[len(root) + 1:] if root else p, p) for p in paths)
  return [Shard(name=name, path=path, index=i) for i, (name, path) in enumerate(names)]


# ---------------------------------------------------------------------------------------
# Reading a shard


@dataclasses.dataclass
class RawSample:
  """Members of one sample: extension (lower case) -> bytes; `index`: position in the shard."""
  index: int
  key: str
  members: dict[str, bytes]


class UnreadableShard(Exception):
  """The shard could not be opened or its first member not read (nothing taken from it)."""


class TruncatedShard(Exception):
  """The shard broke after `samples_read` complete samples; `lost_sample`: whether a sample
  was being read when it broke (it is dropped and counted as truncated_shard)."""

  def __init__(self, message: str, lost_sample: bool):
    super().__init__(message)
    self.lost_sample = lost_sample


def split_member_name(name: str) -> tuple[str, str]:
  """`dir/000123.seg.png` -> (`dir/000123`, `seg.png`), WebDataset's key/extension rule."""
  directory, _, base = name.rpartition("/")
  stem, _, ext = base.partition(".")
  return (f"{directory}/{stem}" if directory else stem), ext.lower()


_END_OF_ARCHIVE = b"\0" * tarfile.BLOCKSIZE


class _LastRead:
  """A file proxy remembering the last block read. tarfile ends iteration silently at a
  missing, cut or garbled header; a complete archive ends with a block of zeros instead,
  so this tells a truncated shard from a complete one."""

  def __init__(self, fileobj: BinaryIO):
    self._fileobj, self.last = fileobj, b""

  def read(self, size: int = -1) -> bytes:
    self.last = self._fileobj.read(size)
    return self.last

  def seek(self, offset: int, whence: int = 0) -> int:
    return self._fileobj.seek(offset, whence)

  def tell(self) -> int:
    return self._fileobj.tell()


def _open_tar(fileobj: BinaryIO) -> tuple[tarfile.TarFile, _LastRead]:
  magic = fileobj.read(2)
  fileobj.seek(0)
  if magic == b"\x1f\x8b":  # .tar.gz
    fileobj = gzip.GzipFile(fileobj=fileobj, mode="rb")
  watcher = _LastRead(fileobj)
  try:  # random-access mode: ~25% faster than stream mode; reads still only go forward
    return tarfile.open(fileobj=watcher, mode="r:"), watcher
  except Exception as e:  # not a tar, empty file, bad gzip header...
    raise UnreadableShard(f"not a readable tar ({e})") from e


def _member_data(tar: tarfile.TarFile, fileobj: _LastRead, info: tarfile.TarInfo) -> bytes:
  """A member's bytes, read straight from the file: tarfile's extractfile wraps every member
  in two file objects, which took a third of the time spent reading a shard here."""
  if info.issparse():
    return tar.extractfile(info).read()
  fileobj.seek(info.offset_data)
  data = fileobj.read(info.size)
  if len(data) != info.size:
    raise tarfile.ReadError("unexpected end of data")
  return data


def _iter_tar(fileobj: BinaryIO) -> Iterator[RawSample]:
  tar, watcher = _open_tar(fileobj)
  index, key, members = 0, None, {}
  try:
    for info in tar:
      if not info.isfile():
        continue
      member_key, ext = split_member_name(info.name)
      if member_key != key and members:  # a new key closes the previous sample
        yield RawSample(index, key, members)
        index, members = index + 1, {}
      key = member_key
      if ext not in members:  # a repeated extension keeps its first member
        members[ext] = _member_data(tar, watcher, info)
  except Exception as e:  # cut member data, corrupt gzip stream, I/O error
    raise TruncatedShard(f"ends early after {index} samples ({e})", key is not None) from e
  if watcher.last != _END_OF_ARCHIVE:
    raise TruncatedShard(f"ends early after {index} samples (no end-of-archive block)",
                         bool(members))
  if members:
    yield RawSample(index, key, members)


def iter_samples(path: str) -> Iterator[RawSample]:
  """Samples of the shard at `path` (local or gs://; tar or tar.gz) in tar order.

  Raises UnreadableShard before the first sample, TruncatedShard after the last complete
  one when the file breaks off (the sample being read then is not yielded).
  """
  try:
    fileobj = epath.Path(path).open("rb")
  except FileNotFoundError as e:
    raise UnreadableShard("missing") from e
  except Exception as e:  # permissions, network
    raise UnreadableShard(f"cannot open ({e})") from e
  with fileobj:
    yield from _iter_tar(fileobj)


# ---------------------------------------------------------------------------------------
# Checking a sample


@dataclasses.dataclass(frozen=True)
class SampleRules:
  """What makes a sample usable, and the filters; see the module doc for the check order.

  Attributes:
    label: "" for a caption dataset (caption from the .txt member, else the .json's
      "caption"); "cls" for labels from the .cls member; "json:FIELD" for a .json field.
    verify_images: decode every image with mmjax.data.decode_image (an exact
      undecodable_image count; a full decode per image). False parses only the header
      (format and size): corrupt pixel data then passes here and is skipped at training time.
    min_image_side: drop images whose shorter side is below this (0 = off).
    max_aspect_ratio: drop images with longer/shorter side above this (0 = off).
    min_caption_chars / max_caption_chars: caption length bounds after stripping
      surrounding white space, in characters (0 = off).
  """
  label: str = ""
  verify_images: bool = True
  min_image_side: int = 0
  max_aspect_ratio: float = 0.0
  min_caption_chars: int = 0
  max_caption_chars: int = 0

  def validate(self) -> None:
    if self.label and self.label != "cls" and not (
        self.label.startswith("json:") and len(self.label) > 5):
      raise ValueError(f"--label={self.label!r}: use 'cls' (the .cls member) or 'json:FIELD'")
    if self.label and (self.min_caption_chars or self.max_caption_chars):
      raise ValueError("caption length bounds apply to caption datasets; drop them with --label")
    for name in ("min_image_side", "max_aspect_ratio", "min_caption_chars", "max_caption_chars"):
      if getattr(self, name) < 0:
        raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
    if 0 < self.max_aspect_ratio < 1:
      raise ValueError("--max_aspect_ratio is longer/shorter side, >= 1; got "
                       f"{self.max_aspect_ratio}")
    if self.max_caption_chars and self.min_caption_chars > self.max_caption_chars:
      raise ValueError("--min_caption_chars exceeds --max_caption_chars")


@dataclasses.dataclass
class CheckedSample:
  """A kept sample: `example` matches the dataset features."""
  example: dict[str, Any]

  def image_sha256(self) -> bytes:
    return hashlib.sha256(self.example["image"]).digest()


def image_member(members: dict[str, bytes]) -> bytes | None:
  return next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)


def label_value(members: dict[str, bytes], meta: dict[str, Any], label: str) -> str:
  """The raw label string of a sample ("" when absent): the .cls text or a .json field."""
  if label == "cls":
    raw = members.get(CLASS_EXTENSION, b"")
    try:
      return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
      return ""
  value = meta.get(label[len("json:"):])
  if isinstance(value, bool):
    return ""
  if isinstance(value, int):
    return str(value)
  return value.strip() if isinstance(value, str) else ""


def metadata(members: dict[str, bytes]) -> dict[str, Any] | None:
  """The parsed .json member ({} when absent), or None when it is not a JSON object."""
  raw = members.get(JSON_EXTENSION)
  if raw is None:
    return {}
  try:
    meta = json.loads(raw)
  except (ValueError, UnicodeDecodeError):
    return None
  return meta if isinstance(meta, dict) else None


def _caption(members: dict[str, bytes], meta: dict[str, Any]) -> str | None:
  """The caption text; "" when absent or blank; None when the .txt is not UTF-8."""
  raw = members.get(CAPTION_EXTENSION)
  if raw is None:
    value = meta.get("caption")
    return value.strip() if isinstance(value, str) else ""
  try:
    return raw.decode("utf-8-sig").strip()
  except UnicodeDecodeError:
    return None


def image_size(encoded: bytes, verify: bool) -> tuple[int, int]:
  """(height, width) of the image training will see; raises if it cannot be decoded.

  verify=False reads the header only (EXIF orientations 5-8 swap the sides, as the decoder
  rotates them upright).
  """
  if verify:
    height, width, _ = decode_image(encoded).shape
    return height, width
  if not encoded:
    raise ValueError("zero-byte image")
  with Image.open(io.BytesIO(encoded)) as img:
    width, height = img.size
    if img.getexif().get(0x0112) in (5, 6, 7, 8):
      width, height = height, width
  return height, width


def class_index(names: Sequence[str]) -> dict[str, int]:
  """Label string -> class id for `names` (id = position)."""
  return {name: i for i, name in enumerate(names)}


def lookup_label(value: str, index: dict[str, int]) -> int | None:
  """Class id of a label string: its name, else a decimal id within range; else None."""
  if value in index:
    return index[value]
  if value.isdigit() and int(value) < len(index):
    return int(value)
  return None


def class_names_from_labels(values: set[str]) -> list[str]:
  """Class names when no names file is given. All-integer labels keep their ids (names
  "0".."max", so a subset of shards does not renumber classes); otherwise the sorted set."""
  if values and all(v.isdigit() for v in values):
    return [str(i) for i in range(max(int(v) for v in values) + 1)]
  return sorted(values)


def check_sample(sample: RawSample, shard_name: str, rules: SampleRules,
                 classes: dict[str, int] | None = None) -> CheckedSample | str:
  """The kept sample's example, or the cause (a SKIP_CAUSES or FILTER_CAUSES name) why not.

  Example fields: image (encoded bytes, as stored in the tar), captions [caption] or label
  (class id from `classes`), key, shard, url (the .json's "url", "" if none), width, height.
  """
  members = sample.members
  encoded = image_member(members)
  if encoded is None:
    return NO_IMAGE
  meta = metadata(members)
  if meta is None:
    return BAD_JSON
  url = meta.get("url") if isinstance(meta.get("url"), str) else ""
  example: dict[str, Any] = {"image": encoded, "key": sample.key, "shard": shard_name, "url": url}
  caption = ""
  if rules.label:
    value = label_value(members, meta, rules.label)
    if not value:
      return NO_LABEL
    label = lookup_label(value, classes or {})
    if label is None:
      return UNKNOWN_CLASS
    example["label"] = label
  else:
    caption = _caption(members, meta)
    if caption is None:
      return CAPTION_NOT_UTF8
    if not caption:
      return NO_CAPTION
    example["captions"] = [caption]
  try:
    height, width = image_size(encoded, rules.verify_images)
  except Exception:  # any undecodable image is a bad sample; counted, not fatal
    return UNDECODABLE_IMAGE
  cause = _filter_cause(rules, height, width, caption)
  if cause:
    return cause
  example.update(width=width, height=height)
  return CheckedSample(example)


def _filter_cause(rules: SampleRules, height: int, width: int, caption: str) -> str:
  short, long = min(height, width), max(height, width)
  if short < rules.min_image_side:
    return IMAGE_TOO_SMALL
  if rules.max_aspect_ratio and long > rules.max_aspect_ratio * short:
    return ASPECT_RATIO
  if not rules.label:
    if len(caption) < rules.min_caption_chars:
      return CAPTION_TOO_SHORT
    if rules.max_caption_chars and len(caption) > rules.max_caption_chars:
      return CAPTION_TOO_LONG
  return ""
