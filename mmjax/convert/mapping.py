"""Name-and-layout mappings between PyTorch state dicts and mmjax parameter trees, in both
directions from one table, so that import then export (and export then import) is exact.

A `Rule` ties torch entries to mmjax leaves with a pair of exact array functions (transposes,
splits, concatenations, reshapes: no arithmetic). mmjax paths name the unrolled layout
(`layers_<i>`); `to_params` stacks them when the config scans layers and `to_state_dict`
unstacks them (`layers.unstack_layer_params`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mmjax.models import layers

Array = np.ndarray
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
  """torch entries `keys` <-> mmjax leaves `paths`: `to_mmjax(*torch) -> tuple of leaves`,
  `to_torch(*leaves) -> tuple of torch arrays`, exact inverses of each other."""
  keys: tuple[str, ...]
  paths: tuple[Path, ...]
  to_mmjax: Callable[..., tuple[Array, ...]]
  to_torch: Callable[..., tuple[Array, ...]]


def _path(path: str) -> Path:
  return tuple(path.split("/"))


def copy(key: str, path: str, torch_shape: Sequence[int] | None = None,
         mmjax_shape: Sequence[int] | None = None) -> Rule:
  """The same values; optionally a reshape (e.g. a scalar stored as [1])."""
  fwd = (lambda a: (a,)) if mmjax_shape is None else (
      lambda a: (a.reshape(tuple(mmjax_shape)),))
  back = (lambda a: (a,)) if torch_shape is None else (
      lambda a: (a.reshape(tuple(torch_shape)),))
  return Rule((key,), (_path(path),), fwd, back)


def transpose(key: str, path: str, axes: Sequence[int] | None = None) -> Rule:
  """torch Linear weight [out, in] <-> kernel [in, out] (or any axes permutation)."""
  axes = tuple(axes) if axes is not None else None
  inverse = tuple(np.argsort(axes)) if axes is not None else None
  return Rule((key,), (_path(path),), lambda a: (np.transpose(a, axes),),
              lambda a: (np.transpose(a, inverse),))


def linear(prefix: str, path: str, bias: bool = True) -> list[Rule]:
  """torch nn.Linear `prefix` <-> layers.Dense `path` ({dense: {kernel, bias}})."""
  rules = [transpose(f"{prefix}.weight", f"{path}/dense/kernel")]
  if bias:
    rules.append(copy(f"{prefix}.bias", f"{path}/dense/bias"))
  return rules


def norm(prefix: str, path: str) -> list[Rule]:
  """torch nn.LayerNorm <-> layers.LayerNorm ({norm: {scale, bias}})."""
  return [copy(f"{prefix}.weight", f"{path}/norm/scale"),
          copy(f"{prefix}.bias", f"{path}/norm/bias")]


def packed_attention(prefix: str, path: str) -> list[Rule]:
  """torch nn.MultiheadAttention (in_proj packed [3D, D]) <-> layers.Attention."""
  names = [f"{path}/{n}/dense/kernel" for n in ("query", "key", "value")]
  biases = [f"{path}/{n}/dense/bias" for n in ("query", "key", "value")]
  return [
      Rule((f"{prefix}.in_proj_weight",), tuple(map(_path, names)),
           lambda w: tuple(x.T for x in np.split(w, 3)),
           lambda q, k, v: (np.concatenate([q.T, k.T, v.T]),)),
      Rule((f"{prefix}.in_proj_bias",), tuple(map(_path, biases)),
           lambda b: tuple(np.split(b, 3)), lambda q, k, v: (np.concatenate([q, k, v]),)),
      *linear(f"{prefix}.out_proj", f"{path}/out"),
  ]


def separate_attention(prefix: str, path: str) -> list[Rule]:
  """transformers' q_proj / k_proj / v_proj / out_proj <-> layers.Attention."""
  return [rule for torch_name, name in (("q_proj", "query"), ("k_proj", "key"),
                                        ("v_proj", "value"), ("out_proj", "out"))
          for rule in linear(f"{prefix}.{torch_name}", f"{path}/{name}")]


# --- applying a table -------------------------------------------------------------------------
def to_params(state_dict: Mapping[str, Array], rules: Sequence[Rule], scan: bool,
              source: str) -> dict[str, Any]:
  """A torch state dict (numpy arrays) -> an mmjax parameter tree (numpy).

  Raises ValueError naming `source` when an entry a rule needs is missing or entries are
  left over (another architecture: converting it would drop or invent weights silently)."""
  left = dict(state_dict)
  params: dict[str, Any] = {}
  missing = [k for rule in rules for k in rule.keys if k not in left]
  if missing:
    raise ValueError(f"{source} lacks {len(missing)} entries this architecture needs, e.g. "
                     f"{missing[:3]}: a checkpoint of another architecture? Pick the "
                     "matching --config")
  for rule in rules:
    leaves = rule.to_mmjax(*(left.pop(k) for k in rule.keys))
    for path, leaf in zip(rule.paths, leaves):
      node = params
      for name in path[:-1]:
        node = node.setdefault(name, {})
      node[path[-1]] = np.array(leaf, order="C")  # ascontiguousarray makes 0-d 1-d
  if left:
    raise ValueError(f"{source} has {len(left)} entries this architecture does not have, "
                     f"e.g. {sorted(left)[:3]}: a checkpoint of another architecture? Pick "
                     "the matching --config")
  return stack_layers(params) if scan else params


def to_state_dict(params: Any, rules: Sequence[Rule]) -> dict[str, Array]:
  """An mmjax parameter tree (scanned or not) -> the torch state dict (numpy arrays)."""
  flat = {tuple(k.key for k in path): np.asarray(leaf) for path, leaf in
          jax.tree_util.tree_leaves_with_path(layers.unstack_layer_params(_plain(params)))}
  out = {}
  for rule in rules:
    arrays = rule.to_torch(*(flat.pop(p) for p in rule.paths))
    out.update({k: np.array(a, order="C") for k, a in zip(rule.keys, arrays)})
  if flat:
    raise ValueError(f"mmjax parameters without a torch name: {sorted(flat)[:3]}")
  return out


def _plain(tree: Any) -> Any:
  """Nested dicts (flax FrozenDicts and Orbax restores alike)."""
  if isinstance(tree, Mapping):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def stack_layers(tree: Any) -> Any:
  """The unrolled layout {layers_0, ..., layers_<n-1>} -> the scanned one {layers: stacked}
  (the inverse of `layers.unstack_layer_params`)."""
  if not isinstance(tree, dict):
    return tree
  per_layer = sorted((int(k.removeprefix("layers_")), k) for k in tree
                     if k.startswith("layers_"))
  out = {k: stack_layers(v) for k, v in tree.items() if not k.startswith("layers_")}
  if per_layer:
    if [i for i, _ in per_layer] != list(range(len(per_layer))):
      raise ValueError(f"layer indices {[i for i, _ in per_layer]} are not 0..n-1")
    out["layers"] = jax.tree.map(lambda *xs: np.stack(xs),
                                 *(stack_layers(tree[k]) for _, k in per_layer))
  return out
