"""configure_cpu_devices() sizes XLA:CPU's thread pool (NPROC) only for several CPU devices;
importing mmjax changes nothing."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nproc_after(code: str, **env: str) -> str:
  """NPROC as a fresh process running `code` leaves it, in an environment without NPROC +
  `env`."""
  base = {k: v for k, v in os.environ.items()
          if k not in ("NPROC", "JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
  out = subprocess.run([sys.executable, "-c", f"{code}; import os; print(os.environ.get('NPROC'))"],
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
  code = "from mmjax import devices; devices.configure_cpu_devices()"
  assert nproc_after(code, **env) == expected


def test_importing_mmjax_changes_no_environment():
  assert nproc_after("import mmjax, mmjax.train", JAX_NUM_CPU_DEVICES="8") == "None"
