"""The process's CPU devices: XLA:CPU's thread pool sized for several of them.

`configure_cpu_devices()` is called by every command (`mmjax.command.run`) and by the tests'
configuration before JAX starts a backend; importing mmjax changes no environment variable.
"""
import os
import re


def cpu_devices_requested() -> int:
  """CPU devices asked for through the environment (JAX_NUM_CPU_DEVICES or XLA_FLAGS'
  --xla_force_host_platform_device_count); 0 when neither is set."""
  flag = re.search(r"--xla_force_host_platform_device_count=(\d+)",
                   os.environ.get("XLA_FLAGS", ""))
  return max(int(os.environ.get("JAX_NUM_CPU_DEVICES") or 0), int(flag[1]) if flag else 0)


def configure_cpu_devices() -> None:
  """Raises NPROC for several CPU devices; a user's own NPROC stays. Call it before JAX
  starts its CPU backend (XLA reads NPROC once, then).

  XLA:CPU runs a program's independent collectives concurrently, each holding a thread of one
  pool until every device arrives, and sizes that pool max(NPROC or cores, devices). With
  several CPU devices on few cores, devices that reach two collectives in different orders
  can hold every thread and deadlock: 8 devices on 2 cores hung in CoCa's train step, with
  one all-gather inside the scanned layers and one outside ("only 4 of 8 threads arrived").
  NPROC also sizes the pool that runs each op's own work: on one device, where no collective
  can wait, 64 threads on 2 cores made a small matmul-heavy step 1.3x slower than the default
  and changed results in the last bits, so it is raised only for several CPU devices.
  """
  requested = cpu_devices_requested()
  if requested > 1:
    os.environ.setdefault("NPROC", str(max(os.cpu_count() or 1, 8 * requested)))
