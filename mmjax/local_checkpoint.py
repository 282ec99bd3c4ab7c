"""The local checkpoint tier: frequent saves of each process's own shards to fast local
storage, each copied to a peer process, so losing one host's local storage loses nothing.

Layout (`checkpoint.local_dir`, e.g. a RAM disk `/dev/shm/mmjax` or a local SSD; every host
its own, nothing shared between hosts):

  <local_dir>/process_<i>/own/<step>/{state,data}   this process's addressable shards
                                                     (Orbax, OCDBT), and its data position
  <local_dir>/process_<i>/peer/<step>/...            a byte copy of process (i-1) % n's own
                                                     step, sent over a JAX collective

Saving (`checkpoint.local_every_steps`): every process writes only the shards it holds (an
Orbax `ArrayHandler(primary_host=None, replica_id=None)`, as Orbax's own P2P local manager
does: no process waits on another's file system), asynchronously. At the next local save
(all processes reach it at the same step) the previous step is sealed (mmjax.integrity),
packed (tar) and sent to process (i+1) % n with one `ppermute` over a one-device-per-process
mesh, which writes it under `peer/` (temporary folder, renamed). The last two steps are kept
in each folder.

Restoring (`resume_step`): each process lists the steps it holds whole (own and peer copy:
sealed files intact, saved by this work directory, with this run's process count and state
layout) and publishes them on the coordination service's key-value store; every process
then computes the same newest step for which every process's shards are held by someone
(its own copy, or its peer's). That step is used when it is at least the persistent tier's
newest; a process whose own copy is gone gets it back from its peer (the reverse `ppermute`)
and restores from its own folder like the others. Otherwise (another process count, another
mesh, local folders lost or wiped) the persistent tier is restored, and `reason` says why.

Why not Orbax's emergency checkpointing (orbax.checkpoint.experimental.emergency, 0.12.8):
- `emergency.CheckpointManager` replicates between *replicas* along `replica_axis_index` of
  the mesh (slices). With one replica (any FSDP or tensor-parallel mesh over all devices,
  e.g. `mesh.shape=(1,-1,1)`) its `__init__` takes the branch `slice_count == 1`, deletes
  `local_directory` and is a plain persistent CheckpointManager: no local tier at all. With
  several replicas (`_MultisliceCheckpointManager`) only the non-primary slices write local
  checkpoints (the primary writes the persistent ones): on two data-parallel processes the
  local tier lives on process 1 alone, and killing that host loses it. It also saves the
  `state` item only ("TODO: b/330585086 - Support arbitrary items beyond state"), so the data
  position could not travel with it.
- `emergency.p2p.CheckpointManager` fetches a lost process's shards from a process holding
  the *same* shards in another replica (`PeerSelector.get_source_peer`: same relative index,
  other replica): nothing copies a process's shards to a peer, so with one replica a lost
  local folder is a lost step; it also serves files over its own TCP side-car (`P2PNode`).
- `ReplicatorCheckpointManager` needs GKE's multi-tier checkpointing replicator service.
What is reused from them: the per-process Orbax save (primary_host=None, replica_id=None).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint._src.serialization import type_handler_registry, type_handlers

from mmjax import coordination, errors, integrity

KEEP = 2  # local steps kept in each folder
NOTHING = "no local checkpoint"
DATA_FILE = "data/metadata"  # JsonCheckpointHandler's file in the `data` item
KEY_VALUE_TIMEOUT_S = 900
_BLOB_QUANTUM = 1 << 20  # the exchanged buffer's size is rounded up: few recompilations


class _QuietPerProcessSaves(logging.Filter):
  """Orbax warns at every save without a primary host that it cannot log the global object
  size; every local save is one by design, so the warning would only bury the step lines."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "Global object size logging disabled" not in str(record.msg)


def layout_of(abstract_state: Any) -> str:
  """A fingerprint of where every shard lives: each leaf's shape, dtype and, per device (id,
  process), the slice it holds. The same on every process; a local checkpoint is restored
  only onto an equal one, since each process wrote only the slices it held."""
  text = repr([(jax.tree_util.keystr(path), leaf.shape, str(leaf.dtype),
                sorted((d.id, d.process_index, str(index)) for d, index
                       in leaf.sharding.devices_indices_map(leaf.shape).items()))
               for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)])
  return hashlib.sha256(f"{jax.process_count()}|{text}".encode()).hexdigest()[:16]


class LocalCheckpoints:
  """This process's side of the local tier. Every method is called by all processes at the
  same steps (saves exchange data with the peer; `resume_step` agrees on a step)."""

  def __init__(self, local_dir: str, workdir: str):
    """Creates `<local_dir>/process_<i>`; errors.UsageError naming the key if it cannot."""
    self.local_dir = local_dir
    self.process, self.count = jax.process_index(), jax.process_count()
    self.root = epath.Path(os.path.expanduser(local_dir)) / f"process_{self.process}"
    self.own, self.peer = self.root / "own", self.root / "peer"
    self.workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
      for folder in (self.own, self.peer):
        folder.mkdir(parents=True, exist_ok=True)
      probe = self.root / f".write_test_{os.getpid()}"
      probe.write_text("")
      probe.unlink()
    except OSError as e:
      raise errors.UsageError(
          f"config checkpoint.local_dir={local_dir}: cannot create or write {self.root} "
          f"({e.strerror or e}): pass a writable folder on fast local storage (e.g. "
          "/dev/shm/mmjax), or '' to turn the local tier off") from None
    self.layout = ""
    self.reason = ""
    self._manager = None
    self._unreplicated: int | None = None

  # --- restore ---------------------------------------------------------------------------

  def resume_step(self, layout: str, persistent_step: int | None) -> int | None:
    """The local step every process restores (the same everywhere), or None: restore the
    persistent tier, for `self.reason`. Recovers this process's own copy from its peer when
    it lost it; drops the local steps that will not be restored (a new run writes them
    again)."""
    self.layout = layout
    own, own_why = self._whole_steps(self.own, self.process)
    peer, peer_why = self._whole_steps(self.peer, (self.process - 1) % self.count)
    held = _exchange({"own": own, "peer": peer, "rejected": own_why or peer_why},
                     self.process, self.count)
    step, self.reason = _newest_covered(held, persistent_step)
    if step is not None:
      lost = [p for p, h in enumerate(held) if step not in h["own"]]
      if lost:
        self._recover(step, lost)
    keep = {step} if step is not None else set()
    for folder in (self.own, self.peer):
      for path in folder.iterdir():
        if not (path.name.isdigit() and int(path.name) in keep):
          shutil.rmtree(path, ignore_errors=True)
    self._manager = self._make_manager()
    # Sent to the peer again at the next save: the peer's copy may be the one that is gone.
    self._unreplicated = step
    return step

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state on the shardings of `abstract_state`, the data position saved with it)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            abstract_state,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
        data=ocp.args.JsonRestore()))
    data = dict(restored["data"])
    for key in ("workdir", "layout", "process", "processes"):
      data.pop(key, None)
    return restored["state"], data

  def _whole_steps(self, folder: epath.Path, owner: int) -> tuple[list[int], str]:
    """(the steps in `folder` a restore may use, why the newest other one may not: '' if
    none is refused)."""
    out, why = [], ""
    for path in sorted(folder.iterdir(), key=lambda p: p.name, reverse=True):
      if not path.name.isdigit():
        continue
      wrong = integrity.problem(path)
      try:
        meta = json.loads((path / DATA_FILE).read_text())
      except (OSError, ValueError):
        meta, wrong = {}, wrong or f"{DATA_FILE}: missing or unreadable"
      if wrong is None and meta.get("processes") != self.count:
        wrong = f"written by {meta.get('processes')} processes, this run has {self.count}"
      elif wrong is None and meta.get("workdir") != self.workdir:
        wrong = f"written for --workdir {meta.get('workdir')}"
      elif wrong is None and (meta.get("layout") != self.layout
                              or meta.get("process") != owner):
        wrong = "another mesh, sharding or state shape"
      if wrong is None:
        out.append(int(path.name))
      elif not why:
        why = f"{path}: {wrong}"
    return out, why

  def _recover(self, step: int, lost: list[int]) -> None:
    """Processes in `lost` get their own copy of `step` back from their peer's folder."""
    sending = (self.process - 1) % self.count in lost
    blob = _pack(self.peer / str(step)) if sending else b""
    received = shift(blob, self.process, self.count, back=True)
    if self.process in lost:
      _unpack(received, self.own / str(step))

  # --- save ------------------------------------------------------------------------------

  def _make_manager(self) -> ocp.CheckpointManager:
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _QuietPerProcessSaves) for f in absl_logger.filters):
      absl_logger.addFilter(_QuietPerProcessSaves())
    # Every process writes its own folder: no primary host, every addressable shard.
    every_process = ocp.options.MultiprocessingOptions(
        primary_host=None, barrier_sync_key_prefix="mmjax_local")
    registry = type_handler_registry.create_type_handler_registry((
        jax.Array, type_handlers.ArrayHandler(primary_host=None, replica_id=None,
                                              use_replica_parallel=False)))
    return ocp.CheckpointManager(
        self.own,
        item_handlers=dict(
            state=ocp.PyTreeCheckpointHandler(multiprocessing_options=every_process,
                                              type_handler_registry=registry),
            data=ocp.JsonCheckpointHandler(multiprocessing_options=every_process)),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=KEEP, create=False, save_interval_steps=1,
            enable_async_checkpointing=True, multiprocessing_options=every_process,
            enable_per_process_directory_creation=True, cleanup_tmp_directories=True))

  def save(self, step: int, state: Any, data: dict | None = None) -> None:
    """Copies the previous local step to the peer, then starts saving `step`."""
    self.replicate()
    meta = {"step": int(step), **(data or {}), "workdir": self.workdir,
            "layout": self.layout, "process": self.process, "processes": self.count}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(meta)), force=True)
    self._unreplicated = step

  def replicate(self) -> None:
    """Waits for the local save in flight, seals it, and sends it to the next process."""
    if self._unreplicated is None:
      return
    step, self._unreplicated = self._unreplicated, None
    self._manager.wait_until_finished()
    if not (self.own / str(step) / integrity.MANIFEST).exists():  # else: a restored step
      integrity.seal(self.own / str(step))
    if self.count == 1:
      return
    received = shift(_pack(self.own / str(step)), self.process, self.count)
    _unpack(received, self.peer / str(step))
    for old in sorted((int(p.name) for p in self.peer.iterdir() if p.name.isdigit()),
                      reverse=True)[KEEP:]:
      shutil.rmtree(self.peer / str(old), ignore_errors=True)

  def close(self) -> None:
    """Waits for the save in flight (no collective: also on the way out of an error)."""
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()


def _newest_covered(held: list[dict], persistent_step: int | None) -> tuple[int | None, str]:
  """The newest step whose every process's copy is held (own, or by the next process), if
  it is at least `persistent_step`; and why, in words."""
  count = len(held)
  candidates = sorted({s for h in held for s in h["own"] + h["peer"]}, reverse=True)
  newest = None
  for step in candidates:
    missing = [p for p in range(count)
               if step not in held[p]["own"] and step not in held[(p + 1) % count]["peer"]]
    if not missing:
      newest = step
      break
  if newest is None:
    rejected = next((h["rejected"] for h in held if h["rejected"]), "")
    if rejected:
      return None, f"no usable local checkpoint ({rejected})"
    if candidates:
      return None, (f"no local step has every process's shards (step {candidates[0]}: "
                    "a process's own copy and its peer's copy are both gone)")
    return None, NOTHING
  if persistent_step is not None and newest < persistent_step:
    return None, f"the newest whole local step, {newest}, is older"
  lost = [p for p in range(count) if newest not in held[p]["own"]]
  why = "newer than the persistent tier's " + (
      f"step {persistent_step}" if persistent_step is not None else "(none)")
  if lost:
    why += f"; process {', '.join(map(str, lost))} restored from its peer's replica"
  return newest, why


def _exchange(mine: dict, process: int, count: int) -> list[dict]:
  """Every process's `mine`, in process order (the coordination service's key-value store:
  no device collective, so processes that start minutes apart still meet)."""
  if count == 1:
    return [mine]
  client = coordination.client()
  client.key_value_set(f"mmjax_local_tier/{process}", json.dumps(mine))
  return [json.loads(client.blocking_key_value_get(f"mmjax_local_tier/{p}",
                                                   KEY_VALUE_TIMEOUT_S * 1000))
          for p in range(count)]


def shift(blob: bytes, process: int, count: int, back: bool = False) -> bytes:
  """Sends `blob` to process (i+1) % n (`back`: (i-1) % n) and returns the one received,
  over a `ppermute` on a mesh of each process's first device (gloo on CPUs, the
  interconnect on accelerators). Each process's buffer is padded to the longest."""
  devices = [min((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
             for p in range(count)]
  mesh = Mesh(np.array(devices), ("process",))
  sizes = np.asarray(multihost_utils.process_allgather(
      np.array([len(blob)], np.int64))).reshape(-1)
  width = -(-max(int(sizes.max()), 1) // _BLOB_QUANTUM) * _BLOB_QUANTUM
  local = np.zeros((1, width), np.uint8)
  local[0, :len(blob)] = np.frombuffer(blob, np.uint8)
  spec = PartitionSpec("process")
  array = jax.make_array_from_single_device_arrays(
      (count, width), NamedSharding(mesh, spec), [jax.device_put(local, devices[process])])
  step = -1 if back else 1
  pairs = [(p, (p + step) % count) for p in range(count)]
  with jax.set_mesh(mesh):  # inside the trainer's own mesh context
    moved = _permute(mesh, tuple(pairs))(array)
  sender = (process - step) % count
  return np.asarray(moved.addressable_shards[0].data)[0, :int(sizes[sender])].tobytes()


def _permute(mesh: Mesh, pairs: tuple) -> Any:
  spec = PartitionSpec("process")
  return jax.jit(jax.shard_map(lambda x: jax.lax.ppermute(x, "process", pairs), mesh=mesh,
                               in_specs=spec, out_specs=spec))


def _pack(folder: epath.Path) -> bytes:
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w") as tar:
    tar.add(str(folder), arcname=".")
  return buffer.getvalue()


def _unpack(blob: bytes, folder: epath.Path) -> None:
  """Writes the packed step to `folder` in one piece (a temporary folder, renamed)."""
  partial = folder.parent / f"{folder.name}.partial-{int(time.time() * 1e6)}"
  with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
    tar.extractall(str(partial), filter="data")
  shutil.rmtree(folder, ignore_errors=True)
  partial.rename(folder)

