"""Device mesh and logical-to-mesh sharding.

Model code names logical axes; `config.mesh.rules` maps them onto the mesh axes
(`data`, `fsdp`, `tensor`), so one model runs on 1 CPU, 1 GPU or a pod slice unchanged.
"""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXIS = "batch"  # the logical axis of every batch dimension


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills one -1 entry of `config.mesh.shape` with the remaining devices; validates."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"config mesh.shape={shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"config mesh.shape={shape}: positive sizes and at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"config mesh.shape={shape}: {num_devices} devices are not divisible "
                       f"by {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"config mesh.shape={shape} has {math.prod(shape)} devices but "
                     f"{num_devices} are available")
  return shape


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """Mesh with Auto axes (Explicit axes break Flax's logical partitioning)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(config.mesh.shape, len(devices))
  if len(devices) == jax.device_count():
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_axes(rules: Sequence) -> tuple[str, ...]:
  """The mesh axes the logical `batch` axis maps to in `config.mesh.rules` (inputs, the
  contrastive ring and every batch-sharded activation use the same ones)."""
  for logical, mesh_axes in rules:
    if logical == BATCH_AXIS:
      if mesh_axes is None:
        return ()
      return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
  raise ValueError(f"config mesh.rules has no {BATCH_AXIS!r} rule")


def batch_parallel_size(mesh: Mesh, rules: Sequence) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(rules))


def batch_sharding(mesh: Mesh, rules: Sequence) -> NamedSharding:
  """Leading (batch) dimension split over the batch axes; other dimensions replicated."""
  return NamedSharding(mesh, P(batch_axes(rules)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence) -> Any:
  """NamedShardings for a tree whose leaves may be boxed with logical axis names."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, tuple(tuple(r) for r in rules))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh,
                 rules: Sequence) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global arrays sharded over the batch."""
  sharding = batch_sharding(mesh, rules)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}
