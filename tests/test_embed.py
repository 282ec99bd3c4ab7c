"""python -m mmjax.embed on the trained tiny CoCa: the shard layout faiss/autofaiss read,
embeddings equal to mmjax.load's, undecodable files skipped and listed, a killed run resumed
to byte-identical files, two processes writing their own shards, and one-line usage errors."""
import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

import helpers
import mmjax
from conftest import CACHE_DIR, REPO
from mmjax import embed

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
  """5 photos (one grey), a transparent logo in a sub-folder, 2 undecodable files and a
  text file (not an image by its extension: not read)."""
  root = tmp_path_factory.mktemp("photos")
  (root / "sub").mkdir()
  for name in PHOTOS:
    Image.fromarray(getattr(skimage.data, name)()).save(root / f"{name}.jpg")
  Image.fromarray(skimage.data.logo()).save(root / "sub" / "logo.png")
  (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
  (root / "sub" / "empty.png").write_bytes(b"")
  (root / "notes.txt").write_text("not an image")
  return str(root)


def embed_cli(workdir, out, *args, devices=1, env=None, expect=0):
  proc = helpers.call([sys.executable, "-m", "mmjax.embed", f"--workdir={workdir}",
                       f"--out={out}", *args], devices=devices,
                      env={"JAX_COMPILATION_CACHE_DIR": CACHE_DIR, **(env or {})})
  assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def files(out):
  found = {}
  for folder, _, names in os.walk(out):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, out)] = f.read()
  return found


def test_a_folder_embeds_into_shards_that_match_mmjax_load(tiny_workdir, images_dir, tmp_path):
  out = str(tmp_path / "emb")
  source = embed.images_dir_source(images_dir, shard_size=3)
  result = embed.run_embed(tiny_workdir, out, source, batch_size=2)
  assert result["images"] == 6 and result["shards"] == 3
  assert sorted(s["id"] for s in result["skipped"]) == ["sub/broken.jpg", "sub/empty.png"]
  assert [s["reason"] for s in sorted(result["skipped"], key=lambda s: s["id"])] == [
      "not an image (no format Pillow reads)", "empty file"]
  ids = [i for k in range(3) for i in pq.read_table(
      f"{out}/metadata/metadata_{k:05d}.parquet").column("id").to_pylist()]
  assert ids == ["astronaut.jpg", "camera.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg",
                 "sub/logo.png"]  # sorted paths, undecodable ones left out
  emb = np.concatenate([np.load(f"{out}/img_emb/img_emb_{k:05d}.npy") for k in range(3)])
  assert emb.dtype == np.float16 and emb.shape == (6, 16)
  model = mmjax.load(tiny_workdir)
  expected = model.encode_image([os.path.join(images_dir, i) for i in ids])
  np.testing.assert_allclose(emb.astype(np.float32), expected, atol=2e-3)
  assert not os.path.exists(f"{out}/text_emb")


def test_a_dataset_split_with_captions_embeds_images_and_texts(tiny_workdir, data_dir,
                                                               tmp_path):
  out = str(tmp_path / "emb")
  source = embed.dataset_source("shapes/captions", "validation[:20]", data_dir, "image",
                                "captions", shard_size=8)
  result = embed.run_embed(tiny_workdir, out, source, with_text=True, batch_size=8)
  assert result["images"] == 20 and result["shards"] == 3 and not result["skipped"]
  meta = pq.read_table(f"{out}/metadata/metadata_00002.parquet").to_pylist()
  assert [m["id"] for m in meta] == [str(i) for i in range(16, 20)]
  text = np.load(f"{out}/text_emb/text_emb_00002.npy")
  model = mmjax.load(tiny_workdir)
  np.testing.assert_allclose(text.astype(np.float32),
                             model.encode_text([m["caption"] for m in meta]), atol=2e-3)


def test_webdataset_shards_with_a_bad_sample_and_a_missing_shard(tiny_workdir, tmp_path):
  shards = tmp_path / "shards"
  shards.mkdir()
  with tarfile.open(shards / "00000.tar", "w") as tar:
    for key, name in enumerate(("coffee", "rocket", None)):
      members = {"txt": f"a photo of {name}".encode()}
      if name:
        buf = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).save(buf, format="JPEG")
        members["jpg"] = buf.getvalue()
      else:
        members["jpg"] = b"garbage"
      for ext, data in members.items():
        info = tarfile.TarInfo(f"{key:06d}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  out = str(tmp_path / "emb")
  source = embed.webdataset_source(f"{shards}/{{00000..00001}}.tar")  # 00001 is missing
  result = embed.run_embed(tiny_workdir, out, source, with_text=True, batch_size=2)
  assert result["images"] == 2
  assert [s["id"] for s in result["skipped"]] == ["00000.tar/000002", "00001.tar"]
  assert "unreadable shard: missing" in result["skipped"][1]["reason"]
  meta = pq.read_table(f"{out}/metadata/metadata_00000.parquet").to_pylist()
  assert [m["caption"] for m in meta] == ["a photo of coffee", "a photo of rocket"]
  assert np.load(f"{out}/img_emb/img_emb_00001.npy").shape == (0, 16)


def test_a_killed_run_resumes_to_byte_identical_files(tiny_workdir, images_dir, tmp_path):
  flags = [f"--images_dir={images_dir}", "--shard_size=2", "--batch_size=2"]
  whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
  out = embed_cli(tiny_workdir, whole, *flags).stdout
  assert "images/s" in out and "ETA" in out and "skipped: 2" in out
  assert "sub/broken.jpg: not an image" in out
  embed_cli(tiny_workdir, killed, *flags, env={"MMJAX_DEBUG_EMBED_EXIT_AFTER_SHARDS": "2"},
            expect=17)
  done = sorted(os.listdir(os.path.join(killed, "metadata")))
  assert done == ["metadata_00000.parquet", "metadata_00001.parquet"]
  out = embed_cli(tiny_workdir, killed, *flags).stdout
  assert "2 of this process's 4 shards are done" in out
  assert files(killed) == files(whole)
  proc = embed_cli(tiny_workdir, killed, f"--images_dir={images_dir}", "--shard_size=3",
                   expect=2)
  assert "holds embeddings of another run (differs in input" in helpers.usage_error(
      proc, "mmjax.embed")


@pytest.mark.parametrize("args, message", [
    ((), "give exactly one input"),
    (("--images_dir=/nonexistent", "--dataset=x"), "give exactly one input"),
    (("--images_dir=/nonexistent",), "--images_dir /nonexistent: no such folder"),
    (("--dataset=shapes/captions",), "--dataset needs --split"),
])
def test_usage_errors_are_one_line(tiny_workdir, tmp_path, args, message):
  proc = embed_cli(tiny_workdir, str(tmp_path / "emb"), *args, expect=2)
  assert message in helpers.usage_error(proc, "mmjax.embed")


def test_text_needs_captions(tiny_workdir, images_dir, tmp_path):
  with pytest.raises(mmjax.errors.UsageError, match="no captions"):
    embed.run_embed(tiny_workdir, str(tmp_path / "emb"),
                    embed.images_dir_source(images_dir, 10), with_text=True)


@pytest.mark.slow
def test_two_processes_write_their_own_shards_as_one_process_would(tiny_workdir, images_dir,
                                                                   tmp_path):
  from test_multihost import free_port
  flags = [f"--images_dir={images_dir}", "--shard_size=2", "--batch_size=2"]
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  embed_cli(tiny_workdir, single, *flags)
  port, procs = free_port(), []
  for i in range(2):
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "mmjax.embed", f"--workdir={tiny_workdir}", f"--out={multi}",
         *flags, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={i}"], cwd=REPO,
        env={**helpers.environment(1), "JAX_COMPILATION_CACHE_DIR": CACHE_DIR},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [log[-3000:] for log in logs]
  assert "into 2 shards" in logs[0] and "into 2 shards" in logs[1]  # shards 0, 2 and 1, 3
  assert files(multi) == files(single)
