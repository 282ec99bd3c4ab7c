"""Warm start: a fresh run's parameters initialised from another model's checkpoint.

  python -m mmjax.train ... --config.init.checkpoint=DIR \
      --config.init.rules="('unimodal/decoder/(.*)=text/encoder/\\1', 'multimodal/.*=')"

Used by `mmjax.train` at start-up when its workdir has no checkpoint (a resumed run restores
its own). DIR is a work directory with `checkpoints/` (what `mmjax.train` and `mmjax.convert`
write); its latest step is read, parameters only.

Each rule is "TARGET=SOURCE": this model's parameters whose path fully matches the regex
TARGET are loaded from the source path SOURCE (a `re` template: \\1 is TARGET's first group);
an empty SOURCE keeps them freshly initialised. The first matching rule wins; a parameter
no rule matches is loaded from the same path when the checkpoint has it, else fresh.
A source parameter of another shape is resized when it is a ViT position table on another
grid (bicubic, class-token rows kept) or a text position table of another length (its first
rows; extra rows stay fresh); any other shape mismatch stops the run with one line
naming the parameter and both shapes. Training prints one table: which parameters were
loaded (from where), freshly initialised, resized.
"""
from __future__ import annotations

import collections
import re
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mmjax import checkpoint, errors, param_groups
from mmjax.models import two_tower


def parse_rules(rules: Any) -> list[tuple[re.Pattern, str]]:
  """config init.rules -> [(TARGET regex, SOURCE template)]; errors.ConfigError naming a
  malformed rule."""
  parsed = []
  for rule in rules:
    target, sep, source = str(rule).partition("=")
    if not sep:
      raise errors.ConfigError(f"config init.rules entry {rule!r}: expected 'TARGET=SOURCE' "
                               "(regex over this model's parameter paths = source path; "
                               "empty SOURCE = freshly initialised)")
    try:
      parsed.append((re.compile(target.strip()), source.strip()))
    except re.error as e:
      raise errors.ConfigError(f"config init.rules entry {rule!r}: {e}") from None
  return parsed


def source_path(target: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
  """Where `target` is loaded from: a source path, or None (fresh, by an empty rule)."""
  for regex, template in rules:
    if regex.fullmatch(target):
      return regex.sub(template, target, count=1) if template else None
  return target


def read_params(directory: str, step: int | None = None) -> tuple[int, dict[str, np.ndarray]]:
  """(step, {path: array}) of checkpoint `step` (default the latest) in work directory
  `directory`, on the host, whatever its model."""
  step = checkpoint.existing_step(directory, step)
  path = epath.Path(directory) / "checkpoints" / str(step) / "state"
  metadata = ocp.PyTreeCheckpointHandler().metadata(path)
  tree = getattr(metadata, "tree", metadata)
  if not isinstance(tree, dict) or "params" not in tree:
    raise errors.UsageError(f"config init.checkpoint={directory!r}: step {step} holds no "
                            "train state with parameters")
  item = {"params": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree["params"],
                                 is_leaf=lambda m: hasattr(m, "shape"))}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  with ocp.PyTreeCheckpointer() as reader:
    restored = reader.restore(path, args=ocp.args.PyTreeRestore(
        item, restore_args=restore_args, partial_restore=True))
  return step, {param_groups.path_name(p): np.asarray(v) for p, v in
                jax.tree_util.tree_flatten_with_path(restored["params"])[0]}


def _resized_position_table(source: np.ndarray, shape: tuple) -> np.ndarray | None:
  """A ViT position table [P + g*g, D] on the target's grid, or None if it is not one."""
  if source.ndim != 2 or len(shape) != 2 or source.shape[1] != shape[1]:
    return None
  grids = [int(np.sqrt(n)) for n in (source.shape[0], shape[0])]
  prefixes = [n - g * g for n, g in zip((source.shape[0], shape[0]), grids)]
  if prefixes[0] != prefixes[1] or prefixes[0] > 1:
    return None
  return two_tower.resize_position_embedding(source, prefixes[0], grids[1])


def initial_params(config: ml_collections.ConfigDict, params: Any) -> tuple[Any, str]:
  """(`params` with the parameters init.rules pick loaded from init.checkpoint, the table
  to print). `params`: this model's freshly initialised, sharded parameters."""
  rules = parse_rules(config.init.rules)
  step, stored = read_params(config.init.checkpoint)
  rows = []

  def load(path: tuple, fresh: jax.Array) -> jax.Array:
    target = param_groups.path_name(path)
    source = source_path(target, rules)
    if source is None or source not in stored:
      rows.append(("fresh", target, "-"))
      return fresh
    value = stored[source]
    status = "loaded"
    if value.shape != fresh.shape:
      if "pos_embed" in target and (resized := _resized_position_table(value, fresh.shape)) \
          is not None:
        value, status = resized, "resized"
      elif "pos_embed" in target and value.ndim == 2 and value.shape[1] == fresh.shape[1]:
        # A text position table of another length: its first rows, the rest fresh.
        kept = min(value.shape[0], fresh.shape[0])
        value = np.concatenate([value[:kept], np.asarray(jax.device_get(fresh))[kept:]])
        status = "resized"
      else:
        raise errors.ConfigError(
            f"config init.checkpoint={config.init.checkpoint!r}: parameter {target} has shape "
            f"{tuple(fresh.shape)} but its source {source} has {value.shape}; add an "
            f"init.rules entry for it ('{re.escape(target)}=' keeps it fresh)")
    value = value.astype(fresh.dtype)
    rows.append((status, target, source))
    return jax.make_array_from_callback(fresh.shape, fresh.sharding, lambda index: value[index])

  loaded = jax.tree_util.tree_map_with_path(load, params)
  return loaded, format_table(config.init.checkpoint, step, rows)


def format_table(directory: str, step: int, rows: list[tuple[str, str, str]]) -> str:
  """One table, one line per (status, module of the target, module of the source): counts
  of parameters; modules are the paths' first two names."""
  module = lambda path: "/".join(path.split("/")[:2]) if path != "-" else "-"
  groups = collections.Counter((status, module(t), module(s)) for status, t, s in rows)
  width = max(len(m) for _, m, _ in groups) if groups else 10
  lines = [f"Warm start from {directory} step {step}: "
           + ", ".join(f"{sum(1 for r in rows if r[0] == s)} {s}"
                       for s in ("loaded", "resized", "fresh")),
           f"  {'status':8} {'parameters':{width}} {'from':{width}} count"]
  for (status, target, source), count in sorted(groups.items()):
    lines.append(f"  {status:8} {target:{width}} {source:{width}} {count}")
  return "\n".join(lines)
