"""Shared test setup: 8 fake CPU devices (sharding tests use sub-meshes of them), a shared
persistent XLA cache (CPU compiles dominate test time), and the shapes data built once."""
import os
import tempfile

# The `test` extra installs libtpu for the ahead-of-time tests (mmjax.aot): keep JAX from
# initialising it (or a CUDA plugin) as a backend; tests run on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)
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


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: multi-process runs (minutes on 2 cores)")
