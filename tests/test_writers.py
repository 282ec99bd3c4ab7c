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
