"""A per-process watchdog: a hang becomes a diagnosis and an exit status, not a stuck job.

The trainer reports each completed step (`beat`: its metrics reached the host, so the step
finished on the devices). If no step completes within `watchdog.timeout_s`, a thread writes
every thread's Python stack and the last completed step to `<workdir>/hangs/<process>.txt`,
prints one line and exits the process with HANG_EXIT_CODE (43), which launchers tell apart
from a crash (1), a usage error (2) and a preemption (42): launch/common.sh restarts it.

Legitimately long phases get `watchdog.long_timeout_s` instead: the first step (its input
pipeline starts, peers meet), evaluation and checkpoint saves (`with watchdog.phase(...)`).

Stragglers: a completed step that took `watchdog.straggler_factor` times this process's
median step time (over the last STRAGGLER_WINDOW steps) is logged as one line (time in
long phases is not counted as step time).
"""
from __future__ import annotations

import collections
import contextlib
import os
import socket
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator

from etils import epath

HANG_EXIT_CODE = 43
STRAGGLER_WINDOW = 50
STRAGGLER_MIN_SAMPLES = 10


class Watchdog:
  """`timeout_s` <= 0 disables it (beats still feed the straggler log)."""

  def __init__(self, workdir: str, process_index: int, timeout_s: float,
               long_timeout_s: float, straggler_factor: float, *,
               clock: Callable[[], float] = time.monotonic,
               on_hang: Callable[[int], None] | None = None):
    self.path = epath.Path(workdir) / "hangs" / f"{process_index}.txt"
    self.process_index = process_index
    self.timeout_s, self.long_timeout_s = timeout_s, long_timeout_s
    self.straggler_factor = straggler_factor
    self.clock = clock
    self.on_hang = on_hang or os._exit
    self.last_step: int | None = None
    self.stragglers = 0
    self._phase = "first step"  # a long phase until the first step completes
    self._since = clock()
    self._step_times: collections.deque[float] = collections.deque(maxlen=STRAGGLER_WINDOW)
    self._stop = threading.Event()
    self._lock = threading.Lock()
    self._thread: threading.Thread | None = None

  def start(self) -> None:
    if self.timeout_s > 0:
      self._thread = threading.Thread(target=self._watch, daemon=True, name="mmjax-watchdog")
      self._thread.start()

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def beat(self, step: int) -> None:
    """Step `step` completed."""
    now = self.clock()
    with self._lock:
      elapsed, was_step = now - self._since, self._phase is None
      self.last_step, self._since = step, now
      if self._phase == "first step":
        self._phase = None
    if was_step:
      self._record(step, elapsed)

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    """A long phase (evaluation, checkpoint): `long_timeout_s` applies, its time is not step
    time."""
    with self._lock:
      outer, self._phase, self._since = self._phase, name, self.clock()
    try:
      yield
    finally:
      with self._lock:
        self._phase, self._since = outer, self.clock()

  def _record(self, step: int, elapsed: float) -> None:
    if len(self._step_times) >= STRAGGLER_MIN_SAMPLES:
      median = statistics.median(self._step_times)
      if median > 0 and elapsed > self.straggler_factor * median:
        self.stragglers += 1
        print(f"straggler: process {self.process_index} step {step} took {elapsed:.3f} s, "
              f"{elapsed / median:.1f}x its median {median:.3f} s (watchdog.straggler_factor="
              f"{self.straggler_factor:g})", file=sys.stderr, flush=True)
    self._step_times.append(elapsed)

  def overdue(self) -> float | None:
    """Seconds past the allowed time, or None while on time."""
    with self._lock:
      limit = self.timeout_s if self._phase is None else self.long_timeout_s
      waited = self.clock() - self._since
    return waited if waited > limit else None

  def _watch(self) -> None:
    while not self._stop.wait(min(1.0, self.timeout_s / 4)):
      waited = self.overdue()
      if waited is not None:
        self.report(waited)
        self.on_hang(HANG_EXIT_CODE)
        return

  def report(self, waited: float) -> None:
    """Writes the stacks file and prints the one line."""
    phase = self._phase or "training step"
    header = (f"process {self.process_index} (host {socket.gethostname()}, pid {os.getpid()}): "
              f"no progress for {waited:.0f} s in {phase} (watchdog.timeout_s="
              f"{self.timeout_s:g}, long_timeout_s={self.long_timeout_s:g}); last completed "
              f"step: {self.last_step}\n")
    where = str(self.path)
    try:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self.path.write_text(header + "\n" + thread_stacks())
    except Exception as e:  # the store itself may be what hangs: the line still goes out
      where = f"(not written: {e})"
    print(f"mmjax.train: error: hang: no progress for {waited:.0f} s in {phase} after step "
          f"{self.last_step}; stacks of every thread in {where}; exiting with status "
          f"{HANG_EXIT_CODE}", file=sys.stderr, flush=True)


def thread_stacks() -> str:
  """Every Python thread's stack, most recent call last."""
  names = {t.ident: t.name for t in threading.enumerate()}
  parts = []
  for ident, frame in sys._current_frames().items():
    parts.append(f"Thread {names.get(ident, '?')} ({ident}):\n"
                 + "".join(traceback.format_stack(frame)))
  return "\n".join(parts)
