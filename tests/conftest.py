"""Shared test setup: 8 fake CPU devices (sharding tests use sub-meshes of them), a shared
persistent XLA cache (CPU compiles dominate test time), the shapes data built once, and an
in-memory gs:// (FakeGCS, the `gcs` fixture; tests/test_writers.py says what it models)."""
import importlib
import io
import os
import tempfile

# The `test` extra installs libtpu for the ahead-of-time tests (mmjax.aot): keep JAX from
# initialising it (or a CUDA plugin) as a backend; tests run on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# 8 fake CPU devices, and XLA:CPU's thread pool sized for them: both before JAX's backend.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
from mmjax import devices  # noqa: E402

devices.configure_cpu_devices()

import fsspec
import jax
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem
from tensorboardX import record_writer

CACHE_DIR = os.path.join(tempfile.gettempdir(), "mmjax_test_jax_cache")
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The shapes datasets, built once for all xdist workers (ensure_built holds a file lock)."""
  from mmjax.data import shapes
  root = tmp_path_factory.getbasetemp().parent / "mmjax_datasets"
  for name in ("shapes/labels", "shapes/captions", "shapes/labels_seen",
               "shapes/labels_unseen"):
    shapes.ensure_built(name, str(root))
  return str(root)


class FakeGCS(MemoryFileSystem):
  """Paths without a leading slash, as gcsfs returns them (epath's glob prepends gs://)."""
  protocol = ("gs", "gcs")
  root_marker = ""
  store = {}  # not shared with memory://
  pseudo_dirs = [""]
  modes = []  # every mode a file was opened with
  # Flakiness: this fraction of uploads (files opened for writing) fails with a 503, as
  # gcsfs raises it (an error with `.code`), drawn from `rng` (set both in a test).
  failure_rate = 0.0
  rng = None
  failures = 0

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return path.strip("/")

  def _open(self, path, mode="rb", **kwargs):
    FakeGCS.modes.append(mode)
    if "a" in mode or "+" in mode:
      raise OSError(f"GCS objects cannot be appended to or updated in place ({mode=})")
    if "w" in mode and FakeGCS.failure_rate and FakeGCS.rng.random() < FakeGCS.failure_rate:
      FakeGCS.failures += 1
      raise FakeGCSError(503, f"503 Service Unavailable: {path}")
    return super()._open(path, mode, **kwargs)


class FakeGCSError(OSError):
  """gcsfs's HttpError: the HTTP status in `.code`."""

  def __init__(self, code, message):
    super().__init__(message)
    self.code = code


class FakeGCSEventFile:
  """tensorboardX's GCSRecordWriter, uploading to FakeGCS: the whole buffer on each flush."""

  def __init__(self, path):
    self.path, self.buffer = path, io.BytesIO()

  def write(self, data):
    self.buffer.write(data)

  def flush(self):
    with fsspec.filesystem("gs").open(self.path, "wb") as f:
      f.write(self.buffer.getvalue())

  def close(self):
    self.flush()


class FakeGCSEventFactory:
  def open(self, path):
    return FakeGCSEventFile(path)

  def directory_check(self, path):
    pass


@pytest.fixture
def gcs(monkeypatch):
  """A clean FakeGCS behind gs:// for epath (fsspec backend) and tensorboardX."""
  monkeypatch.setattr(epath.gpath, "_is_tf_installed", lambda: False)
  for name in ("gs", "gcs"):  # registered for this test only (monkeypatch restores it)
    monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, name, FakeGCS)
  monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs", FakeGCSEventFactory())
  FakeGCS.clear_instance_cache()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  FakeGCS.modes.clear()
  FakeGCS.failure_rate, FakeGCS.rng, FakeGCS.failures = 0.0, None, 0
  yield fsspec.filesystem("gs")
  FakeGCS.failure_rate = 0.0
  FakeGCS.clear_instance_cache()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: multi-process runs (minutes on 2 cores)")


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory, data_dir):
  """The workdir of `mmjax.train` on configs/shapes.py:coca_unicl_prefix,tiny (10 steps,
  checkpoints at 5 and 10, no evaluation), trained once per session; treat it read-only."""
  import helpers
  workdir = str(tmp_path_factory.mktemp("tiny_run") / "run")
  helpers.run("mmjax.train", workdir, data_dir, "--config.eval_every_steps=0")
  return workdir
