"""WebDataset shards -> a TFDS ArrayRecord dataset, with Apache Beam on any runner.

  # every local core (DirectRunner, one worker process per core):
  python -m mmjax.data.build --webdataset 'shards/{00000..00099}.tar' --name cc_small \
      --data_dir ~/data
  # a Dataflow cluster; arguments after `--` go to Beam unchanged (--dry_run prints all):
  python -m mmjax.data.build --webdataset 'gs://B/cc12m/{00000..01242}.tar' --name cc12m \
      --data_dir gs://B/tfds --runner DataflowRunner -- --project=P --region=R \
      --temp_location=gs://B/beam-tmp --setup_file=./setup.py

The dataset has the features of mmjax's other caption datasets (`image`: encoded bytes as
stored in the tar, `captions`: Sequence(Text)) or, with `--label`, a ClassLabel `label`;
plus `key` (the sample's WebDataset key), `shard` (its shard's name), `url` (from the .json)
and `width`/`height` (of the image training sees). Bad samples are skipped and counted by
cause (mmjax.data.webdataset), never fatal unless --fail_on_skip; the counts per shard and in
total go to `build_report.json` inside the dataset directory.

Layout and determinism. Input shard i (in name order) becomes output shard i, its records
in tar order: the dataset is the same, byte for byte, for any runner and number of
workers. Each worker writes its shards' ArrayRecord files itself; only per-shard summaries
(and, with --dedupe_images, image hashes) travel through Beam, so memory stays at one shard
per worker even on the DirectRunner, which keeps every PCollection in memory. TFDS's own
Beam writer (a GeneratorBasedBuilder whose _generate_examples returns a PTransform) works
without TensorFlow too, but shuffles every serialized example through a GroupByKey: on the
DirectRunner its runner process held ~8x the shards' size and it cost ~11x the folder
builder's CPU per record (benchmarks/RESULTS.md); on Dataflow its ArrayRecord writer cannot
open gs:// paths (tensorflow/datasets#10981). array_record's Beam sink (WriteToArrayRecord)
writes local disks only, in bundle order, without TFDS metadata; its
ConvertToArrayRecordGCS writes a file per element locally and uploads it, which is what
the workers here do (through etils.epath, as TFDS does).
Everything is written into `<data_dir>/<name>/incomplete.<id>_1.0.0` and renamed to
`<data_dir>/<name>/1.0.0` by the pipeline's last step, after the TFDS metadata and the
report, so a failed or killed build never leaves a readable dataset under the final name.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from tensorflow_datasets.core import naming
from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2

from mmjax import errors
from mmjax.data import webdataset


def _import_beam_quietly():
  """apache_beam's import logs "apitools not found..." on the root logger (which also
  installs a root handler) unless apache-beam[gcp] is installed; only Dataflow needs it."""
  root, handler = logging.getLogger(), logging.NullHandler()
  root.addHandler(handler)
  try:
    import apache_beam  # pylint: disable=import-outside-toplevel
    from apache_beam.options import pipeline_options  # pylint: disable=import-outside-toplevel
  finally:
    root.removeHandler(handler)
  return apache_beam, pipeline_options.PipelineOptions


beam, PipelineOptions = _import_beam_quietly()

VERSION = "1.0.0"
SPLIT = "train"
REPORT_FILE = "build_report.json"
# Random access needs one record per chunk (TFDS's setting). JPEG/PNG/WebP bytes do not
# compress: ArrayRecord's default compression took 0.10 ms of CPU per 35 kB JPEG here for
# the same file size, uncompressed 0.02 ms.
ARRAY_RECORD_OPTIONS = "group_size:1,uncompressed"
FAILED_MARK = "FAILED"  # in the temporary directory: a --fail_on_skip stop; other shards stop
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class BuildError(errors.UsageError):
  """A user-facing problem (bad flag, no shard, a fatal skip): reported as one line."""


@dataclasses.dataclass(frozen=True)
class BuildOptions:
  """One build. `rules` decide each sample (mmjax.data.webdataset.SampleRules).

  class_names_file: label layout only; one class name per line, line i = class id i (a
    .cls/.json label is a name or a decimal id). Empty: the classes seen in the shards
    (webdataset.class_names_from_labels), found by an extra pass that reads the shards
    without decoding images.
  dedupe_images: drop exact duplicate images (same SHA-256 of the encoded bytes); the copy
    that survives is the first in (shard name, tar position) order.
  fail_on_skip: stop the build at the first skipped sample or bad shard (filters are not
    skips).
  """
  pattern: str
  name: str
  data_dir: str
  rules: webdataset.SampleRules = webdataset.SampleRules()
  class_names_file: str = ""
  dedupe_images: bool = False
  fail_on_skip: bool = False

  @property
  def layout(self) -> str:
    return "label" if self.rules.label else "caption"

  def validate(self) -> None:
    if not _NAME.match(self.name):
      raise BuildError(f"--name={self.name!r}: use lower case letters, digits and _, starting "
                       "with a letter (TFDS dataset names)")
    if not self.pattern.strip():
      raise BuildError("--webdataset is empty: give a shard pattern, e.g. "
                       "'shards/{00000..00099}.tar'")
    try:
      self.rules.validate()
    except ValueError as e:
      raise BuildError(str(e)) from e
    if self.class_names_file and not self.rules.label:
      raise BuildError("--class_names is for label datasets: add --label=cls or --label=json:FIELD")


def features(layout: str, class_names: Sequence[str] | None = None) -> tfds.features.FeaturesDict:
  """The dataset's features; `class_names` for the label layout."""
  target = ({"label": tfds.features.ClassLabel(names=list(class_names))} if layout == "label"
            else {"captions": tfds.features.Sequence(tfds.features.Text())})
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)), **target,
      "key": tfds.features.Text(), "shard": tfds.features.Text(), "url": tfds.features.Text(),
      "width": tfds.features.Scalar(np.int32), "height": tfds.features.Scalar(np.int32)})


def read_class_names(path: str) -> list[str]:
  try:
    lines = epath.Path(os.path.expanduser(path)).read_text().splitlines()
  except Exception as e:
    raise BuildError(f"--class_names={path}: cannot read ({e})") from e
  names = [line.strip() for line in lines if line.strip()]
  repeated = sorted(n for n, c in collections.Counter(names).items() if c > 1)
  if not names or repeated:
    raise BuildError(f"--class_names={path}: " + (f"repeated names {repeated[:5]}" if repeated
                                                  else "no class names"))
  return names


# ---------------------------------------------------------------------------------------
# Per-shard work (runs on Beam workers)


@dataclasses.dataclass(frozen=True)
class _Target:
  """Where and what a build writes (pickled into every worker)."""
  options: BuildOptions
  tmp_dir: str
  final_dir: str
  num_shards: int

  def shard_path(self, index: int) -> str:
    template = naming.ShardedFileTemplate(
        data_dir=epath.Path(self.tmp_dir), dataset_name=self.options.name, split=SPLIT,
        filetype_suffix="array_record")
    return os.fspath(template.sharded_filepath(shard_index=index, num_shards=self.num_shards))


def _empty_stats(shard: webdataset.Shard) -> dict[str, Any]:
  return {"index": shard.index, "shard": shard.name, "status": "ok", "error": "", "fatal": "",
          "read": 0, "written": 0, "bytes": 0,
          "skipped": collections.Counter(), "filtered": collections.Counter()}


def _stop_all(target: _Target, stats: dict[str, Any], message: str) -> None:
  """--fail_on_skip: records why in this shard's stats and tells the other shards to stop
  (a file, not an exception: a worker's exception prints its traceback on every runner)."""
  stats["fatal"] = f"{message}; --fail_on_skip is set"
  (epath.Path(target.tmp_dir) / FAILED_MARK).write_text(stats["fatal"])


def _stopped(target: _Target, stats: dict[str, Any]) -> bool:
  """True (and the shard marked not_read) when another shard stopped the build."""
  if target.options.fail_on_skip and (epath.Path(target.tmp_dir) / FAILED_MARK).exists():
    stats["status"] = "not_read"
    return True
  return False


def _scan(shard: webdataset.Shard, target: _Target, classes: dict[str, int] | None,
          stats: dict[str, Any]) -> Iterator[tuple[int, webdataset.CheckedSample]]:
  """Kept samples of `shard` as (tar position, sample); everything else counted in stats.
  With --fail_on_skip, stops at the first skipped sample or bad shard."""
  options = target.options
  if _stopped(target, stats):
    return
  try:
    for sample in webdataset.iter_samples(shard.path):
      stats["read"] += 1
      outcome = webdataset.check_sample(sample, shard.name, options.rules, classes)
      if not isinstance(outcome, str):
        yield sample.index, outcome
        continue
      kind = "skipped" if outcome in webdataset.SKIP_CAUSES else "filtered"
      stats[kind][outcome] += 1
      if options.fail_on_skip and kind == "skipped":
        _stop_all(target, stats, f"{shard.path}: sample {sample.key!r} skipped ({outcome})")
        return
  except webdataset.UnreadableShard as e:
    stats.update(status="unreadable", error=str(e))
  except webdataset.TruncatedShard as e:
    stats.update(status="truncated", error=str(e))
    if e.lost_sample:
      stats["read"] += 1
      stats["skipped"][webdataset.TRUNCATED_SHARD] += 1
  if options.fail_on_skip and stats["status"] != "ok":
    _stop_all(target, stats, f"{shard.path}: {stats['status']} shard ({stats['error']})")


class _RecordFile:
  """Writes one ArrayRecord file atomically: at `path` when local, else via a local temp
  file copied up (ArrayRecord's writer needs a local file)."""

  def __init__(self, path: str):
    self.path = path
    self.remote = "://" in path
    if self.remote:
      self._dir = tempfile.mkdtemp(prefix="mmjax_shard_")
      self._local = os.path.join(self._dir, "shard.array_record")
    else:
      self._local = os.path.join(os.path.dirname(path),
                                 f"incomplete.{uuid.uuid4().hex}.{os.path.basename(path)}")
    self._writer = ArrayRecordWriter(self._local, ARRAY_RECORD_OPTIONS)
    self.bytes = 0

  def write(self, record: bytes) -> None:
    self._writer.write(record)
    self.bytes += len(record)

  def close(self) -> None:
    self._writer.close()
    if not self.remote:
      os.replace(self._local, self.path)
      return
    with open(self._local, "rb") as src, epath.Path(self.path).open("wb") as dst:
      shutil.copyfileobj(src, dst, 16 << 20)
    shutil.rmtree(self._dir, ignore_errors=True)


def _bytes_feature(values: list[bytes]) -> tf_feature_pb2.Feature:
  return tf_feature_pb2.Feature(bytes_list=tf_feature_pb2.BytesList(value=values))


def _int_feature(value: int) -> tf_feature_pb2.Feature:
  return tf_feature_pb2.Feature(int64_list=tf_feature_pb2.Int64List(value=[value]))


def serialize_example(example: dict[str, Any]) -> bytes:
  """The record of one example: the tf.train.Example that TFDS writes for `features()`,
  built directly. TFDS's generic serializer (features.serialize_example: numpy
  conversions, shape checks, per-feature dispatch in Python) took 0.16 ms of CPU per
  35 kB JPEG record here, a third of the whole per-record cost; this takes 0.07 ms.
  tests/test_webdataset.py checks the bytes equal TFDS's own for both layouts. Map entries
  are written in key order (deterministic=True): protobuf's default order differs between
  processes, which made equal records differ byte for byte between workers."""
  feature = {name: _bytes_feature([example[name].encode()]) for name in ("key", "shard", "url")}
  feature.update(image=_bytes_feature([example["image"]]),
                 width=_int_feature(example["width"]), height=_int_feature(example["height"]))
  if "captions" in example:
    feature["captions"] = _bytes_feature([c.encode() for c in example["captions"]])
  else:
    feature["label"] = _int_feature(example["label"])
  proto = tf_example_pb2.Example(features=tf_feature_pb2.Features(feature=feature))
  return proto.SerializeToString(deterministic=True)


class _ShardDoFn(beam.DoFn):
  """Base: caches the class lookup per worker process."""

  def __init__(self, target: _Target):
    self.target = target
    self._prepared_for: list | None = None

  def _prepare(self, class_names: Sequence[str] | None) -> None:
    names = list(class_names) if class_names is not None else None
    if self._prepared_for != [names]:
      self._classes = webdataset.class_index(names) if names is not None else None
      self._prepared_for = [names]


class WriteShard(_ShardDoFn):
  """Shard -> its ArrayRecord file (kept samples in tar order); yields its stats."""

  def process(self, shard: webdataset.Shard, class_names: Sequence[str] | None = None
              ) -> Iterator[dict[str, Any]]:
    self._prepare(class_names)
    stats = _empty_stats(shard)
    out = _RecordFile(self.target.shard_path(shard.index))
    for _, checked in _scan(shard, self.target, self._classes, stats):
      out.write(serialize_example(checked.example))
      stats["written"] += 1
    out.close()
    stats["bytes"] = out.bytes
    yield stats


class PlanShard(_ShardDoFn):
  """Dedup pass 1: checks every sample; yields (shard index, plan). The plan holds the
  shard's stats and, per kept tar position, its example without the image bytes and the
  image hash (a few hundred bytes per sample)."""

  def process(self, shard: webdataset.Shard, class_names: Sequence[str] | None = None
              ) -> Iterator[tuple[int, dict[str, Any]]]:
    self._prepare(class_names)
    stats = _empty_stats(shard)
    kept = {}
    for position, checked in _scan(shard, self.target, self._classes, stats):
      example = dict(checked.example)
      del example["image"]
      kept[position] = (example, checked.image_sha256())
    yield shard.index, {"shard": shard, "stats": stats, "kept": kept}


def _copies(item: tuple[int, dict[str, Any]]) -> Iterator[tuple[bytes, tuple[str, int, int]]]:
  index, plan = item
  for position, (_, sha) in plan["kept"].items():
    yield sha, (plan["shard"].name, position, index)


def _duplicates(item: tuple[bytes, Iterable[tuple[str, int, int]]]) -> Iterator[tuple[int, int]]:
  """All copies of one image but the first in (shard name, tar position) order."""
  _, copies = item
  for _, position, index in sorted(copies)[1:]:
    yield index, position


class WritePlannedShard(_ShardDoFn):
  """Dedup pass 2: (index, {plan, dropped}) -> the shard's file with the planned samples
  minus the dropped duplicates, image bytes read again from the tar; yields its stats."""

  def process(self, item: tuple[int, dict[str, list]], class_names: Sequence[str] | None = None
              ) -> Iterator[dict[str, Any]]:
    self._prepare(class_names)
    (plan,), dropped = item[1]["plan"], set(item[1]["dropped"])
    stats, keep = plan["stats"], plan["kept"]
    stats["filtered"][webdataset.DUPLICATE_IMAGE] += len(dropped)
    out = _RecordFile(self.target.shard_path(item[0]))
    wanted = sorted(set(keep) - dropped)
    if wanted:
      for sample in _samples_at(plan["shard"], wanted):
        example = dict(keep[sample.index][0], image=webdataset.image_member(sample.members))
        out.write(serialize_example(example))
        stats["written"] += 1
    out.close()
    stats["bytes"] = out.bytes
    yield stats


def _samples_at(shard: webdataset.Shard, positions: list[int]) -> Iterator[webdataset.RawSample]:
  """The samples at sorted tar `positions` (read again; pass 1 saw them whole)."""
  wanted, last = set(positions), positions[-1]
  try:
    for sample in webdataset.iter_samples(shard.path):
      if sample.index in wanted:
        yield sample
      if sample.index >= last:
        return
  except webdataset.TruncatedShard:
    pass  # pass 1 planned only samples before the break
  raise RuntimeError(f"{shard.path} changed during the build (sample {last} is gone)")


def _shard_labels(shard: webdataset.Shard, label: str) -> Iterator[str]:
  """Label values of the samples of `shard` that have an image and valid metadata."""
  try:
    for sample in webdataset.iter_samples(shard.path):
      meta = webdataset.metadata(sample.members)
      if meta is not None and webdataset.image_member(sample.members) is not None:
        value = webdataset.label_value(sample.members, meta, label)
        if value:
          yield value
  except (webdataset.UnreadableShard, webdataset.TruncatedShard):
    pass  # counted by the main pass


# ---------------------------------------------------------------------------------------
# The pipeline's last step: report, TFDS metadata, rename


def _totals(per_shard: list[dict[str, Any]], layout: str) -> dict[str, Any]:
  """Counts over all shards, every cause of the layout listed (zeros too)."""
  other = ({webdataset.NO_CAPTION, webdataset.CAPTION_NOT_UTF8, webdataset.CAPTION_TOO_SHORT,
            webdataset.CAPTION_TOO_LONG} if layout == "label"
           else {webdataset.NO_LABEL, webdataset.UNKNOWN_CLASS})
  skipped = {c: sum(s["skipped"].get(c, 0) for s in per_shard)
             for c in webdataset.SKIP_CAUSES if c not in other}
  filtered = {c: sum(s["filtered"].get(c, 0) for s in per_shard)
              for c in webdataset.FILTER_CAUSES if c not in other}
  status = collections.Counter(s["status"] for s in per_shard)
  return {
      "shards": {"total": len(per_shard), "ok": status["ok"], "truncated": status["truncated"],
                 "unreadable": status["unreadable"]},
      "samples": {"read": sum(s["read"] for s in per_shard),
                  "written": sum(s["written"] for s in per_shard),
                  "skipped": skipped, "filtered": filtered}}


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
  return {cause: n for cause, n in sorted(counts.items()) if n}


def make_report(options: BuildOptions, per_shard: list[dict[str, Any]],
                class_names: Sequence[str] | None) -> dict[str, Any]:
  """The build report: options, totals, and every shard's counts (non-zero causes only).
  Deterministic: no times or paths of temporary files."""
  shards = [{"shard": s["shard"], "status": s["status"], "error": s["error"], "read": s["read"],
             "written": s["written"], "skipped": _nonzero(s["skipped"]),
             "filtered": _nonzero(s["filtered"])}
            for s in sorted(per_shard, key=lambda s: s["index"])]
  rules = dataclasses.asdict(options.rules)
  report = {"dataset": options.name, "version": VERSION, "layout": options.layout,
            "pattern": options.pattern,
            "options": {**rules, "class_names_file": options.class_names_file,
                        "dedupe_images": options.dedupe_images,
                        "fail_on_skip": options.fail_on_skip},
            **_totals(per_shard, options.layout)}
  if class_names is not None:
    report["num_classes"] = len(class_names)
  report["per_shard"] = shards
  return report


def _outcome_line(totals: dict[str, Any]) -> str:
  samples, shards = totals["samples"], totals["shards"]
  parts = [f"{n} {c}" for kind in ("skipped", "filtered") for c, n in samples[kind].items() if n]
  return (f"{shards['total']} shards ({shards['unreadable']} unreadable, {shards['truncated']} "
          f"truncated), {samples['read']} samples read, {samples['written']} written"
          + (f" ({', '.join(parts)})" if parts else ""))


def _failure(report: dict[str, Any], per_shard: list[dict[str, Any]], options: BuildOptions,
             final: epath.Path) -> str:
  """Why the build must not be published ("" if it may be)."""
  fatal = [s["fatal"] for s in sorted(per_shard, key=lambda s: s["index"]) if s["fatal"]]
  if fatal:
    return fatal[0]
  if report["shards"]["unreadable"] == len(per_shard):
    first = report["per_shard"][0]
    return (f"no readable shard among the {len(per_shard)} matching {options.pattern!r} "
            f"(first: {first['shard']}: {first['error']})")
  if report["samples"]["written"] == 0:
    return f"no sample survived: {_outcome_line(report)}"
  if final.exists():
    return f"{final} appeared during the build; remove one of the two"
  return ""


def finalize(per_shard: list[dict[str, Any]], class_names: Sequence[str] | None,
             target: _Target) -> None:
  """Writes the report into the temporary directory, then, unless the build failed (the
  report's "error" says why; the launcher reports it), the TFDS metadata, and renames the
  directory to the final one."""
  options, tmp, final = target.options, epath.Path(target.tmp_dir), epath.Path(target.final_dir)
  if not tmp.exists() and (final / REPORT_FILE).exists():
    return  # a retried last step: the rename already happened
  report = make_report(options, per_shard, class_names)
  samples = report["samples"]
  lost = sum(samples["skipped"].values()) + sum(samples["filtered"].values())
  if not any(s["fatal"] for s in per_shard) and samples["read"] != samples["written"] + lost:
    raise AssertionError(f"{samples['read']} samples read != {samples['written']} written + "
                         f"{lost} skipped or filtered")  # every sample has one outcome
  report["error"] = _failure(report, per_shard, options, final)
  (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
  if report["error"]:
    return
  template = naming.ShardedFileTemplate(data_dir=tmp, dataset_name=options.name, split=SPLIT,
                                        filetype_suffix="array_record")
  ordered = sorted(per_shard, key=lambda s: s["index"])
  split = tfds.core.SplitInfo(name=SPLIT, shard_lengths=[s["written"] for s in ordered],
                              num_bytes=sum(s["bytes"] for s in ordered),
                              filename_template=template)
  tfds.folder_dataset.write_metadata(
      data_dir=tmp, features=features(options.layout, class_names), split_infos=[split],
      filename_template=template, version=VERSION, check_data=False,
      description=f"WebDataset shards {options.pattern} built by mmjax.data.build "
                  f"(report: {REPORT_FILE}).")
  _publish(tmp, final)


def _publish(tmp: epath.Path, final: epath.Path) -> None:
  """Moves the finished build to its final name. Locally one atomic rename. Object stores
  (gs://) have no directory rename (a copy per file), so there the metadata goes last:
  TFDS reads a directory as a dataset only once its dataset_info.json exists."""
  if "://" not in os.fspath(tmp):
    tmp.rename(final)
    return
  final.mkdir(parents=True)
  last = ["features.json", "dataset_info.json"]
  names = sorted(p.name for p in tmp.iterdir())
  for name in [n for n in names if n not in last] + [n for n in last if n in names]:
    (tmp / name).copy(final / name)
  tmp.rmtree()


# ---------------------------------------------------------------------------------------
# The pipeline


def build_pipeline(pipeline: beam.Pipeline, target: _Target, shards: list[webdataset.Shard],
                   class_names: list[str] | None) -> None:
  """Adds the build to `pipeline` (see the module doc for the data flow)."""
  options = target.options
  shard_pc = (pipeline | "Shards" >> beam.Create(shards)
              | "Spread" >> beam.Reshuffle())  # one shard per work item on any runner
  names_side = ()
  if options.layout == "label":
    if class_names is None:
      names = (shard_pc
               | "Labels" >> beam.FlatMap(_shard_labels, label=options.rules.label)
               | "DistinctLabels" >> beam.Distinct()
               | "AllLabels" >> beam.combiners.ToList()
               | "ClassNames" >> beam.Map(lambda v: webdataset.class_names_from_labels(set(v))))
    else:
      names = pipeline | "ClassNames" >> beam.Create([class_names])
    names_side = (beam.pvalue.AsSingleton(names),)
  if options.dedupe_images:
    plans = shard_pc | "Check" >> beam.ParDo(PlanShard(target), *names_side)
    dropped = (plans
               | "Hashes" >> beam.FlatMap(_copies)
               | "GroupCopies" >> beam.GroupByKey()
               | "Duplicates" >> beam.FlatMap(_duplicates))
    stats = ({"plan": plans, "dropped": dropped}
             | "Join" >> beam.CoGroupByKey()
             | "Write" >> beam.ParDo(WritePlannedShard(target), *names_side))
  else:
    stats = shard_pc | "Write" >> beam.ParDo(WriteShard(target), *names_side)
  finalize_side = names_side or (beam.pvalue.AsSingleton(
      pipeline | "NoClassNames" >> beam.Create([None])),)
  _ = (stats
       | "AllStats" >> beam.combiners.ToList()
       | "Finalize" >> beam.Map(finalize, *finalize_side, target=target))


def default_beam_args(runner: str, beam_args: Sequence[str]) -> list[str]:
  """Beam's arguments: --runner, then (DirectRunner) one worker process per core and
  warnings only from them unless `beam_args` say otherwise, then `beam_args` as given."""
  args = [f"--runner={runner}"]
  if runner == "DirectRunner":
    given = " ".join(beam_args)
    if "direct_num_workers" not in given:
      args.append(f"--direct_num_workers={len(os.sched_getaffinity(0))}")
    if "direct_running_mode" not in given:
      args.append("--direct_running_mode=multi_processing")
    if "sdk_harness_log_level" not in given:  # local workers print every bundle's INFO lines
      args.append("--default_sdk_harness_log_level=WARNING")
  return args + list(beam_args)


class _Progress(threading.Thread):
  """Prints shards written / total, rate and ETA every `every` seconds (any runner: it
  watches the output directory)."""

  def __init__(self, target: _Target, every: float = 15.0):
    super().__init__(daemon=True)
    self.target, self.every, self.start_time = target, every, time.time()
    self._stop_event = threading.Event()

  def run(self) -> None:
    total = self.target.num_shards
    suffix = f"-of-{total:05d}"
    while not self._stop_event.wait(self.every):
      try:
        done = sum(1 for p in epath.Path(self.target.tmp_dir).iterdir()
                   if p.name.endswith(suffix) and not p.name.startswith("incomplete."))
      except Exception:  # renamed at the end, or a transient listing error
        continue
      elapsed = time.time() - self.start_time
      eta = elapsed / done * (total - done) if done else float("nan")
      print(f"[build] {done}/{total} shards written, {elapsed:.0f} s elapsed, "
            f"{done / elapsed * 60:.1f} shards/min, ETA {eta:.0f} s", flush=True)

  def stop(self) -> None:
    self._stop_event.set()


def _make_pipeline(runner: str, beam_args: Sequence[str]) -> beam.Pipeline:
  """The Beam pipeline (nothing runs yet); an unknown runner, or one whose extra is not
  installed (DataflowRunner needs apache-beam[gcp]), is a BuildError."""
  try:
    return beam.Pipeline(options=PipelineOptions(default_beam_args(runner, beam_args)))
  except (ImportError, ValueError) as e:
    raise BuildError(f"--runner={runner}: {str(e).splitlines()[0]}") from e


def run_build(options: BuildOptions, runner: str = "DirectRunner",
              beam_args: Sequence[str] = (), progress_every: float = 15.0) -> dict[str, Any]:
  """Builds the dataset and returns its report (see `make_report`). Raises BuildError."""
  options.validate()
  data_dir = os.path.expanduser(options.data_dir)
  final = epath.Path(data_dir) / options.name / VERSION
  if final.exists():
    raise BuildError(
        f"dataset {options.name!r} already exists in {final}; pick another --name or remove it"
        if (final / "dataset_info.json").exists() else
        f"{final} holds an unfinished build (interrupted while copied into place, no "
        "dataset_info.json): remove it and build again")
  class_names = read_class_names(options.class_names_file) if options.class_names_file else None
  pipeline = _make_pipeline(runner, beam_args)
  shards = webdataset.list_shards(options.pattern)
  if not shards:
    raise BuildError(f"--webdataset={options.pattern!r} matches no file")
  stale = sorted(p.name for p in final.parent.glob(f"incomplete.*_{VERSION}")) \
      if final.parent.exists() else []
  if stale:
    print(f"[build] note: {len(stale)} leftover directories of killed builds in {final.parent} "
          f"({stale[0]}...): delete them when no other build of {options.name!r} runs", flush=True)
  tmp = final.parent / f"incomplete.{uuid.uuid4().hex[:12]}_{VERSION}"
  tmp.mkdir(parents=True)
  target = _Target(options=dataclasses.replace(options, data_dir=data_dir), tmp_dir=str(tmp),
                   final_dir=str(final), num_shards=len(shards))
  print(f"[build] {options.name}: {len(shards)} shards ({shards[0].name} .. {shards[-1].name}) "
        f"-> {final} with {runner}", flush=True)
  progress = _Progress(target, progress_every)
  progress.start()
  try:
    with pipeline as p:
      build_pipeline(p, target, shards, class_names)
    if (tmp / REPORT_FILE).exists():  # not renamed: the report says why
      raise BuildError(json.loads((tmp / REPORT_FILE).read_text())["error"])
    return json.loads((final / REPORT_FILE).read_text())
  finally:
    progress.stop()
    if tmp.exists():
      tmp.rmtree(missing_ok=True)


# ---------------------------------------------------------------------------------------
# Command line (flags are defined by mmjax.data.build when run as a script)


def define_flags() -> None:
  flags.DEFINE_string("webdataset", "", "WebDataset shard pattern: braces "
                      "('shards/{00000..00099}.tar') and globs, local or gs://.")
  flags.DEFINE_string("runner", "DirectRunner", "Beam runner: DirectRunner (all local cores), "
                      "DataflowRunner, FlinkRunner, SparkRunner... Beam options go after `--`.")
  flags.DEFINE_string("label", "", "Label dataset: 'cls' (the .cls member) or 'json:FIELD'. "
                      "Empty: caption dataset (.txt, else the .json's caption).")
  flags.DEFINE_string("class_names", "", "Label datasets: file of class names, one per line "
                      "(line i = class id i). Empty: the sorted classes seen in the shards.")
  flags.DEFINE_bool("verify_images", True, "Decode every image (exact undecodable_image "
                    "count). False: header only (3.5x less CPU on 384 px JPEGs).")
  flags.DEFINE_integer("min_image_side", 0, "Drop images with a shorter side below this.")
  flags.DEFINE_float("max_aspect_ratio", 0.0, "Drop images with longer/shorter side above this.")
  flags.DEFINE_integer("min_caption_chars", 0, "Drop captions shorter than this (characters).")
  flags.DEFINE_integer("max_caption_chars", 0, "Drop captions longer than this (0 = no bound).")
  flags.DEFINE_bool("dedupe_images", False, "Keep one copy of byte-identical images (the "
                    "first in shard-name, tar order); reads the shards twice.")
  flags.DEFINE_bool("fail_on_skip", False, "Stop at the first skipped sample or bad shard.")
  flags.DEFINE_bool("dry_run", False, "Print the build and Beam options; read nothing.")


def options_from_flags() -> BuildOptions:
  f = flags.FLAGS
  rules = webdataset.SampleRules(
      label=f.label, verify_images=f.verify_images, min_image_side=f.min_image_side,
      max_aspect_ratio=f.max_aspect_ratio, min_caption_chars=f.min_caption_chars,
      max_caption_chars=f.max_caption_chars)
  return BuildOptions(pattern=f.webdataset, name=f.name, data_dir=f.data_dir, rules=rules,
                      class_names_file=f.class_names, dedupe_images=f.dedupe_images,
                      fail_on_skip=f.fail_on_skip)


def dry_run_text(options: BuildOptions, runner: str, beam_args: Sequence[str]) -> str:
  """The build as it would run: output, options, Beam arguments, the command line."""
  args = default_beam_args(runner, beam_args)
  rules = dataclasses.asdict(options.rules)
  lines = [f"dataset:   {os.path.join(options.data_dir, options.name, VERSION)} "
           f"({options.layout} layout, report {REPORT_FILE} inside)",
           f"shards:    {options.pattern} ({len(webdataset.expand_braces(options.pattern))} "
           "after brace expansion; globs are listed when the build starts)",
           "rules:     " + " ".join(f"{k}={v}" for k, v in rules.items()),
           f"dedupe_images={options.dedupe_images} fail_on_skip={options.fail_on_skip} "
           f"class_names={options.class_names_file or '(classes seen)'}",
           "beam:      " + " ".join(args)]
  flag_args = [f"--webdataset='{options.pattern}'", f"--name={options.name}",
               f"--data_dir={options.data_dir}", f"--runner={runner}"]
  defaults = BuildOptions(pattern="", name="", data_dir="")
  flag_args += [f"--{k}={v}" for k, v in rules.items()
                if v != getattr(defaults.rules, k)]
  flag_args += [f"--{k}" for k in ("dedupe_images", "fail_on_skip") if getattr(options, k)]
  if options.class_names_file:
    flag_args.append(f"--class_names={options.class_names_file}")
  lines.append("command:   python -m mmjax.data.build " + " ".join(flag_args)
               + (" -- " + " ".join(beam_args) if beam_args else ""))
  return "\n".join(lines)


def summary_text(report: dict[str, Any], data_dir: str) -> str:
  source = "labels" if report["layout"] == "label" else "captions"
  directory = os.path.join(data_dir, report["dataset"], report["version"])
  return "\n".join([
      f"Built {report['dataset']} ({report['layout']}) in {directory}: {_outcome_line(report)}",
      f"  report: {os.path.join(directory, REPORT_FILE)}",
      f"  train on it: --config.data.sources.{source}.name={report['dataset']} "
      f"--config.data.sources.{source}.data_dir={data_dir}"])


def main(argv: Sequence[str]) -> None:
  """`python -m mmjax.data.build --webdataset ...`; argv[1:] (after `--`) go to Beam."""
  f = flags.FLAGS
  beam_args = list(argv[1:])
  logging.getLogger("apache_beam").setLevel(logging.WARNING)
  # The DirectRunner relays its worker processes' start-up warnings, which they print too.
  logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(logging.ERROR)
  options = options_from_flags()
  options.validate()
  if f.dry_run:
    print(dry_run_text(options, f.runner, beam_args))
    return
  start = time.time()
  report = run_build(options, f.runner, beam_args)
  print(summary_text(report, os.path.expanduser(options.data_dir))
        + f"\n  took {time.time() - start:.0f} s")
