"""Orbax checkpoints: train state + the run's config + its data position + its assets.

Layout: `<workdir>/checkpoints/<step>/{state,config,data,assets}` (`data`: the data position,
i.e. the step, and the cumulative skipped-record counts of mmjax.data.accounting; `assets`:
files evaluation needs that are not in data_dir, e.g. the tokenizer trained on the data, so
a checkpoint folder alone can be evaluated, loaded and exported; checkpoints written before
assets existed have none and readers fall back to data_dir). Orbax
commits a step atomically (temporary directory renamed on success), so a step that was
being written when the process died is invisible to `latest_step` and is never restored.
"""
import base64
import json
import os
from typing import Any

import flax
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from mmjax import errors, integrity, retry


class CheckpointMismatchError(ValueError):
  pass


# Config keys that may change between a checkpoint and its resumption without a notice:
# they change neither the state's shapes nor the training trajectory.
RESUMABLE_CHANGES = ("name", "total_steps", "log_every_steps", "checkpoint_every_steps",
                     "eval_every_steps", "eval_batch_size", "evals", "checkpoint",
                     "compilation_cache_dir", "data_dir", "data.num_workers",
                     "data.prefetch_batches", "profile", "watchdog",
                     "writers")


DIRECTORY = "checkpoints"  # under the work directory


class Checkpointer:
  """Saves asynchronously when the trainer asks; keeps the last `checkpoint.max_to_keep`
  plus every step divisible by `checkpoint.keep_period` (Orbax 0.12's `keep_period` is
  `EveryNSteps(exact_interval=True)`: `step % keep_period == 0`, OR-ed with `LatestN`)."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, *,
               set_aside_incomplete: bool = False, retrier: retry.Retrier | None = None):
    """`set_aside_incomplete` (the trainer, which holds the work directory): newest steps
    whose files were cut are moved out of the way first (mmjax.integrity). `retrier`: a
    save or seal refused by the store with a transient error (mmjax.retry) is tried again
    and counted there; the array writes inside a save are retried by TensorStore itself."""
    self.directory = os.path.join(workdir, DIRECTORY)
    self.retrier = retrier or retry.Retrier()
    self._primary = jax.process_index() == 0
    self._unsealed: list[int] = []
    # Before Orbax lists the steps: a step cut after its commit must not be restored.
    if set_aside_incomplete:
      if self._primary and epath.Path(self.directory).exists():
        integrity.set_aside_incomplete(
            self.directory, list(ocp.utils.checkpoint_steps(self.directory)))
      if jax.process_count() > 1:
        ocp.multihost.sync_global_processes("mmjax_checkpoints_checked")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.checkpoint.max_to_keep,
        keep_period=config.checkpoint.keep_period or None,
        save_interval_steps=1, create=True, enable_async_checkpointing=True,
        # Uncommitted `<step>.orbax-checkpoint-tmp-*` directories of a killed save are
        # never restored (latest_step ignores them); this also deletes them at start.
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "config", "data", "assets"), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, config: ml_collections.ConfigDict,
           data: dict | None = None, assets: dict[str, bytes] | None = None) -> bool:
    """Starts an asynchronous save of `step` (the trainer decides when: force=True also
    keeps Orbax from polling the preemption sync point a second time for this step).
    `data`: JSON stored beside the data position (the trainer's skipped-record counts).
    `assets`: {file name: bytes} stored in the step (base64 in JSON: committed atomically
    with it), read back by `restore_assets`."""
    items = dict(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config.to_dict()),
        data=ocp.args.JsonSave({"step": int(step), **(data or {})}))
    if assets:
      items["assets"] = ocp.args.JsonSave(
          {name: base64.b64encode(blob).decode("ascii") for name, blob in assets.items()})
    self.wait()  # Orbax waits for the previous save anyway; then it is sealed
    if self._primary:
      self._unsealed.append(step)
    return self.retrier.call(
        lambda: self.manager.save(step, args=ocp.args.Composite(**items), force=True),
        f"checkpoint save of step {step}")

  def restore_assets(self, step: int) -> dict[str, bytes]:
    """The `assets` of `step` ({file name: bytes}); {} for a checkpoint saved without."""
    if not (epath.Path(self.directory) / str(step) / "assets").exists():
      return {}
    stored = self.manager.restore(step, args=ocp.args.Composite(
        assets=ocp.args.JsonRestore()))["assets"]
    return {name: base64.b64decode(text) for name, text in stored.items()}

  def restore_data(self, step: int) -> dict:
    """The `data` item of `step`: {"step": step, ...what save() was given}."""
    return self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))[
        "data"]

  def wait(self) -> None:
    """Waits for the save in flight; seals the committed steps (mmjax.integrity)."""
    self.manager.wait_until_finished()
    committed = set(self.manager.all_steps())
    for step in self._unsealed:
      if step in committed:
        path = epath.Path(self.directory) / str(step)
        try:
          self.retrier.call(lambda: integrity.seal(path), f"seal of {path}")
        except FileNotFoundError:  # deleted meanwhile (max_to_keep)
          pass
    self._unsealed = []

  def seal_committed(self) -> None:
    """Seals the last save as soon as it is committed (cheap when there is none to seal):
    called every step, so that even the newest step of a killed run is checked at restart."""
    if self._unsealed and not self.manager.is_saving_in_progress():
      self.wait()

  def close(self) -> None:
    self.wait()
    self.manager.close()

  def saved_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
        "config"]

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs), any topology."""
    check_shapes(self._stored_shapes(step, "state")["params"], abstract_state.params,
                 self.directory, step, prefix="params")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def restore_params(self, step: int, abstract_params: Any, ema: bool = False) -> Any:
    """Only the parameters of a train-state checkpoint (no optimizer state is read); with
    `ema`, their moving average instead (`optimizer.ema_decay`; errors.UsageError when the
    run kept none)."""
    key = "ema_params" if ema else "params"
    stored = self._stored_shapes(step, "state")
    if not ema and not stored.get(key):
      raise errors.UsageError(f"checkpoint {self.directory} step {step} holds no parameters: "
                              "it is not a train-state checkpoint of mmjax.train or "
                              "mmjax.convert")
    if not stored.get(key):
      raise errors.UsageError(
          f"checkpoint {self.directory} step {step} has no EMA of the parameters: it was "
          "trained without optimizer.ema_decay; evaluate its parameters (drop --ema / "
          "evals.use_ema)")
    check_shapes(stored[key], abstract_params, self.directory, step, prefix=key)
    item = {key: abstract_params}
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))
    return restored["state"][key]

  def _stored_shapes(self, step: int, item: str) -> Any:
    """Shapes of a stored item, read from its metadata by the handler directly (the manager's
    `item_metadata` is None for items it has not saved or restored in this process)."""
    path = epath.Path(self.directory) / str(step) / item
    try:
      metadata = ocp.PyTreeCheckpointHandler().metadata(path)
    except FileNotFoundError as e:  # a step folder copied or synced in part
      raise errors.UsageError(f"checkpoint step {step} in {self.directory} is incomplete "
                              f"({errors.one_line(str(e))}): copy the whole step folder, or "
                              "pass another --step") from None
    tree = getattr(metadata, "tree", metadata)
    return jax.tree.map(lambda m: tuple(m.shape), tree,
                        is_leaf=lambda m: hasattr(m, "shape"))


def existing_step(workdir: str, step: int | None = None) -> int:
  """The checkpoint step to read from `workdir`: `step`, or the latest. Creates nothing;
  raises errors.UsageError naming the work directory, or listing the steps there are."""
  directory = epath.Path(workdir) / "checkpoints"
  steps = sorted(ocp.utils.checkpoint_steps(directory)) if directory.exists() else []
  if not steps:
    raise errors.UsageError(f"no checkpoint in {directory} (--workdir {workdir}): is the path "
                            "right? mmjax.train writes its checkpoints there")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise errors.UsageError(f"--step {step}: no such checkpoint in {directory}; it has steps "
                            f"{', '.join(map(str, steps))}")
  return step


def config_changes(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
  """Dotted keys whose value differs from the checkpoint's config, except RESUMABLE_CHANGES."""
  def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
      return {prefix: d}
    out = {}
    for k, v in d.items():
      out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
  # Compare as stored (JSON: tuples become lists).
  old = flat(json.loads(json.dumps(saved, default=str)))
  new = flat(json.loads(json.dumps(config.to_dict(), default=str)))
  return [k for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k)
          and not any(k == r or k.startswith(r + ".") for r in RESUMABLE_CHANGES)]


def check_shapes(stored: Any, abstract: Any, directory: str, step: int,
                 prefix: str = "") -> None:
  """Raises naming the first parameter whose stored and expected shapes differ."""
  stored_flat = _flatten(stored)
  expected_flat = _flatten(jax.tree.map(lambda x: tuple(x.shape), abstract))
  for path in sorted(set(stored_flat) | set(expected_flat)):
    got, want = stored_flat.get(path), expected_flat.get(path)
    if got != want:
      name = "/".join(p for p in (prefix, path) if p)
      raise CheckpointMismatchError(
          f"checkpoint {directory} step {step} does not match the config at {name}: "
          f"checkpoint has {'no such entry' if got is None else f'shape {got}'}, "
          f"config expects {'no such entry' if want is None else f'shape {want}'}")


def _flatten(tree: Any) -> dict[str, tuple]:
  if hasattr(tree, "__dataclass_fields__") or not isinstance(tree, dict):
    tree = flax.serialization.to_state_dict(tree)
  if not isinstance(tree, dict):
    return {"": tree}
  flat = flax.traverse_util.flatten_dict(tree, keep_empty_nodes=False)
  return {"/".join(str(k) for k in path): v for path, v in flat.items()}
