"""SIGINT (Ctrl-C) and SIGTERM stop training without losing work.

The first signal asks for a stop: the step in flight finishes, its state is checkpointed,
and the trainer exits with the preemption status (42, rerun to resume). A second SIGINT
exits at once with status 130 (128 + SIGINT): saves not yet committed are discarded (their
`<step>.orbax-checkpoint-tmp-*` directories are removed where possible; Orbax never restores
an uncommitted step, and deletes what is left at the next start), so no restore can take a
partial checkpoint. Exiting at once (`os._exit`) also keeps the work directory's lock until
the process is gone: the kernel drops it with the process, never before (mmjax.locks).

One process: a Python handler sets a flag that the loop reads after each step. Several
processes: every process must checkpoint the same step, which only JAX's preemption sync
point can agree on, and its notifier listens for SIGTERM alone, so the first SIGINT is
turned into a SIGTERM to this process (the notifier's own handler must stay installed for
SIGTERM itself).
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import sys
import threading

INTERRUPTED_EXIT_CODE = 130  # a second Ctrl-C: the shell's status for "killed by SIGINT"


class Interrupts:
  """Installs the handlers (main thread only); `requested` turns True at the first signal.

  `checkpoint_dirs`: where uncommitted saves are discarded at a second SIGINT.
  `multi_process`: forward SIGINT to JAX's preemption notifier (SIGTERM) instead of
  handling SIGTERM here.
  """

  def __init__(self, checkpoint_dirs: tuple[str, ...] = (), multi_process: bool = False):
    self.requested = False
    self.checkpoint_dirs = checkpoint_dirs
    self.multi_process = multi_process
    self._count = 0
    if threading.current_thread() is not threading.main_thread():
      return  # signal handlers can only be installed from the main thread
    signal.signal(signal.SIGINT, self._on_sigint)
    if not multi_process:
      signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._first("SIGTERM")

  def _on_sigint(self, signum, frame) -> None:
    del signum, frame
    self._count += 1
    if self._count == 1:
      self._first("SIGINT")
      if self.multi_process:
        os.kill(os.getpid(), signal.SIGTERM)
      return
    self.exit_now()

  def _first(self, name: str) -> None:
    if not self.requested:
      print(f"{name}: stopping after this step with a checkpoint (exit status 42, rerun to "
            f"resume); press Ctrl-C again to exit at once without saving", file=sys.stderr,
            flush=True)
    self.requested = True

  def exit_now(self) -> None:
    discarded = discard_uncommitted(self.checkpoint_dirs)
    print(f"second SIGINT: exiting at once (status {INTERRUPTED_EXIT_CODE})"
          + (f"; discarded {discarded} uncommitted checkpoint save(s)" if discarded else "")
          + "; rerun to resume from the last committed checkpoint", file=sys.stderr,
          flush=True)
    os._exit(INTERRUPTED_EXIT_CODE)


def discard_uncommitted(directories: tuple[str, ...]) -> int:
  """Removes Orbax's temporary step directories (best effort: a save thread may still be
  writing; whatever stays is never restored and is deleted at the next start)."""
  count = 0
  for directory in directories:
    if "://" in directory:
      continue  # object stores: Orbax ignores a step without its commit marker
    for path in glob.glob(os.path.join(glob.escape(directory), "*.orbax-checkpoint-tmp*")):
      shutil.rmtree(path, ignore_errors=True)
      count += 1
  return count
