"""Parameters picked by path, for fine-tuning: locked ones (`optimizer.frozen`) and each one's
layer-wise learning-rate scale (`optimizer.layer_decay`).

A parameter's path is its tree keys joined by "/", e.g. "vision/encoder/layers/mlp/fc1/dense/
kernel" (`mmjax.summary` lists them); patterns are Python regular expressions matched against
the whole path (`re.fullmatch`), so "vision/.*" locks the image tower and nothing else.
"""
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Layer-wise decay (BEiT, open_clip, big_vision): the towers whose stacks are decayed, by
# top-level module, and the parameters that are their inputs (embeddings). In a tower of L
# layers, layer i (0 = first) is scaled by decay^(L - i), its embeddings by decay^(L + 1);
# everything else (final norms, poolers, projections, CoCa's multimodal decoder, heads, the
# logit scale) by 1. CoCa's text tower is its unimodal decoder with the shared token table.
TOWERS = {"vision": "image", "text": "text", "unimodal": "text", "token_embed": "text"}
EMBEDDING_NAMES = ("patch_embed", "pos_embed", "cls", "mask_token", "token_embed",
                   "embedding", "prefix")
STACKED = "layers"  # a scanned stack: one array holds every layer on axis 0
UNROLLED = re.compile(r"layers_(\d+)")  # an unrolled stack's layer i


def path_name(path: tuple) -> str:
  """A jax key path or a tuple of names -> "a/b/c"."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def names(params: Any) -> list[str]:
  return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def matches(pattern: str, params: Any) -> Any:
  """A tree of bools like `params`: True where the path fully matches `pattern` ("" = none)."""
  regex = re.compile(pattern) if pattern else None
  return jax.tree_util.tree_map_with_path(
      lambda path, _: bool(regex and regex.fullmatch(path_name(path))), params)


def check_frozen(pattern: str, params: Any) -> list[str]:
  """Problems with `optimizer.frozen` for these parameters (one line each)."""
  if not pattern:
    return []
  try:
    re.compile(pattern)
  except re.error as e:
    return [f"config optimizer.frozen={pattern!r} is not a regular expression ({e})"]
  locked = jax.tree.leaves(matches(pattern, params))
  if not any(locked):
    return [f"config optimizer.frozen={pattern!r} matches no parameter path (paths look like "
            f"{names(params)[0]!r}; `python -m mmjax.summary` lists them)"]
  if all(locked):
    return [f"config optimizer.frozen={pattern!r} locks every parameter: nothing would train"]
  return []


def stop_gradient(params: Any, pattern: str) -> Any:
  """`params` with the parameters matching `pattern` behind lax.stop_gradient: their gradient
  is a symbolic zero, so nothing that depends on locked parameters alone (a whole locked
  tower, forward inputs included) gets a backward pass at all."""
  if not pattern:
    return params
  return jax.tree.map(lambda p, locked: jax.lax.stop_gradient(p) if locked else p,
                      params, matches(pattern, params))


class StopGradientModel:
  """A model whose `apply` puts the parameters matching `pattern` behind `stop_gradient`;
  every other attribute is the model's. What the objectives differentiate when
  `optimizer.frozen` locks parameters for the whole run."""

  def __init__(self, model: Any, pattern: str):
    self.model, self.pattern = model, pattern

  def apply(self, variables: dict, *args, **kwargs) -> Any:
    variables = {**variables, "params": stop_gradient(variables["params"], self.pattern)}
    return self.model.apply(variables, *args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    return getattr(self.model, name)


def _tower_depths(params: Any) -> dict[str, int]:
  depths = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = path_name(path).split("/")
    tower = TOWERS.get(keys[0])
    if tower is None:
      continue
    if STACKED in keys:
      depths[tower] = max(depths.get(tower, 0), int(np.shape(leaf)[0]))
    for key in keys:
      if (m := UNROLLED.fullmatch(key)):
        depths[tower] = max(depths.get(tower, 0), int(m.group(1)) + 1)
  return depths


def layer_scales(params: Any, decay: float) -> Any:
  """Each parameter's learning-rate factor (layer-wise decay): a float32 scalar, or for a
  scanned stack's [L, ...] array a [L, 1, ...] column, layer i's factor on row i."""
  depths = _tower_depths(params)

  def scale(path: tuple, leaf: Any) -> jax.Array:
    keys = path_name(path).split("/")
    tower = TOWERS.get(keys[0])
    if tower is None or tower not in depths:
      return jnp.ones((), jnp.float32)
    depth = depths[tower]
    if STACKED in keys:
      exponents = depth - np.arange(np.shape(leaf)[0])
      return jnp.asarray(decay ** exponents, jnp.float32).reshape((-1,) + (1,) * (
          np.ndim(leaf) - 1))
    for key in keys:
      if (m := UNROLLED.fullmatch(key)):
        return jnp.asarray(decay ** (depth - int(m.group(1))), jnp.float32)
    if keys[0] == "token_embed" or any(k in EMBEDDING_NAMES for k in keys[1:2]):
      return jnp.asarray(decay ** (depth + 1), jnp.float32)
    return jnp.ones((), jnp.float32)

  return jax.tree_util.tree_map_with_path(scale, params)
