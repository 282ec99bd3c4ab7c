"""WebDataset shards -> a TFDS ArrayRecord dataset, with Apache Beam on any runner.

  # every local core (DirectRunner, one worker process per core):
  python -m mmjax.ingest --webdataset 'shards/{00000..00099}.tar' --name cc_small \
      --data_dir ~/data
  # a Dataflow cluster; arguments after `--` go to Beam unchanged (--dry_run prints all):
  python -m mmjax.ingest --webdataset 'gs://B/cc12m/{00000..01242}.tar' --name cc12m \
      --data_dir gs://B/tfds --runner DataflowRunner -- --project=P --region=R \
      --temp_location=gs://B/beam-tmp --setup_file=./setup.py

The dataset has the features of mmjax's other caption datasets (`image`: encoded bytes as
stored in the tar, `captions`: Sequence(Text)) or, with `--label`, a ClassLabel `label`;
plus `key` (the sample's WebDataset key), `shard` (its shard's name), `url` (from the .json)
and `width`/`height` (of the image training sees). Bad samples are skipped and counted by
cause (mmjax.ingest.webdataset), never fatal unless --fail_on_skip; the counts per shard and
in total go to `build_report.json` inside the dataset directory (mmjax.ingest.report).

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
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from tensorflow_datasets.core import naming

from mmjax.ingest import report as report_lib
from mmjax.ingest import webdataset
from mmjax.ingest.options import (REPORT_FILE, SPLIT, VERSION, BuildError, BuildOptions,
                                  features, read_class_names, serialize_example)


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

# Random access needs one record per chunk (TFDS's setting). JPEG/PNG/WebP bytes do not
# compress: ArrayRecord's default compression took 0.10 ms of CPU per 35 kB JPEG here for
# the same file size, uncompressed 0.02 ms.
ARRAY_RECORD_OPTIONS = "group_size:1,uncompressed"
FAILED_MARK = "FAILED"  # in the temporary directory: a --fail_on_skip stop; other shards stop


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


def finalize(per_shard: list[dict[str, Any]], class_names: Sequence[str] | None,
             target: _Target) -> None:
  """Writes the report into the temporary directory, then, unless the build failed (the
  report's "error" says why; the launcher reports it), the TFDS metadata, and renames the
  directory to the final one."""
  options, tmp, final = target.options, epath.Path(target.tmp_dir), epath.Path(target.final_dir)
  if not tmp.exists() and (final / REPORT_FILE).exists():
    return  # a retried last step: the rename already happened
  report = report_lib.make_report(options, per_shard, class_names)
  samples = report["samples"]
  lost = sum(samples["skipped"].values()) + sum(samples["filtered"].values())
  if not any(s["fatal"] for s in per_shard) and samples["read"] != samples["written"] + lost:
    raise AssertionError(f"{samples['read']} samples read != {samples['written']} written + "
                         f"{lost} skipped or filtered")  # every sample has one outcome
  report["error"] = report_lib.failure(report, per_shard, options, final)
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
  """Builds the dataset and returns its report (see `mmjax.ingest.report.make_report`).
  Raises BuildError."""
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
