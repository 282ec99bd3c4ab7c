"""WebDataset shards -> TFDS datasets with Beam: shards of real photos (scikit-image) with bad
members, truncated/unreadable/missing shards; exact reports; identical datasets for 1 and 2
workers and for local and gs:// input; label layouts; filters and dedup; one-line errors; a
tiny training run on the result through the normal pipeline.

Every expectation comes from the generator's own plan of what it wrote (`Planned.outcome`),
never from the code under test.
"""
import contextlib
import dataclasses
import fcntl
import gzip
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import skimage.data
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

import helpers
from conftest import REPO
from mmjax.ingest import beam, webdataset
from mmjax.ingest import options as build_options

BEAM_1_PROCESS = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]
FILTERS = dict(min_image_side=32, max_aspect_ratio=3.0, min_caption_chars=5,
               max_caption_chars=200)


# ---------------------------------------------------------------------------------------
# The corpus: what was written and what must become of it


@dataclasses.dataclass
class Planned:
  """One sample as written. outcome: "kept" or the cause the build must count it under,
  with default options; `filtered_by`: the filter cause under FILTERS, if any;
  `copy_of`: (shard, position) of the first sample with the same image bytes."""
  shard: str
  position: int
  key: str
  outcome: str
  caption: str = ""
  label: str = ""
  image: bytes = b""
  width: int = 0
  height: int = 0
  filtered_by: str = ""
  copy_of: tuple | None = None
  members: list = dataclasses.field(default_factory=list)


PHOTOS = {n: getattr(skimage.data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket",
                                                   "camera")}


def photo(rng, width, height, fmt="JPEG", gray=False):
  """Encoded bytes of a random crop (50-100% per side) of a real photo, maybe flipped,
  resized to width x height."""
  name = "camera" if gray else list(PHOTOS)[rng.integers(0, 4)]
  img = PHOTOS[name]
  h, w = img.shape[:2]
  ch, cw = int(h * rng.uniform(0.5, 1)), int(w * rng.uniform(0.5, 1))
  y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
  crop = Image.fromarray(img[y:y + ch, x:x + cw])
  if rng.random() < 0.5:
    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  buf = io.BytesIO()
  crop.resize((width, height), Image.BILINEAR).save(buf, fmt, quality=90)
  return buf.getvalue()


def tar_bytes(samples, directory_entry=False):
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    if directory_entry:
      info = tarfile.TarInfo("subdir")
      info.type = tarfile.DIRTYPE
      tar.addfile(info)
    for s in samples:
      for name, data in s.members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def normal(rng, shard, position, width=None, height=None, caption=None, fmt="JPEG",
           ext="jpg", gray=False):
  width = width or int(rng.integers(48, 112))
  height = height or int(rng.integers(48, 112))
  key = f"{shard.split('.')[0]}{position:04d}"
  caption = caption or f"a photo from shard {shard}, sample {position}"
  image = photo(rng, width, height, fmt, gray)
  meta = json.dumps({"url": f"https://example.com/{key}.jpg", "key": key}).encode()
  return Planned(shard, position, key, "kept", caption=caption.strip(), image=image, width=width,
                 height=height, members=[(f"{key}.{ext}", image), (f"{key}.txt", caption.encode()),
                                         (f"{key}.json", meta)])


def bad(rng, shard, position, kind):
  """A sample whose default outcome is `kind` (a cause), or caption_from_json (kept)."""
  s = normal(rng, shard, position)
  k, img = s.key, s.image
  members = {
      "no_image": [(f"{k}.txt", b"text without an image"), (f"{k}.json", b"{}")],
      "no_caption_field": [(f"{k}.jpg", img), (f"{k}.json", b'{"url": "u"}')],
      "blank_caption": [(f"{k}.jpg", img), (f"{k}.txt", b"  \n ")],
      "caption_from_json": [(f"{k}.jpg", img), (f"{k}.json", json.dumps(
          {"caption": "the caption lives in the json", "url": "https://x/j"}).encode())],
      "caption_not_utf8": [(f"{k}.jpg", img), (f"{k}.txt", b"\xff\xfe bad \xfa")],
      "bad_json": [(f"{k}.jpg", img), (f"{k}.txt", b"fine caption"), (f"{k}.json", b"{nope")],
      "cut_jpeg": [(f"{k}.jpg", img[:len(img) // 2]), (f"{k}.txt", b"caption")],
      "empty_image": [(f"{k}.jpg", b""), (f"{k}.txt", b"caption")],
      "not_an_image": [(f"{k}.jpg", b"GIF89a but not really"), (f"{k}.txt", b"caption")],
  }[kind]
  outcome = {"no_caption_field": "no_caption", "blank_caption": "no_caption",
             "caption_from_json": "kept", "cut_jpeg": "undecodable_image",
             "empty_image": "undecodable_image",
             "not_an_image": "undecodable_image"}.get(kind, kind)
  s.members, s.outcome = members, outcome
  if kind == "caption_from_json":
    s.caption = "the caption lives in the json"
  return s


def caption_corpus(root, rng):
  """cap/{00000..00007}.tar: 4 shards of 50 with bad samples, a gzipped one, a truncated one,
  a missing one (00006) and a file that is not a tar (00007). Returns (pattern, plan)."""
  os.makedirs(f"{root}/cap")
  plan = {}
  bad_at = {5: "no_image", 9: "no_caption_field", 13: "blank_caption", 17: "caption_from_json",
            21: "caption_not_utf8", 25: "bad_json", 29: "cut_jpeg", 33: "empty_image",
            37: "not_an_image"}
  shard = "00000.tar"
  plan[shard] = [bad(rng, shard, i, bad_at[i]) if i in bad_at else normal(rng, shard, i)
                 for i in range(50)]
  shard = "00001.tar"
  samples = []
  for i in range(50):
    if i in (3, 23, 43):
      s = normal(rng, shard, i, width=20, height=60)
      s.filtered_by = "image_too_small"
    elif i in (7, 27, 47):
      s = normal(rng, shard, i, width=160, height=40)  # 4:1, shorter side above the minimum
      s.filtered_by = "aspect_ratio"
    elif i in (11, 31):
      s = normal(rng, shard, i, caption="cat")
      s.filtered_by = "caption_too_short"
    elif i in (15, 35):
      s = normal(rng, shard, i, caption="a very long caption " * 15)
      s.filtered_by = "caption_too_long"
    elif i in (19, 39):
      s = normal(rng, shard, i, fmt="PNG", ext="png")
    elif i in (21, 41):
      s = normal(rng, shard, i, fmt="WEBP", ext="webp")
    elif i == 25:
      s = normal(rng, shard, i, gray=True)
    elif i == 29:
      s = normal(rng, shard, i, ext="JPG")  # upper-case extension
    else:
      s = normal(rng, shard, i)
    samples.append(s)
  plan[shard] = samples
  shard = "00002.tar"
  samples = [normal(rng, shard, i) for i in range(50)]
  for copy, original in ((samples[10], plan["00001.tar"][4]), (samples[20], samples[15])):
    copy.image, copy.width, copy.height = original.image, original.width, original.height
    copy.members[0] = (copy.members[0][0], original.image)
    copy.copy_of = (original.shard, original.position)
  plan[shard] = samples
  plan["00003.tar"] = [normal(rng, "00003.tar", i) for i in range(50)]
  plan["00004.tar"] = [normal(rng, "00004.tar", i) for i in range(30)]
  plan["00005.tar"] = [normal(rng, "00005.tar", i) for i in range(30)]
  for name in ("00000.tar", "00001.tar", "00002.tar", "00003.tar"):
    with open(f"{root}/cap/{name}", "wb") as f:
      f.write(tar_bytes(plan[name], directory_entry=name == "00001.tar"))
  with open(f"{root}/cap/00004.tar", "wb") as f:  # gzipped content, found by its magic bytes
    f.write(gzip.compress(tar_bytes(plan["00004.tar"])))
  whole = tar_bytes(plan["00005.tar"])
  with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
    cut_member = next(m for m in tar.getmembers() if m.name.startswith("000050012."))
  with open(f"{root}/cap/00005.tar", "wb") as f:  # cut inside sample 12's image
    f.write(whole[:cut_member.offset_data + cut_member.size // 2])
  plan["00005.tar"] = plan["00005.tar"][:13]
  plan["00005.tar"][12].outcome = "truncated_shard"
  with open(f"{root}/cap/00007.tar", "wb") as f:
    f.write(b"this is not a tar file" * 100)
  return f"{root}/cap/{{00000..00007}}.tar", plan


def label_corpus(root, rng):
  """lab/{00000..00001}.tar: .cls ids (0, 1, 3: class 2 never occurs) and .json classes."""
  os.makedirs(f"{root}/lab")
  plan = {}
  ids, names = (0, 1, 3), ("cat", "dog", "rocket", "2")
  for s in range(2):
    shard, samples = f"{s:05d}.tar", []
    for i in range(15):
      p = normal(rng, shard, i)
      k = p.key
      members = [(f"{k}.jpg", p.image)]
      cls, name = ids[(i + s) % 3], names[(i + 2 * s) % 4]
      if i != 4:
        members.append((f"{k}.cls", f"{cls}\n".encode()))
      if i != 6:
        members.append((f"{k}.json", json.dumps({"class": name}).encode()))
      p.members, p.label = members, (str(cls), name)
      p.outcome = ("no_label" if i == 4 else "kept", "no_label" if i == 6 else "kept")
      samples.append(p)
    plan[shard] = samples
    with open(f"{root}/lab/{shard}", "wb") as f:
      f.write(tar_bytes(samples))
  return f"{root}/lab/*.tar", plan


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """The shards (written once for all xdist workers) and each worker's plan of them (the
  generator is seeded: every worker's plan describes the same bytes)."""
  shared = tmp_path_factory.getbasetemp().parent / "webdataset_shared"
  with once(shared, "corpus") as todo:
    root = str(shared / "corpus") if todo else str(tmp_path_factory.mktemp("plan_only"))
    rng = np.random.default_rng(0)
    _, cap_plan = caption_corpus(root, rng)
    _, lab_plan = label_corpus(root, rng)
  root = str(shared / "corpus")
  return dict(root=root, shared=str(shared), cap_pattern=f"{root}/cap/{{00000..00007}}.tar",
              cap_plan=cap_plan, lab_pattern=f"{root}/lab/*.tar", lab_plan=lab_plan)


@contextlib.contextmanager
def once(shared, name):
  """Yields True to the first process (of pytest-xdist's workers) to get here with `name`,
  holding a lock until it is done; False to the others, after that."""
  shared.mkdir(parents=True, exist_ok=True)
  with open(shared / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    done = shared / f"{name}.done"
    todo = not done.exists()
    yield todo
    if todo:
      done.touch()


def expected_report(plan, shards_total, unreadable, filters=False):
  """Per-shard (read, written, skipped, filtered) from the plan."""
  per_shard = {}
  for shard in sorted(plan):
    read, written, skipped, filtered = 0, 0, {}, {}
    for s in plan[shard]:
      read += 1
      cause = s.outcome
      if cause == "kept" and filters:
        cause = s.filtered_by or ("duplicate_image" if s.copy_of else "kept")
      if cause == "kept":
        written += 1
      elif cause in webdataset.SKIP_CAUSES:
        skipped[cause] = skipped.get(cause, 0) + 1
      else:
        filtered[cause] = filtered.get(cause, 0) + 1
    per_shard[shard] = (read, written, skipped, filtered)
  for name in unreadable:
    per_shard[name] = (0, 0, {}, {})
  assert len(per_shard) == shards_total
  return per_shard


def kept_in_order(plan, filters=False):
  return [s for shard in sorted(plan) for s in plan[shard]
          if s.outcome == "kept" and not (filters and (s.filtered_by or s.copy_of))]


def check_report(report, plan, filters=False):
  unreadable = {"00006.tar": "missing", "00007.tar": "not a readable tar"}
  want = expected_report(plan, 8, unreadable, filters)
  got = {s["shard"]: (s["read"], s["written"], s["skipped"], s["filtered"])
         for s in report["per_shard"]}
  assert got == want
  status = {s["shard"]: s["status"] for s in report["per_shard"]}
  assert status == {**{n: "ok" for n in want}, "00005.tar": "truncated",
                    "00006.tar": "unreadable", "00007.tar": "unreadable"}
  errors = {s["shard"]: s["error"] for s in report["per_shard"] if s["error"]}
  assert errors["00006.tar"] == "missing" and "not a readable tar" in errors["00007.tar"]
  assert "ends early after 12 samples" in errors["00005.tar"]
  assert report["shards"] == {"total": 8, "ok": 5, "truncated": 1, "unreadable": 2}
  totals = report["samples"]
  assert totals["read"] == sum(w[0] for w in want.values())
  assert totals["written"] == sum(w[1] for w in want.values())
  for kind, col in (("skipped", 2), ("filtered", 3)):
    for cause, n in totals[kind].items():
      assert n == sum(w[col].get(cause, 0) for w in want.values()), cause


def check_records(data_dir, name, expected):
  """Every record equals the plan's kept sample at that position (storage order = shard
  name order, then tar order)."""
  src = tfds.data_source(name, split="train", data_dir=data_dir,
                         decoders={"image": tfds.decode.SkipDecoding()})
  assert len(src) == len(expected)
  for i, want in enumerate(expected):
    rec = src[i]
    assert rec["shard"].decode() == want.shard and rec["key"].decode() == want.key, i
    assert rec["image"] == want.image
    assert [c.decode() for c in rec["captions"]] == [want.caption]
    assert (rec["width"], rec["height"]) == (want.width, want.height)


def build_cli(pattern, name, data_dir, *extra, beam=(), expect=0):
  cmd = [sys.executable, "-m", "mmjax.data.build", f"--webdataset={pattern}", f"--name={name}",
         f"--data_dir={data_dir}", *extra]
  if beam:
    cmd += ["--", *beam]
  proc = helpers.call(cmd)
  assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def dataset_files(directory):
  return {n: (epath.Path(directory) / n).read_bytes()
          for n in sorted(os.listdir(directory)) if "array_record" in n or n.endswith(".json")}


# ---------------------------------------------------------------------------------------
# Builds


@pytest.fixture(scope="module")
def two_worker_counts(corpus):
  """The caption corpus built by the command line with 1 and with 2 worker processes
  (once for all xdist workers): {workers: (data_dir, the command's stdout)}."""
  out, shared = {}, epath.Path(corpus["shared"])
  with once(shared, "builds") as todo:
    for workers in (1, 2):
      data_dir = f"{shared}/out_w{workers}"
      if todo:
        proc = build_cli(corpus["cap_pattern"], "web_captions", data_dir,
                         beam=[f"--direct_num_workers={workers}",
                               "--direct_running_mode=multi_processing"])
        (shared / f"stdout_w{workers}.txt").write_text(proc.stdout)
      out[workers] = (data_dir, (shared / f"stdout_w{workers}.txt").read_text())
  return out


def test_one_and_two_workers_give_the_same_dataset_and_an_exact_report(corpus, two_worker_counts):
  (dir1, out1), (dir2, _) = two_worker_counts[1], two_worker_counts[2]
  files1 = dataset_files(f"{dir1}/web_captions/1.0.0")
  files2 = dataset_files(f"{dir2}/web_captions/1.0.0")
  assert files1 == files2 and len([n for n in files1 if "array_record" in n]) == 8
  report = json.loads(files1["build_report.json"])
  check_report(report, corpus["cap_plan"])
  check_records(dir1, "web_captions", kept_in_order(corpus["cap_plan"]))
  assert f"report: {dir1}/web_captions/1.0.0/build_report.json" in out1
  assert (f"--config.data.sources.captions.name=web_captions "
          f"--config.data.sources.captions.data_dir={dir1}") in out1
  assert not [p for p in os.listdir(f"{dir1}/web_captions") if p.startswith("incomplete")]


def test_gs_shards_to_gs_dataset_match_the_local_build(corpus, two_worker_counts, gcs):
  """Shards read from gs:// and the dataset written to gs:// (in-process runner): the same
  record files as the local multi-process builds."""
  for name in sorted(os.listdir(f"{corpus['root']}/cap")):
    with open(f"{corpus['root']}/cap/{name}", "rb") as f:
      gcs.pipe(f"gs://bucket/cap/{name}", f.read())
  options = build_options.BuildOptions(pattern="gs://bucket/cap/{00000..00007}.tar",
                                          name="web_captions", data_dir="gs://bucket/tfds")
  report = beam.run_build(options, beam_args=BEAM_1_PROCESS)
  check_report(report, corpus["cap_plan"])
  local = dataset_files(f"{two_worker_counts[1][0]}/web_captions/1.0.0")
  remote = epath.Path("gs://bucket/tfds/web_captions/1.0.0")
  for name, data in local.items():
    if "array_record" in name:
      assert (remote / name).read_bytes() == data, name
  info = json.loads((remote / "dataset_info.json").read_text())
  assert info["splits"][0]["shardLengths"] == json.loads(local["dataset_info.json"])[
      "splits"][0]["shardLengths"]


def test_filters_and_dedup_are_counted_and_keep_the_first_copy(corpus, tmp_path):
  rules = webdataset.SampleRules(**FILTERS)
  options = build_options.BuildOptions(pattern=corpus["cap_pattern"], name="web_filtered",
                                          data_dir=str(tmp_path), rules=rules,
                                          dedupe_images=True)
  report = beam.run_build(options, beam_args=BEAM_1_PROCESS)
  check_report(report, corpus["cap_plan"], filters=True)
  assert report["samples"]["filtered"]["duplicate_image"] == 2
  kept = kept_in_order(corpus["cap_plan"], filters=True)
  check_records(str(tmp_path), "web_filtered", kept)
  # The survivors of the two duplicated images are their first copies.
  plan = corpus["cap_plan"]
  keys = {(s.shard, s.key) for s in kept}
  assert ("00001.tar", plan["00001.tar"][4].key) in keys
  assert ("00002.tar", plan["00002.tar"][15].key) in keys


def test_label_layouts_cls_ids_and_json_names_with_a_class_file(corpus, tmp_path):
  plan = corpus["lab_plan"]
  options = build_options.BuildOptions(pattern=corpus["lab_pattern"], name="web_cls",
                                          data_dir=str(tmp_path),
                                          rules=webdataset.SampleRules(label="cls"))
  report = beam.run_build(options, beam_args=BEAM_1_PROCESS)
  # .cls ids are kept as they are (class 2 never occurs, ids do not shift).
  assert report["num_classes"] == 4 and report["samples"]["skipped"]["no_label"] == 2
  builder = tfds.builder_from_directory(f"{tmp_path}/web_cls/1.0.0")
  assert builder.info.features["label"].names == ["0", "1", "2", "3"]
  src = tfds.data_source("web_cls", split="train", data_dir=str(tmp_path))
  want = [s for shard in sorted(plan) for s in plan[shard] if s.outcome[0] == "kept"]
  assert [int(src[i]["label"]) for i in range(len(src))] == [int(s.label[0]) for s in want]

  names_file = tmp_path / "classes.txt"
  names_file.write_text("astronaut\ncat\ndog\n")
  options = build_options.BuildOptions(
      pattern=corpus["lab_pattern"], name="web_json", data_dir=str(tmp_path),
      rules=webdataset.SampleRules(label="json:class"), class_names_file=str(names_file))
  report = beam.run_build(options, beam_args=BEAM_1_PROCESS)
  samples = [s for shard in sorted(plan) for s in plan[shard]]
  rockets = sum(s.label[1] == "rocket" and s.outcome[1] == "kept" for s in samples)
  assert report["samples"]["skipped"]["unknown_class"] == rockets > 0
  assert report["samples"]["skipped"]["no_label"] == 2
  src = tfds.data_source("web_json", split="train", data_dir=str(tmp_path))
  index = {"cat": 1, "dog": 2, "2": 2}  # "2" is a decimal class id: dog
  want = [index[s.label[1]] for s in samples if s.outcome[1] == "kept" and s.label[1] != "rocket"]
  assert [int(src[i]["label"]) for i in range(len(src))] == want


def test_a_skip_is_fatal_with_the_flag_and_leaves_no_dataset(corpus, tmp_path):
  proc = build_cli(corpus["cap_pattern"], "web_strict", str(tmp_path), "--fail_on_skip",
                   beam=BEAM_1_PROCESS, expect=2)
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith("mmjax.data.build: error: ") and "--fail_on_skip is set" in line
  assert re.search(r"/cap/0000[0-7]\.tar: ", line), line
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "web_strict" / "1.0.0")
  assert os.listdir(tmp_path / "web_strict") == []  # the temporary directory is gone too
  with pytest.raises(Exception):
    tfds.data_source("web_strict", split="train", data_dir=str(tmp_path))


@pytest.mark.parametrize("args, message", [
    (("--webdataset=/nonexistent/*.tar", "--name=x"), "matches no file"),
    (("--webdataset=/x/{0..3}.tar", "--name=My-Pets"), "--name='My-Pets'"),
    (("--webdataset=/x/a.tar", "--name=x", "--label=class"), "--label='class'"),
    (("--webdataset=/x/a.tar", "--name=x", "--class_names=c.txt"), "label datasets"),
    (("--webdataset=/x/a.tar", "--name=x", "--runner=NoSuchRunner"), "--runner=NoSuchRunner"),
    (("--webdataset=/x/a.tar", "--name=x", "--captions_file=c.csv"), "exactly one of"),
])
def test_usage_errors_are_one_line_exit_2(tmp_path, args, message):
  proc = helpers.call([sys.executable, "-m", "mmjax.data.build", *args,
                       f"--data_dir={tmp_path}"], timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[0]]
  assert message in proc.stderr and "Traceback" not in proc.stderr


def test_no_readable_shard_and_an_existing_dataset_are_errors(corpus, tmp_path, two_worker_counts):
  options = build_options.BuildOptions(
      pattern=f"{corpus['root']}/cap/{{00006..00007}}.tar", name="none", data_dir=str(tmp_path))
  with pytest.raises(build_options.BuildError,
                     match=r"no readable shard among the 2 matching .* "
                           r"\(first: 00006.tar: missing\)"):
    beam.run_build(options, beam_args=BEAM_1_PROCESS)
  assert os.listdir(tmp_path / "none") == []
  options = build_options.BuildOptions(pattern=corpus["cap_pattern"], name="web_captions",
                                          data_dir=two_worker_counts[1][0])
  with pytest.raises(build_options.BuildError, match="already exists"):
    beam.run_build(options)


def test_dry_run_prints_the_dataflow_invocation_and_reads_nothing(tmp_path):
  proc = helpers.call(
      [sys.executable, "-m", "mmjax.data.build", "--webdataset=gs://b/cc/{00000..01242}.tar",
       "--name=cc12m", "--data_dir=gs://b/tfds", "--runner=DataflowRunner", "--min_image_side=64",
       "--dry_run", "--", "--project=p", "--region=us-central1", "--temp_location=gs://b/tmp"],
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert "1243 after brace expansion" in out and "gs://b/tfds/cc12m/1.0.0" in out
  assert ("beam:      --runner=DataflowRunner --project=p --region=us-central1 "
          "--temp_location=gs://b/tmp") in out
  assert ("command:   python -m mmjax.data.build --webdataset='gs://b/cc/{00000..01242}.tar' "
          "--name=cc12m --data_dir=gs://b/tfds --runner=DataflowRunner --min_image_side=64 -- "
          "--project=p") in out


def test_tiny_training_run_reads_the_built_datasets(corpus, two_worker_counts, tmp_path):
  """configs/shapes.py's tiny CoCa trains on the caption build and a label build, read by
  the normal pipeline (tokenizer trained on the captions, Grain, TFDS decoding)."""
  label_dir = str(tmp_path / "labels")
  beam.run_build(build_options.BuildOptions(
      pattern=corpus["lab_pattern"], name="web_cls", data_dir=label_dir,
      rules=webdataset.SampleRules(label="cls")), beam_args=BEAM_1_PROCESS)
  workdir, caption_dir = str(tmp_path / "run"), two_worker_counts[1][0]
  helpers.run("mmjax.train", workdir, f"{tmp_path}/tokenizer_cache", "--config.total_steps=2",
              "--config.log_every_steps=1", "--config.checkpoint_every_steps=2",
              "--config.eval_every_steps=0",
              "--config.data.sources.captions.name=web_captions",
              f"--config.data.sources.captions.data_dir={caption_dir}",
              "--config.data.sources.labels.name=web_cls",
              f"--config.data.sources.labels.data_dir={label_dir}")
  logged = [m for m in helpers.metrics(workdir) if "loss" in m]
  assert [m["step"] for m in logged] == [1, 2]
  assert all(np.isfinite(m["loss"]) for m in logged)
  assert logged[-1]["data/skipped"] == 0  # every bad sample was left out at build time


# ---------------------------------------------------------------------------------------
# Reading rules (no Beam)


def test_brace_expansion_and_shard_names(tmp_path):
  assert webdataset.expand_braces("s/{00008..00011}.tar") == [
      "s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"]
  assert webdataset.expand_braces("{8..10}{a,b}") == ["8a", "8b", "9a", "9b", "10a", "10b"]
  assert webdataset.expand_braces("x{y}") == ["x{y}"]
  for d in ("a", "b"):
    (tmp_path / d).mkdir()
    (tmp_path / d / "1.tar").write_bytes(b"")
  shards = webdataset.list_shards(f"{tmp_path}/*/1.tar")
  assert [(s.name, s.index) for s in shards] == [("a/1.tar", 0), ("b/1.tar", 1)]
  shards = webdataset.list_shards(f"{tmp_path}/{{b,a,c}}/1.tar")
  assert [s.name for s in shards] == ["a/1.tar", "b/1.tar", "c/1.tar"]  # c: missing, listed


def test_a_cut_header_or_missing_end_block_is_a_truncated_shard(tmp_path):
  rng = np.random.default_rng(1)
  samples = [normal(rng, "t.tar", i) for i in range(4)]
  whole = tar_bytes(samples)
  with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
    third = [m for m in tar.getmembers() if m.name.startswith("t0002")][0]
  path = tmp_path / "t.tar"
  # Cut in sample 2's first header, at its start (no end-of-archive block), in its data.
  # Sample 1 was complete at the first two cuts, but nothing said so: the sample being
  # read when the shard broke is dropped (and counted as truncated_shard by the build).
  for cut, complete in ((third.offset + 100, ["t0000"]), (third.offset, ["t0000"]),
                        (third.offset_data + 7, ["t0000", "t0001"])):
    path.write_bytes(whole[:cut])
    got = []
    with pytest.raises(webdataset.TruncatedShard) as e:
      got.extend(s.key for s in webdataset.iter_samples(str(path)))
    assert got == complete and e.value.lost_sample
  path.write_bytes(whole)
  assert [s.key for s in webdataset.iter_samples(str(path))] == ["t0000", "t0001", "t0002", "t0003"]
  zipped = gzip.compress(whole)
  path.write_bytes(zipped[:len(zipped) // 2])  # a cut gzip stream
  with pytest.raises(webdataset.TruncatedShard):
    list(webdataset.iter_samples(str(path)))


def test_check_order_and_causes():
  rng = np.random.default_rng(2)
  rules = webdataset.SampleRules(**FILTERS)
  for kind, cause in (("no_image", "no_image"), ("bad_json", "bad_json"),
                      ("blank_caption", "no_caption"), ("caption_not_utf8", "caption_not_utf8"),
                      ("cut_jpeg", "undecodable_image"), ("empty_image", "undecodable_image")):
    s = bad(rng, "c.tar", 0, kind)
    raw = webdataset.RawSample(0, s.key, {n.split(".", 1)[1].lower(): d for n, d in s.members})
    assert webdataset.check_sample(raw, "c.tar", rules) == cause, kind
  # A tiny image with a short caption: the image filter comes first.
  s = normal(rng, "c.tar", 1, width=10, height=10, caption="cat")
  raw = webdataset.RawSample(1, s.key, {n.split(".", 1)[1]: d for n, d in s.members})
  assert webdataset.check_sample(raw, "c.tar", rules) == "image_too_small"
  kept = webdataset.check_sample(raw, "c.tar", webdataset.SampleRules(verify_images=False))
  assert kept.example["captions"] == ["cat"]
  assert (kept.example["width"], kept.example["height"]) == (10, 10)


@pytest.mark.slow
def test_a_killed_build_leaves_nothing_readable_and_a_rerun_completes(corpus, tmp_path):
  """SIGKILL (launcher and workers) once the first output shard exists: no dataset under
  the final name; the same command then builds it, noting the leftover directory."""
  shards = tmp_path / "shards"
  shards.mkdir()
  for i in range(40):  # 40 shards (links to the 4 plain tars), ~2000 samples
    os.symlink(f"{corpus['root']}/cap/{i % 4:05d}.tar", shards / f"{i:05d}.tar")
  data_dir = tmp_path / "data"
  cmd = [sys.executable, "-m", "mmjax.data.build", f"--webdataset={shards}/*.tar", "--name=killed",
         f"--data_dir={data_dir}", "--", "--direct_num_workers=2"]
  proc = subprocess.Popen(cmd, cwd=REPO, env=helpers.environment(), start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not list(data_dir.glob("killed/incomplete.*/killed-train.array_record-*-of-00040")):
    assert proc.poll() is None and time.time() < deadline, "the build ended before the kill"
    time.sleep(0.02)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (data_dir / "killed" / "1.0.0").exists()
  assert [p.name.startswith("incomplete.") for p in (data_dir / "killed").iterdir()] == [True]
  with pytest.raises(Exception):
    tfds.data_source("killed", split="train", data_dir=str(data_dir))
  rerun = helpers.call(cmd)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "leftover directories of killed builds" in rerun.stdout
  plan = corpus["cap_plan"]
  kept = sum(s.outcome == "kept" for i in range(40) for s in plan[f"{i % 4:05d}.tar"])
  assert len(tfds.data_source("killed", split="train", data_dir=str(data_dir))) == kept


def test_records_are_tfds_own_serialization(corpus):
  """build_options.serialize_example writes exactly the bytes TFDS's serializer writes
  for the dataset's features (map entries in key order), for both layouts."""
  from tensorflow_datasets.core import example_serializer
  rules = webdataset.SampleRules(verify_images=False)
  examples = [webdataset.check_sample(webdataset.RawSample(s.position, s.key, {
      n.split(".", 1)[1].lower(): d for n, d in s.members}), s.shard, rules).example
      for s in kept_in_order(corpus["cap_plan"])[:40]]
  examples.append(dict(examples[0], captions=["two", "captions ü"], url=""))
  labels = [dict({k: v for k, v in e.items() if k != "captions"}, label=i % 3)
            for i, e in enumerate(examples)]
  for layout, batch, names in (("caption", examples, None), ("label", labels, ["a", "b", "c"])):
    features = build_options.features(layout, names)
    reference = example_serializer.ExampleSerializer(features.get_serialized_info())
    for example in batch:
      want = reference.get_tf_example(features.encode_example(example))
      assert build_options.serialize_example(example) == want.SerializeToString(
          deterministic=True)
