"""Importing mmjax sizes XLA:CPU's thread pool (NPROC) only for several CPU devices."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nproc_after_import(**env: str) -> str:
  """NPROC as a fresh `import mmjax` leaves it, in an environment without NPROC + `env`."""
  base = {k: v for k, v in os.environ.items()
          if k not in ("NPROC", "JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
  out = subprocess.run([sys.executable, "-c", "import mmjax, os; print(os.environ.get('NPROC'))"],
                       env={**base, **env, "PYTHONPATH": REPO}, capture_output=True, text=True,
                       check=True, timeout=120)
  return out.stdout.strip()


@pytest.mark.parametrize("env, expected", [
    ({}, "None"),
    ({"JAX_NUM_CPU_DEVICES": "1"}, "None"),
    ({"JAX_NUM_CPU_DEVICES": "8"}, str(max(os.cpu_count(), 64))),
    ({"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"},
     str(max(os.cpu_count(), 32))),
    ({"JAX_NUM_CPU_DEVICES": "8", "NPROC": "12"}, "12"),  # the user's own value stays
])
def test_thread_pool_is_raised_for_several_cpu_devices_only(env, expected):
  assert nproc_after_import(**env) == expected
