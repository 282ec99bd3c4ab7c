"""Inter-process locks: `file_lock` (wait for a shared build) and `hold_workdir` (a work
directory belongs to one training job).

`hold_workdir` refuses a second job at once, with one line naming the holder:

* Local (and NFS) work directories: process 0 holds `fcntl.flock(LOCK_EX | LOCK_NB)` on
  `<workdir>/.mmjax.lock` for the whole run. The kernel releases it when the process dies
  in any way, kill -9 included, so a killed job never blocks its restart. The file records
  the holder (host, pid, start time) for the message. A filesystem without locks (some
  FUSE mounts) gets a warning and no protection.
* gs:// (object stores have no locks): a lease object `<workdir>/.mmjax.lease.json`
  {owner, host, boot_id, pid, started, heartbeat}. Process 0 takes it when it is absent,
  expired (heartbeat older than LEASE_TTL_S), or names a process of this very machine
  (same boot id) that no longer runs, so a job killed with -9 and restarted on its machine
  takes over at once. Taking it is write, wait SETTLE_S, read back: of two jobs starting
  together the last writer wins and the other sees it and stops. A thread rewrites the
  heartbeat every LEASE_TTL_S / 4; if it finds the lease taken over (this job was stalled
  past the TTL), the process exits at once rather than write beside the new owner.
  Trade-off: without compare-and-swap on the object, the race is closed by the settle wait
  (not by the store), and a job that died on another machine (a deleted VM) blocks a
  restart elsewhere until its lease expires (the message says how long).
* Released when the block ends normally or by SystemExit (a chosen exit, e.g. preemption,
  after the checkpoint was committed). On any other exception (KeyboardInterrupt included)
  it is kept until the process has exited: the kernel drops the flock with the process, the
  gs:// lease keeps beating on its daemon thread until then.
* Multi-host jobs: all processes of one job share the work directory, so only process 0
  takes the lock; it publishes the outcome in the job's coordination service, and every
  process of a refused job stops with the same line.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from etils import epath

from mmjax import coordination as coordination_lib
from mmjax import errors

LOCK_FILE = ".mmjax.lock"
LEASE_FILE = ".mmjax.lease.json"
LEASE_TTL_S = 120.0
SETTLE_S = 2.0
COORDINATION_KEY = "mmjax/workdir_lock"
COORDINATION_TIMEOUT_S = 600


class WorkdirInUseError(errors.UsageError):
  """Another job holds the work directory."""


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
  """An exclusive inter-process lock on `path` (created if missing); waits for it."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def hold_workdir(workdir: str, process_index: int = 0, process_count: int = 1,
                 coordination: Any = None) -> Iterator[None]:
  """Holds `workdir` for this job while the block runs (see the module docstring).

  `coordination`: the job's coordination-service client (multi-process; default: JAX's).
  Raises WorkdirInUseError (a UsageError: one line, exit status 2) in every process of a
  job that another job's holding out.
  """
  if process_count > 1:
    coordination = coordination or coordination_lib.client()
  if process_index != 0:
    status = coordination.blocking_key_value_get(COORDINATION_KEY,
                                                 COORDINATION_TIMEOUT_S * 1000)
    if status != "ok":
      raise WorkdirInUseError(status)
    yield
    return
  try:
    lock = LeaseLock(workdir) if "://" in workdir else FlockLock(workdir)
    lock.acquire()
  except WorkdirInUseError as e:
    if process_count > 1:
      coordination.key_value_set(COORDINATION_KEY, str(e))
    raise
  if process_count > 1:
    coordination.key_value_set(COORDINATION_KEY, "ok")
  try:
    yield
  except SystemExit:  # a chosen exit (preempted: its checkpoint is committed)
    lock.release()
    raise
  except BaseException:
    # Threads may still write into the work directory (a save in flight, input workers)
    # while the exception unwinds: keep the lock until the process is gone.
    _ABANDONED.append(lock)
    raise
  lock.release()


# Locks left to the end of the process: a FlockLock's open file must not be collected.
_ABANDONED: list[Any] = []


def _owner() -> dict[str, Any]:
  return {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "boot_id": _boot_id(),
          "pid": os.getpid(), "started": time.time(), "command": " ".join(sys.argv)[:300]}


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


def _describe(holder: dict[str, Any]) -> str:
  started = datetime.datetime.fromtimestamp(holder.get("started", 0)).strftime(
      "%Y-%m-%d %H:%M:%S")
  return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {started}"


class FlockLock:
  """`<workdir>/.mmjax.lock` under flock: released by the kernel when the holder dies."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._file = None

  def acquire(self) -> None:
    try:
      os.makedirs(self.workdir, exist_ok=True)
      f = open(self.path, "a+")
    except (FileExistsError, NotADirectoryError):
      raise errors.UsageError(f"--workdir {self.workdir}: a file is in the way (not a "
                              "folder): pass a folder") from None
    except OSError as e:
      raise errors.UsageError(f"--workdir {self.workdir}: cannot create it or write in it "
                              f"({e.strerror}): pass a writable folder") from None
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = _read_json(f.read())
      f.close()
      raise WorkdirInUseError(
          f"work directory {self.workdir} is in use by another training job "
          f"({_describe(holder)}): wait for it to end or stop it, or pass another --workdir"
      ) from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise
      print(f"warning: cannot lock {self.path} ({e.strerror}): nothing stops a second job "
            "from using this work directory", file=sys.stderr, flush=True)
      f.close()
      return
    f.seek(0)
    f.truncate()
    f.write(json.dumps(_owner()))
    f.flush()
    self._file = f  # held open: closing it (or dying) releases the lock

  def release(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


class LeaseLock:
  """A lease object with a heartbeat, for object stores (gs://) that have no locks."""

  def __init__(self, workdir: str, *, ttl_s: float = LEASE_TTL_S, settle_s: float = SETTLE_S,
               clock: Callable[[], float] = time.time,
               pid_alive: Callable[[int], bool] | None = None,
               on_lost: Callable[[str], None] | None = None):
    self.workdir = workdir
    self.path = epath.Path(workdir) / LEASE_FILE
    self.ttl_s, self.settle_s, self.clock = ttl_s, settle_s, clock
    self.pid_alive = pid_alive or _pid_alive
    self.on_lost = on_lost or _exit_lost
    self.lease: dict[str, Any] | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def acquire(self) -> None:
    current = self._read()
    if current is not None and not self._takeable(current):
      raise WorkdirInUseError(self._in_use(current))
    self.lease = {**_owner(), "heartbeat": self.clock()}
    self._write(self.lease)
    time.sleep(self.settle_s)
    current = self._read()
    if current is None or current.get("owner") != self.lease["owner"]:
      self.lease = None
      raise WorkdirInUseError(self._in_use(current or {}))
    self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                    name="mmjax-workdir-lease")
    self._thread.start()

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    current = self._read()
    if self.lease is not None and current and current.get("owner") == self.lease["owner"]:
      self.path.unlink()
    self.lease = None

  def beat(self) -> None:
    """Renews the heartbeat; calls on_lost if another job has taken the lease."""
    current = self._read()
    if current is not None and current.get("owner") != self.lease["owner"]:
      self.on_lost(f"work directory {self.workdir}: this job lost its lease to another job "
                   f"({_describe(current)}); it stopped without writing more")
      return
    self.lease["heartbeat"] = self.clock()
    self._write(self.lease)

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.ttl_s / 4):
      try:
        self.beat()
      except Exception as e:  # a transient store error: the next beat retries
        print(f"warning: workdir lease heartbeat failed ({e})", file=sys.stderr, flush=True)

  def _takeable(self, lease: dict[str, Any]) -> bool:
    if self.clock() - float(lease.get("heartbeat", 0)) > self.ttl_s:
      return True  # expired
    same_machine = lease.get("boot_id") and lease.get("boot_id") == _boot_id()
    return bool(same_machine and not self.pid_alive(int(lease.get("pid", 0))))

  def _in_use(self, lease: dict[str, Any]) -> str:
    age = self.clock() - float(lease.get("heartbeat", self.clock()))
    return (f"work directory {self.workdir} is in use by another training job "
            f"({_describe(lease)}; last heartbeat {age:.0f} s ago, it expires "
            f"{max(0.0, self.ttl_s - age):.0f} s after the last one): wait for it to end or "
            "stop it, or pass another --workdir")

  def _read(self) -> dict[str, Any] | None:
    try:
      return _read_json(self.path.read_text())
    except FileNotFoundError:
      return None

  def _write(self, lease: dict[str, Any]) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.path.write_text(json.dumps(lease))  # one upload: replaces the object atomically


def _read_json(text: str) -> dict[str, Any]:
  try:
    value = json.loads(text)
  except ValueError:
    return {}
  return value if isinstance(value, dict) else {}


def _pid_alive(pid: int) -> bool:
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _exit_lost(message: str) -> None:
  # Runs on the heartbeat thread, where sys.exit would end only the thread.
  print(f"mmjax.train: error: {message}", file=sys.stderr, flush=True)
  os._exit(errors.FAILURE_EXIT_CODE)
