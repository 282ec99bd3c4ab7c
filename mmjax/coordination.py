"""The job's coordination service (key-value store and barriers of `jax.distributed`),
without a device collective.

JAX has no public API for it: `multihost_utils.sync_global_devices` is a device collective,
bound by gloo's 30 s rendezvous on CPUs, and the key-value store is not exported. The client
lives in the private module `jax._src.distributed`; this module is the only place that
reaches into it, and tests/test_coordination.py fails with a clear message if JAX moves it.
"""
from __future__ import annotations

from typing import Any

import jax

try:
  from jax._src import distributed as _distributed
except ImportError as e:  # pragma: no cover (JAX moved its private module)
  raise ImportError(
      f"jax {jax.__version__} has no jax._src.distributed (JAX's coordination-service "
      "client moved): update mmjax/coordination.py") from e

if not hasattr(_distributed, "global_state"):  # pragma: no cover
  raise ImportError(
      f"jax {jax.__version__}: jax._src.distributed has no global_state (JAX's "
      "coordination-service client moved): update mmjax/coordination.py")


def client() -> Any:
  """The coordination-service client of this process (None before
  `jax.distributed.initialize`): key_value_set, blocking_key_value_get, wait_at_barrier."""
  return _distributed.global_state.client


def barrier(name: str, timeout_s: int) -> None:
  """All processes wait here, at most `timeout_s` seconds (no device collective involved)."""
  client().wait_at_barrier(name, timeout_s * 1000)
