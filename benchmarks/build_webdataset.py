"""Dataset build throughput: the WebDataset Beam build vs the single-process folder/CSV builder.

  python benchmarks/build_webdataset.py [--shards 16] [--per_shard 200] [--side 384]
      [--workers 1,2] [--repeats 3] [--no_tfds_writer]

Data: real photos (scikit-image's astronaut, coffee, chelsea, rocket, ...) cropped,
flipped and resized to side x side JPEGs (quality 90), written once as WebDataset shards
(.jpg/.txt/.json) and once as files plus captions.csv: the same image bytes for every
variant. Each variant runs as its own command, as a user would run it:

  folder_csv          python -m mmjax.data.build --captions_file captions.csv
                      (TFDS's single-process writer; stores the bytes, decodes nothing)
  beam_verify_wN      python -m mmjax.data.build --webdataset ... -- --direct_num_workers=N
                      (multi-process DirectRunner; decodes every image: the default)
  beam_header_wN      the same with --noverify_images (header only: the folder builder's work)
  tfds_beam_writer_wN TFDS's own Beam path (a GeneratorBasedBuilder whose
                      _generate_examples returns a PTransform, header-only checks), the
                      design mmjax.ingest.beam replaces

Figures per variant: wall seconds, records/s, CPU seconds (user+sys of the command and
every process it started). Every variant also runs on two shards of 4 samples, which is
all start-up (Python imports, Beam's worker processes): `startup_s`. The marginal figures
discount it: records/s = (N - 8) / (t - t_small), per worker, and CPU ms per record =
(cpu - cpu_small) / (N - 8), the per-core cost that does not depend on how busy the
machine is (wall figures do, on a shared machine). All variants run in turn, --repeats
times; figures are medians over the rounds. `decode_ms` is
the CPU time of mmjax.data.decode_image alone on these JPEGs (the verify variants' extra
work). The
datasets of the beam variants are compared file by file across worker counts. The last
line is one JSON object with all figures and the CPU model.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import common  # noqa: E402  benchmarks/common.py
from mmjax.data.sources import decode_image  # noqa: E402

TFDS_WRITER_SCRIPT = r'''
import glob, sys, apache_beam as beam, numpy as np, tensorflow_datasets as tfds
from apache_beam.options.pipeline_options import PipelineOptions
from mmjax.ingest import webdataset

RULES = webdataset.SampleRules(verify_images=False)

def examples(shard):
  for sample in webdataset.iter_samples(shard.path):
    out = webdataset.check_sample(sample, shard.name, RULES)
    if not isinstance(out, str):
      yield f"{shard.name}/{sample.index}", out.example

class TfdsBeamBuild(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  VERSION = tfds.core.Version("1.0.0")
  name = "tfds_beam_writer"
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None
  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "captions": tfds.features.Sequence(tfds.features.Text()),
        "key": tfds.features.Text(), "shard": tfds.features.Text(), "url": tfds.features.Text(),
        "width": tfds.features.Scalar(np.int32), "height": tfds.features.Scalar(np.int32)}))
  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}
  def _generate_examples(self):
    shards = webdataset.list_shards(sys.argv[1])
    return beam.Create(shards) | beam.Reshuffle() | beam.FlatMap(examples)

TfdsBeamBuild(data_dir=sys.argv[2], file_format="array_record").download_and_prepare(
    download_config=tfds.download.DownloadConfig(beam_options=PipelineOptions(sys.argv[3:])))
'''


def photos() -> list[np.ndarray]:
  """The colour photos scikit-image ships (no download)."""
  import skimage.data
  return [getattr(skimage.data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket",
                                                "hubble_deep_field", "cat")]


def jpeg_variants(n: int, side: int, seed: int = 0) -> list[bytes]:
  """n distinct JPEGs: random crops (50-100% of each side) of real photos, some flipped,
  resized to side x side."""
  rng = np.random.default_rng(seed)
  base, out = photos(), []
  for i in range(n):
    img = base[i % len(base)]
    h, w = img.shape[:2]
    ch, cw = int(h * rng.uniform(0.5, 1)), int(w * rng.uniform(0.5, 1))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = Image.fromarray(img[y:y + ch, x:x + cw]).convert("RGB")
    if rng.random() < 0.5:
      crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    crop.resize((side, side), Image.BICUBIC).save(buf, "JPEG", quality=90)
    out.append(buf.getvalue())
  return out


def write_inputs(root: str, jpegs: list[bytes], shards: int) -> tuple[str, str]:
  """WebDataset shards and a folder + captions.csv of the same images; (pattern, csv)."""
  os.makedirs(f"{root}/shards", exist_ok=True)
  os.makedirs(f"{root}/images", exist_ok=True)
  per = len(jpegs) // shards
  rows = []
  for s in range(shards):
    with tarfile.open(f"{root}/shards/{s:05d}.tar", "w") as tar:
      for i in range(s * per, (s + 1) * per):
        key, caption = f"{i:09d}", f"a photo, number {i}"
        meta = json.dumps({"url": f"https://example.com/{i}.jpg", "caption": caption})
        for ext, data in (("jpg", jpegs[i]), ("txt", caption.encode()), ("json", meta.encode())):
          info = tarfile.TarInfo(f"{key}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
        path = f"{root}/images/{key}.jpg"
        with open(path, "wb") as f:
          f.write(jpegs[i])
        rows.append((path, caption))
  with open(f"{root}/captions.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["image", "caption"])
    writer.writerows(rows)
  return f"{root}/shards/{{00000..{shards - 1:05d}}}.tar", f"{root}/captions.csv"


def timed(cmd: list[str]) -> tuple[float, float]:
  """(wall s, CPU s of the command and all its processes)."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": REPO})
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return wall, cpu


def command(variant: str, workers: int, pattern: str, csv_path: str, data_dir: str,
            name: str) -> list[str]:
  py = [sys.executable, "-m", "mmjax.data.build"]
  beam = [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
  if variant == "folder_csv":
    return py + [f"--captions_file={csv_path}", f"--name={name}", f"--data_dir={data_dir}"]
  if variant == "tfds_beam_writer":
    return [sys.executable, "-c", TFDS_WRITER_SCRIPT, pattern, data_dir] + beam
  verify = "--verify_images" if variant == "beam_verify" else "--noverify_images"
  return py + [f"--webdataset={pattern}", f"--name={name}", f"--data_dir={data_dir}", verify,
               "--"] + beam


def dataset_digest(directory: str) -> str:
  h = hashlib.sha256()
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      h.update(name.encode() + f.read())
  return h.hexdigest()


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--shards", type=int, default=16)
  parser.add_argument("--per_shard", type=int, default=200)
  parser.add_argument("--side", type=int, default=384)
  parser.add_argument("--workers", default="1,2")
  parser.add_argument("--no_tfds_writer", action="store_true")
  parser.add_argument("--repeats", type=int, default=3, help="rounds over all variants "
                      "(medians reported); TFDS's writer runs in the first only")
  args = parser.parse_args()
  root = tempfile.mkdtemp(prefix="mmjax_build_bench_")
  n = args.shards * args.per_shard
  jpegs = jpeg_variants(n, args.side)
  pattern, csv_path = write_inputs(f"{root}/big", jpegs, args.shards)
  # Two shards, so that with 2 workers each starts up fully (imports its DoFns) here too.
  small_pattern, small_csv = write_inputs(f"{root}/small", jpegs[:8], 2)
  t = time.process_time()
  for data in jpegs[:200]:
    decode_image(data)
  decode_ms = (time.process_time() - t) / min(200, n) * 1e3  # CPU time: load-independent

  workers = [int(w) for w in args.workers.split(",")]
  variants = [("folder_csv", 1)] + [(v, w) for v in ("beam_verify", "beam_header")
                                    for w in workers]
  runs, digests = {}, {}
  for repeat in range(args.repeats):  # interleaved, so load changes hit every variant
    todo = variants + ([("tfds_beam_writer", w) for w in workers]
                       if repeat == 0 and not args.no_tfds_writer else [])
    for variant, w in todo:
      label = variant if variant == "folder_csv" else f"{variant}_w{w}"
      name = variant  # one name per variant, one data_dir per run: outputs comparable by bytes
      out = f"{root}/r{repeat}_{label}"
      small_wall, small_cpu = timed(command(variant, w, small_pattern, small_csv,
                                            f"{out}_small", name))
      wall, cpu = timed(command(variant, w, pattern, csv_path, out, name))
      runs.setdefault(label, []).append({
          "workers": w, "wall_s": wall, "startup_s": small_wall, "cpu_s": cpu,
          "marginal_records_per_s": (n - 8) / max(wall - small_wall, 1e-9),
          "marginal_cpu_ms_per_record": (cpu - small_cpu) / (n - 8) * 1e3})
      print(label, {k: round(v, 3) for k, v in runs[label][-1].items()}, flush=True)
      if variant.startswith("beam"):
        digests[f"{label}_r{repeat}"] = dataset_digest(f"{out}/{name}/1.0.0")
      shutil.rmtree(out, ignore_errors=True)
      shutil.rmtree(f"{out}_small", ignore_errors=True)
  results = {}
  for label, rs in runs.items():  # medians over the repeats
    med = {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
    results[label] = {
        "workers": rs[0]["workers"], "records": n, "repeats": len(rs),
        "wall_s": round(med["wall_s"], 2), "startup_s": round(med["startup_s"], 2),
        "records_per_s": round(n / med["wall_s"], 1),
        "marginal_records_per_s": round(med["marginal_records_per_s"], 1),
        "marginal_records_per_s_per_worker": round(
            med["marginal_records_per_s"] / rs[0]["workers"], 1),
        "cpu_s": round(med["cpu_s"], 2),
        "marginal_cpu_ms_per_record": round(med["marginal_cpu_ms_per_record"], 3),
        "marginal_cpu_ms_per_record_runs": [round(r["marginal_cpu_ms_per_record"], 3)
                                            for r in rs]}

  same = {v: len({d for k, d in digests.items() if k.startswith(v)}) == 1
          for v in ("beam_verify", "beam_header")}
  folder = results["folder_csv"]
  summary = {
      "cpu": common.cpu_model(), "records": n, "image_side": args.side,
      "mean_jpeg_bytes": int(np.mean([len(j) for j in jpegs])), "decode_ms": round(decode_ms, 3),
      "variants": results, "identical_across_workers": same,
      # Per core: CPU per record of each build over the folder builder's (< 1: cheaper).
      # beam_header, like the folder builder, decodes no image; beam_verify decodes each
      # (compare it with folder_plus_decode).
      "cpu_per_record_over_folder": {
          k: round(v["marginal_cpu_ms_per_record"] / folder["marginal_cpu_ms_per_record"], 3)
          for k, v in results.items() if k != "folder_csv"},
      "folder_plus_decode_cpu_ms_per_record": round(
          folder["marginal_cpu_ms_per_record"] + decode_ms, 3),
      "records_per_s_per_worker_over_folder": {
          k: round(v["marginal_records_per_s_per_worker"] / folder["marginal_records_per_s"], 3)
          for k, v in results.items() if k != "folder_csv"},
      "scaling_w2_over_w1": {
          v: round(results[f"{v}_w2"]["marginal_records_per_s"]
                   / results[f"{v}_w1"]["marginal_records_per_s"], 3)
          for v in ("beam_verify", "beam_header", "tfds_beam_writer")
          if f"{v}_w1" in results and f"{v}_w2" in results}}
  shutil.rmtree(root, ignore_errors=True)
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
