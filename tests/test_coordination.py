"""mmjax.coordination reaches JAX's private coordination-service client: if JAX moves it,
these fail naming what moved (the start barrier and the work-directory lock depend on it)."""
import jax
from jax._src import lib as jax_lib

from mmjax import coordination

CALLED = ("wait_at_barrier", "key_value_set", "blocking_key_value_get")


def test_the_private_client_has_the_methods_mmjax_calls():
  state = coordination._distributed.global_state
  assert hasattr(state, "client"), (
      f"jax {jax.__version__}: jax._src.distributed.global_state has no client; update "
      "mmjax/coordination.py")
  client_class = getattr(getattr(jax_lib, "_jax", None), "DistributedRuntimeClient", None)
  assert client_class is not None, (
      f"jax {jax.__version__}: no jax._src.lib._jax.DistributedRuntimeClient (the "
      "coordination client moved); update mmjax/coordination.py and this test")
  missing = [m for m in CALLED if not hasattr(client_class, m)]
  assert not missing, (f"jax {jax.__version__}: the coordination client has no {missing}; "
                       "update mmjax/coordination.py and mmjax/locks.py")


def test_without_a_distributed_job_there_is_no_client():
  assert coordination.client() is None


def test_barrier_waits_through_the_client_in_milliseconds(monkeypatch):
  calls = []

  class Client:
    def wait_at_barrier(self, name, timeout_ms):
      calls.append((name, timeout_ms))

  monkeypatch.setattr(coordination._distributed.global_state, "client", Client())
  coordination.barrier("start", 3)
  assert calls == [("start", 3000)]
