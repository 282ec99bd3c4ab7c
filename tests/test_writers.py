"""metrics.jsonl / TensorBoard / eval outputs on a local disk and on gs://.

gs:// runs offline against FakeGCS (tests/conftest.py, the `gcs` fixture): an in-memory
fsspec filesystem registered as `gs`/`gcs` (what etils.epath, and so mmjax, uses for gs://
when TensorFlow is absent) that, like GCS, has no append (gcsfs silently turns mode "a"
into an overwrite, fsspec/gcsfs#533: here it raises) and shows a file only once it is
closed. tensorboardX's gs:// writer (which needs
google-cloud-storage and credentials) is replaced by one uploading to FakeGCS the same way.
Orbax's gs:// checkpoints go through tensorstore's own GCS driver and are not faked here.
"""
import json
import time

import numpy as np
import pytest
from etils import epath
from PIL import Image

from conftest import FakeGCS
from mmjax import writers


def read_jsonl(path):
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines()]


def test_fake_gcs_is_what_epath_uses_for_gs(gcs):
  path = epath.Path("gs://bucket/x.txt")
  path.write_text("hi")
  assert gcs.cat("gs://bucket/x.txt") == b"hi" and path.read_text() == "hi"
  with pytest.raises(OSError, match="cannot be appended"):
    path.open("a")


@pytest.mark.parametrize("workdir", ["local", "gs://bucket/run"])
def test_metrics_resume_and_truncate(workdir, tmp_path, request):
  if workdir == "local":
    workdir = str(tmp_path / "run")
  else:
    request.getfixturevalue("gcs")
  writer = writers.MetricWriter(workdir)
  writer.write(1, {"loss": np.float32(2.5), "lr": 0.1})
  writer.write(2, {"loss": 2.0, "vec": np.arange(2)})
  # Every logged line is readable at once (flushed locally, uploaded on gs://).
  assert [m["step"] for m in read_jsonl(f"{workdir}/metrics.jsonl")] == [1, 2]
  writer.close()
  # A resumed run continues the same file.
  writer = writers.MetricWriter(workdir)
  writer.write(3, {"loss": 1.5})
  writer.write(4, {"loss": 1.0})
  writer.close()
  logged = read_jsonl(f"{workdir}/metrics.jsonl")
  assert [m["step"] for m in logged] == [1, 2, 3, 4]
  assert logged[0] == {"step": 1, "loss": 2.5, "lr": 0.1} and logged[1]["vec"] == [0, 1]
  # Resuming from checkpoint 2 drops what was logged after it.
  writers.truncate_metrics(workdir, 2)
  assert [m["step"] for m in read_jsonl(f"{workdir}/metrics.jsonl")] == [1, 2]
  writers.truncate_metrics(workdir, 2)  # nothing to drop: unchanged
  assert [m["step"] for m in read_jsonl(f"{workdir}/metrics.jsonl")] == [1, 2]
  tb = epath.Path(workdir) / "tensorboard"
  # One event file per writer, named by the second it started (two here may share a name).
  events = list(tb.iterdir())
  assert events and all(p.name.startswith("events.out.tfevents") for p in events)
  assert all(p.stat().length > 100 for p in events)


def test_truncate_drops_a_torn_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
  writers.truncate_metrics(str(tmp_path), 5)
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
  assert not (tmp_path / "metrics.jsonl.tmp").exists()
  writers.truncate_metrics(str(tmp_path / "missing"), 5)  # no file: nothing to do


def test_gs_never_appends_and_disabled_writer_writes_nothing(gcs):
  writers.MetricWriter("gs://bucket/other", enabled=False).write(1, {"loss": 1.0})
  assert not gcs.exists("gs://bucket/other/metrics.jsonl")
  writer = writers.MetricWriter("gs://bucket/run")
  for step in range(1, 4):
    writer.write(step, {"loss": 1.0 / step})
  writer.close()
  writers.truncate_metrics("gs://bucket/run", 1)
  assert FakeGCS.modes and not any("a" in m for m in FakeGCS.modes), FakeGCS.modes
  assert [m["step"] for m in read_jsonl("gs://bucket/run/metrics.jsonl")] == [1]


def test_eval_sample_grid_and_tokenizer_on_gs(gcs):
  from mmjax import writers
  from mmjax.evaluators import grid as grid_lib
  from mmjax.tokenizers import sentencepiece as tokenizer
  grid = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
  writer = writers.MetricWriter("gs://bucket/run")
  path = grid_lib.write_sample_grid(writer, "gs://bucket/run", 7, grid)
  writer.close()
  assert path == "gs://bucket/run/eval/samples_7.png"
  with gcs.open(path, "rb") as f:
    np.testing.assert_array_equal(np.asarray(Image.open(f)), grid)
  assert gcs.ls("gs://bucket/run/tensorboard", detail=False)
  tok = tokenizer.train_tokenizer(["a red circle", "a blue square", "two green stars"] * 20,
                                  vocab_size=40)
  epath.Path("gs://bucket/spm.model").write_bytes(tok.model_proto)
  loaded = tokenizer.Tokenizer.from_file("gs://bucket/spm.model")
  assert loaded.model_proto == tok.model_proto
  np.testing.assert_array_equal(loaded.encode(["a red square"], 8), tok.encode(["a red square"], 8))


def test_wandb_writer_logs_metrics_config_and_pictures_offline(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  import helpers
  monkeypatch.setenv("WANDB_SILENT", "true")
  config = helpers.tiny_config(**{"writers.wandb": True, "writers.wandb_mode": "offline",
                                  "writers.wandb_project": "mmjax-test"})
  workdir = tmp_path / "run"
  follower = writers.MetricWriter(workdir, enabled=False, config=config)  # not the lead
  follower.write(1, {"loss": 9.0})
  follower.close()
  assert not workdir.exists()
  writer = writers.MetricWriter(workdir, config=config)
  writer.write(5, {"loss": 2.71828, "learning_rate": 0.000125})
  writer.write(10, {"loss": 1.41421, "zeroshot/x/top1": 0.625})
  writer.write_image(10, "samples", np.full((12, 20, 3), 200, np.uint8))
  writer.close()
  (run,) = (workdir / "wandb").glob("offline-run-*")
  (path,) = run.glob("run-*.wandb")
  for _ in range(120):  # W&B's service may still be flushing the file after finish()
    records = wandb_records(path)
    if any(r.WhichOneof("record_type") == "exit" for r in records):
      break
    time.sleep(0.5)
  history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
             for r in records if r.WhichOneof("record_type") == "history"]
  assert [(h["_step"], h["loss"]) for h in history] == [(5, 2.71828), (10, 1.41421)]
  assert history[0]["learning_rate"] == 0.000125 and history[1]["zeroshot/x/top1"] == 0.625
  assert history[1]["samples/_type"] == "image-file"
  assert (run / "files" / history[1]["samples/path"]).exists()
  (started,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
  assert started.project == "mmjax-test" and started.display_name == "run"
  stored = {u.key: json.loads(u.value_json) for u in started.config.update}
  assert stored["data"]["max_text_len"] == config.data.max_text_len
  assert [r["step"] for r in read_jsonl(workdir / "metrics.jsonl")] == [5, 10]  # as before
  # The same work directory continues the same W&B run (its id comes from the path).
  again = writers.MetricWriter(workdir, config=config)
  again.write(15, {"loss": 1.0})
  again.close()
  assert {p.name.rsplit("-", 1)[1] for p in (workdir / "wandb").glob("offline-run-*")} == {
      run.name.rsplit("-", 1)[1]}


def wandb_records(path):
  """The protobuf records of a W&B run file: W&B's LevelDB-style log (a 7-byte file header,
  32 KiB blocks of records: checksum u32, length u16, type u8 = full / first / middle /
  last, then the payload)."""
  from wandb.proto import wandb_internal_pb2
  data, pos, block, out, pending = path.read_bytes(), 7, 32768, [], b""
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a header is padding
      pos += block - pos % block
      continue
    length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
    payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
    pending = payload if kind in (1, 2) else pending + payload
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      out.append(record)
  return out


def test_wandb_writer_without_the_package_is_one_usage_error(tmp_path, monkeypatch):
  import sys
  import helpers
  from mmjax import errors
  monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
  config = helpers.tiny_config(**{"writers.wandb": True})
  with pytest.raises(errors.UsageError, match=r"writers.wandb=True needs the wandb package"):
    writers.MetricWriter(tmp_path, config=config)
