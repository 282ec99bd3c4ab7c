"""Transient object-store errors (HTTP 408/429/5xx, timeouts, dropped connections) are retried
with exponential backoff and counted; they never end a run.

gcsfs raises `HttpError` with the status in `.code`; other fsspec stores raise
TimeoutError / ConnectionError. Anything else (a missing bucket, a permission error, a
full local disk) is not transient and is raised at once.

Fault injection for tests (mmjax.train reads it from the environment, like its other
MMJAX_DEBUG_* hooks): `MMJAX_DEBUG_STORE_FAILURES=RATE:FIRST-LAST` makes each try of a
retried write fail with an HTTP 503 (`InjectedStoreError`, before the store is touched, as an
upload the store refused) with probability RATE while the run is between steps FIRST and
LAST: the object store failing a fraction of writes for a while.
"""
from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})


def is_transient(error: BaseException) -> bool:
  if isinstance(error, (TimeoutError, ConnectionError)):
    return True
  return getattr(error, "code", None) in TRANSIENT_HTTP


class InjectedStoreError(OSError):
  """A write the (simulated) object store refused with HTTP 503: fault injection only."""
  code = 503


class InjectedFailures:
  """Fails writes at `rate` while the step (`at_step`) is in [first, last]; seeded."""

  def __init__(self, rate: float, first: int, last: int, seed: int = 0):
    self.rate, self.first, self.last = rate, first, last
    self.rng = random.Random(seed)
    self.active = False
    self.injected = 0

  @classmethod
  def from_environment(cls, environ: dict[str, str], seed: int) -> "InjectedFailures | None":
    """MMJAX_DEBUG_STORE_FAILURES=RATE:FIRST-LAST, or None when unset."""
    value = environ.get("MMJAX_DEBUG_STORE_FAILURES", "")
    if not value:
      return None
    rate, steps = value.split(":")
    first, last = steps.split("-")
    return cls(float(rate), int(first), int(last), seed)

  def at_step(self, step: int) -> None:
    self.active = self.first <= step <= self.last

  def maybe_fail(self, what: str) -> None:
    if self.active and self.rng.random() < self.rate:
      self.injected += 1
      raise InjectedStoreError(f"503 Service Unavailable (injected): {what}")


class Retrier:
  """`call(fn, what)`: up to `attempts` tries, waiting `delay_s`, 2 * delay_s, ... (at most
  `max_delay_s`) between them. `retries` counts the failed tries that were retried.
  `faults`: injected store failures (tests only; see the module docstring)."""

  def __init__(self, attempts: int = 6, delay_s: float = 0.5, max_delay_s: float = 16.0,
               sleep: Callable[[float], None] = time.sleep,
               faults: InjectedFailures | None = None):
    self.attempts, self.delay_s, self.max_delay_s, self.sleep = (attempts, delay_s,
                                                                 max_delay_s, sleep)
    self.faults = faults
    self.retries = 0

  def at_step(self, step: int) -> None:
    """The run reached `step` (the window of injected failures is in steps)."""
    if self.faults is not None:
      self.faults.at_step(step)

  def call(self, fn: Callable[[], T], what: str) -> T:
    for attempt in range(1, self.attempts + 1):
      try:
        if self.faults is not None:
          self.faults.maybe_fail(what)
        return fn()
      except Exception as e:
        if attempt == self.attempts or not is_transient(e):
          raise
        delay = min(self.delay_s * 2 ** (attempt - 1), self.max_delay_s)
        self.retries += 1
        print(f"warning: {what} failed ({type(e).__name__}: {e}); retry {attempt}/"
              f"{self.attempts - 1} in {delay:g} s", file=sys.stderr, flush=True)
        self.sleep(delay)
    raise AssertionError("unreachable")
