"""Transient object-store errors (HTTP 408/429/5xx, timeouts, dropped connections) are retried
with exponential backoff and counted; they never end a run.

gcsfs raises `HttpError` with the status in `.code`; other fsspec stores raise
TimeoutError / ConnectionError. Anything else (a missing bucket, a permission error, a
full local disk) is not transient and is raised at once.
"""
from __future__ import annotations

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


class Retrier:
  """`call(fn, what)`: up to `attempts` tries, waiting `delay_s`, 2 * delay_s, ... (at most
  `max_delay_s`) between them. `retries` counts the failed tries that were retried."""

  def __init__(self, attempts: int = 6, delay_s: float = 0.5, max_delay_s: float = 16.0,
               sleep: Callable[[float], None] = time.sleep):
    self.attempts, self.delay_s, self.max_delay_s, self.sleep = (attempts, delay_s,
                                                                 max_delay_s, sleep)
    self.retries = 0

  def call(self, fn: Callable[[], T], what: str) -> T:
    for attempt in range(1, self.attempts + 1):
      try:
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
