"""A work directory belongs to one job: local flock, gs:// lease (against FakeGCS), the
multi-process handshake, and two real trainers on one work directory."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import helpers
from conftest import REPO
from helpers import command, environment
from mmjax import errors, locks


def test_local_second_holder_is_refused_naming_the_first(tmp_path):
  first = locks.FlockLock(str(tmp_path))
  first.acquire()
  with pytest.raises(locks.WorkdirInUseError) as error:
    locks.FlockLock(str(tmp_path)).acquire()  # another open file description: refused
  message = str(error.value)
  assert f"pid {os.getpid()}" in message and str(tmp_path) in message and "--workdir" in message
  assert isinstance(error.value, errors.UsageError)
  first.release()
  second = locks.FlockLock(str(tmp_path))
  second.acquire()
  second.release()


HOLDER = """
import sys, time
from mmjax import locks
lock = locks.FlockLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_local_lock_of_a_killed_process_does_not_block(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO,
                          env=environment(), stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(locks.WorkdirInUseError, match=f"pid {proc.pid}"):
      locks.FlockLock(str(tmp_path)).acquire()
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  lock = locks.FlockLock(str(tmp_path))
  lock.acquire()  # at once: the kernel released the dead process's lock
  lock.release()


class Clock:
  def __init__(self):
    self.now = 1_000_000.0

  def __call__(self):
    return self.now


def lease(clock, pid_alive=lambda pid: True, lost=None, workdir="gs://bucket/run"):
  return locks.LeaseLock(workdir, ttl_s=120, settle_s=0, clock=clock, pid_alive=pid_alive,
                         on_lost=(lost.append if lost is not None else None))


def stored(gcs_fs):
  return json.loads(gcs_fs.cat("gs://bucket/run/.mmjax.lease.json"))


def test_gs_lease_refuses_a_live_holder_and_is_released(gcs):
  clock = Clock()
  first = lease(clock)
  first.acquire()
  assert stored(gcs)["owner"] == first.lease["owner"]
  clock.now += 100  # heartbeat 100 s old: not expired
  with pytest.raises(locks.WorkdirInUseError, match="last heartbeat 100 s ago.* 20 s after"):
    lease(clock).acquire()
  first.beat()
  assert stored(gcs)["heartbeat"] == clock.now
  first.release()
  assert not gcs.exists("gs://bucket/run/.mmjax.lease.json")
  second = lease(clock)
  second.acquire()
  second.release()


def test_gs_lease_of_a_dead_job_is_taken_over(gcs):
  clock = Clock()
  dead = lease(clock)
  dead.acquire()
  dead._stop.set()  # killed: no more heartbeats, nothing released
  # On this machine (same boot id) with its pid gone: taken over at once.
  restarted = lease(clock, pid_alive=lambda pid: False)
  restarted.acquire()
  assert stored(gcs)["owner"] == restarted.lease["owner"]
  restarted._stop.set()
  # From another machine: only once the heartbeat is older than the TTL.
  elsewhere = dict(stored(gcs), boot_id="another-machine")
  gcs.pipe("gs://bucket/run/.mmjax.lease.json", json.dumps(elsewhere).encode())
  clock.now += 119
  with pytest.raises(locks.WorkdirInUseError):
    lease(clock, pid_alive=lambda pid: False).acquire()
  clock.now += 2
  late = lease(clock)
  late.acquire()
  assert stored(gcs)["owner"] == late.lease["owner"]
  late.release()


def test_gs_lease_race_the_last_writer_wins(gcs, monkeypatch):
  """Two jobs find no lease and both write one: B's write lands during A's settle wait, so
  A's read-back shows B's lease and A stops."""
  clock = Clock()
  a, b = lease(clock), lease(clock)

  def b_writes(seconds):  # A's settle wait: B, which also found no lease, writes its own
    b.lease = {**locks._owner(), "heartbeat": clock.now}
    b._write(b.lease)

  monkeypatch.setattr(locks.time, "sleep", b_writes)
  with pytest.raises(locks.WorkdirInUseError):
    a.acquire()
  assert a.lease is None and stored(gcs)["owner"] == b.lease["owner"]


def test_a_job_whose_lease_was_taken_stops_at_its_next_heartbeat(gcs):
  clock, lost = Clock(), []
  stalled = lease(clock, lost=lost)
  stalled.acquire()
  stalled._stop.set()
  clock.now += 121  # stalled past the TTL: another job takes the work directory
  taker = lease(clock)
  taker.acquire()
  stalled.beat()
  assert lost and "lost its lease" in lost[0]
  assert stored(gcs)["owner"] == taker.lease["owner"]  # the loser wrote nothing
  taker.release()


class FakeCoordination:
  def __init__(self):
    self.store = {}

  def key_value_set(self, key, value):
    self.store[key] = value

  def blocking_key_value_get(self, key, timeout_ms):
    return self.store[key]


def test_multi_process_job_follows_process_0(tmp_path):
  holder = locks.FlockLock(str(tmp_path))
  holder.acquire()  # another job
  coordination = FakeCoordination()
  with pytest.raises(locks.WorkdirInUseError):
    with locks.hold_workdir(str(tmp_path), 0, 2, coordination):
      pass
  with pytest.raises(locks.WorkdirInUseError, match="in use by another training job"):
    with locks.hold_workdir(str(tmp_path), 1, 2, coordination):
      pass
  holder.release()
  coordination = FakeCoordination()
  with locks.hold_workdir(str(tmp_path), 0, 2, coordination):
    with locks.hold_workdir(str(tmp_path), 1, 2, coordination):  # same job: no lock taken
      assert coordination.store[locks.COORDINATION_KEY] == "ok"


def test_two_trainers_on_one_workdir_and_a_killed_one(tmp_path, data_dir):
  """A second trainer is refused at once with one line; after the first is killed with -9,
  a restart trains."""
  workdir = str(tmp_path / "run")
  first = subprocess.Popen(
      command("mmjax.train", workdir, data_dir, "--config.total_steps=100000",
              "--config.eval_every_steps=0"),
      cwd=REPO, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    lock_file = os.path.join(workdir, locks.LOCK_FILE)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
      if os.path.exists(lock_file) and str(first.pid) in open(lock_file).read():
        break
      time.sleep(0.1)
    assert first.poll() is None, first.stderr.read()[-2000:]
    start = time.time()
    second = helpers.call(command("mmjax.train", workdir, data_dir), timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    assert second.stderr.strip().splitlines() == [
        f"mmjax.train: error: work directory {workdir} is in use by another training job "
        f"(pid {first.pid} on host {os.uname().nodename}, started "
        f"{second.stderr.split('started ')[1].split(')')[0]}): wait for it to end or stop it, "
        "or pass another --workdir"]
    assert time.time() - start < 120  # refused before any data, model or compile work
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
  restart = helpers.call(command("mmjax.train", workdir, data_dir, "--config.total_steps=2",
                                 "--config.eval_every_steps=0"))
  assert restart.returncode == 0, restart.stderr[-2000:]


def test_local_lock_is_kept_past_an_exception_until_the_process_exits(tmp_path):
  """A KeyboardInterrupt (or any crash) may unwind while a save thread still writes: the
  lock must outlive the block; a chosen exit (SystemExit) releases it."""
  held, released = str(tmp_path / "held"), str(tmp_path / "released")
  with pytest.raises(KeyboardInterrupt):
    with locks.hold_workdir(held):
      raise KeyboardInterrupt
  with pytest.raises(locks.WorkdirInUseError, match=f"pid {os.getpid()}"):
    locks.FlockLock(held).acquire()
  with pytest.raises(SystemExit):
    with locks.hold_workdir(released):
      raise SystemExit(42)
  locks.FlockLock(released).acquire()
