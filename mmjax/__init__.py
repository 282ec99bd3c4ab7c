"""mmjax: multimodal (image-text-label) foundation models on JAX/Flax."""
import importlib
import os
import re


def _cpu_devices_requested() -> int:
  """CPU devices asked for through the environment (JAX_NUM_CPU_DEVICES or XLA_FLAGS'
  --xla_force_host_platform_device_count); 0 when neither is set."""
  flag = re.search(r"--xla_force_host_platform_device_count=(\d+)",
                   os.environ.get("XLA_FLAGS", ""))
  return max(int(os.environ.get("JAX_NUM_CPU_DEVICES") or 0), int(flag[1]) if flag else 0)


# XLA:CPU runs a program's independent collectives concurrently, each holding a thread of one
# pool until every device arrives, and sizes that pool max(NPROC or cores, devices). With
# several CPU devices on few cores, devices that reach two collectives in different orders can
# hold every thread and deadlock: 8 devices on 2 cores hung in CoCa's train step, with one
# all-gather inside the scanned layers and one outside ("only 4 of 8 threads arrived").
# NPROC is what XLA reads for the pool size, and only before JAX starts its CPU backend,
# hence here, at import. It also sizes the pool that runs each op's own work: on one device,
# where no collective can wait, 64 threads on 2 cores made a small matmul-heavy step 1.3x
# slower than the default and changed results in the last bits, so it is raised only for
# several CPU devices.
_CPU_DEVICES = _cpu_devices_requested()
if _CPU_DEVICES > 1:
  os.environ.setdefault("NPROC", str(max(os.cpu_count() or 1, 8 * _CPU_DEVICES)))


def __getattr__(name: str):
  """`mmjax.load` (mmjax.inference.load), imported on first use: `import mmjax` stays cheap
  (no JAX, Flax or TFDS import) for the commands and Grain workers that import it."""
  if name == "load":
    return importlib.import_module("mmjax.inference").load
  raise AttributeError(f"module 'mmjax' has no attribute {name!r}")
