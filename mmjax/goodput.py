"""Goodput: where a run's wall time went, across its restarts (`<workdir>/goodput.json`).

Written by process 0 from the trainer's own events at every log step and at the end; a
restarted process reads it back and adds to it. Figures (seconds, since the first start):

  productive_training   training steps that advanced the run past any step reached before
  recomputed_training   training steps redone after a restart (they had been reached before
                        the failure, but their checkpoint had not been committed)
  compilation           compiling the train step (the persistent cache makes it short)
  checkpoint_restore    reading the checkpoint a start resumes from
  checkpoint_save       blocking on checkpoint saves (async saves block little)
  data_wait             the loop waiting for its next batch
  evaluation            evaluators during training
  lost_to_failures      between a process's last update of this file and its restart:
                        the work after the update, the time dead, the restart's wait
  other                 the rest: start-up (mesh, model, data iterators), logging, exit
  total                 wall time from the first start to the last update
  goodput               productive_training / total

Also: `steps_recomputed`, `attempts` (starts, the first included), `restarts` (per
restart: when, the step resumed from, seconds lost) and `storage_retries` (transient
object-store errors retried by process 0 on metrics, events, checkpoint saves and this file:
mmjax.retry). Google's ml-goodput-measurement library computes similar figures from Cloud
Logging, which needs a cloud project; this needs none.
"""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator

from etils import epath

from mmjax import retry

FILE = "goodput.json"
BUCKETS = ("productive_training", "recomputed_training", "compilation", "checkpoint_restore",
           "checkpoint_save", "data_wait", "evaluation", "lost_to_failures")


class Goodput:
  """Accumulates this process's phases onto the file's totals; writes when `enabled`."""

  def __init__(self, workdir: str, enabled: bool, *, clock: Callable[[], float] = time.time,
               retrier: retry.Retrier | None = None):
    self.path = epath.Path(workdir) / FILE
    self.enabled, self.clock = enabled, clock
    self.retrier = retrier or retry.Retrier()
    self.started = clock()
    previous = self._read() if enabled else {}
    self.first_start = previous.get("first_start", self.started)
    self.attempts = previous.get("attempts", 0) + 1
    self.restarts = previous.get("restarts", [])
    self.max_step = previous.get("max_step", 0)
    self.steps_recomputed = previous.get("steps_recomputed", 0)
    self._earlier_retries = previous.get("storage_retries", 0)
    self.seconds = {b: float(previous.get("seconds", {}).get(b, 0.0)) for b in BUCKETS}
    self._previous_updated = previous.get("updated")
    self._in_phases = 0.0  # phase time since the last step mark
    self._mark = None

  def resumed(self, step: int, tier: str = "persistent") -> None:
    """This start resumes from `step` (0: a fresh start), read from the checkpoint `tier`
    ('persistent' or 'local': mmjax.local_checkpoint)."""
    if self._previous_updated is not None:
      lost = max(0.0, self.started - self._previous_updated)
      self.seconds["lost_to_failures"] += lost
      self.restarts.append({"at": self.started, "resumed_from_step": step, "tier": tier,
                            "seconds_lost": round(lost, 3)})
      self.steps_recomputed += max(0, self.max_step - step)

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    """Time in `name` ('checkpoint save' -> checkpoint_save)."""
    start = self.clock()
    try:
      yield
    finally:
      elapsed = self.clock() - start
      self.seconds[name.replace(" ", "_")] += elapsed
      self._in_phases += elapsed

  def start_steps(self) -> None:
    """The training loop begins."""
    self._mark, self._in_phases = self.clock(), 0.0

  def step_done(self, step: int) -> None:
    """Loop iteration `step` ended: its time outside phases was training, productive if
    the run had never reached `step` before."""
    now = self.clock()
    training = max(0.0, now - self._mark - self._in_phases)
    self._mark, self._in_phases = now, 0.0
    if step > self.max_step:
      self.seconds["productive_training"] += training
      self.max_step = step
    else:
      self.seconds["recomputed_training"] += training

  def summary(self) -> dict:
    now = self.clock()
    total = now - self.first_start
    seconds = {b: round(v, 3) for b, v in self.seconds.items()}
    seconds["other"] = round(max(0.0, total - sum(self.seconds.values())), 3)
    seconds["total"] = round(total, 3)
    return {"goodput": round(self.seconds["productive_training"] / total, 4) if total else 0.0,
            "seconds": seconds, "steps_recomputed": self.steps_recomputed,
            "max_step": self.max_step, "attempts": self.attempts, "restarts": self.restarts,
            "storage_retries": self._earlier_retries + self.retrier.retries,
            "first_start": self.first_start, "updated": now}

  def write(self) -> None:
    if not self.enabled:
      return
    try:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      text = json.dumps(self.summary(), indent=1)
      self.retrier.call(lambda: self.path.write_text(text), f"upload of {self.path}")
    except Exception as e:  # an accounting file never stops training
      print(f"warning: cannot write {self.path} ({e})", flush=True)

  def _read(self) -> dict:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return {}
    except ValueError:
      return {}
