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
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmjax.errors import ConfigError

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
  """Mesh with Auto axes (Explicit axes break Flax's logical partitioning).

  `config.mesh.shape` is the global mesh. On a multislice TPU job (devices carry distinct
  `slice_index`) `config.mesh.dcn_shape` says how many slices each axis spans (default
  (-1, 1, 1): data parallelism over the data-centre network, everything else inside a
  slice), and the mesh is `create_hybrid_device_mesh`'s. A strict subset of this process's
  devices (tests, one-GPU benchmarks) is used in the given order; anything else, e.g. the
  abstract devices of an ahead-of-time target (mmjax.aot), gets the topology-aware order.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(config.mesh.shape, len(devices))
  dcn = resolve_dcn_shape(config.mesh.dcn_shape, shape,
                          len({getattr(d, "slice_index", 0) for d in devices}))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if math.prod(dcn) > 1:
    ici = tuple(s // d for s, d in zip(shape, dcn))
    return Mesh(mesh_utils.create_hybrid_device_mesh(ici, dcn, devices), MESH_AXES,
                axis_types=auto)
  local = jax.devices()
  if len(devices) < len(local) and set(devices) <= set(local):
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def resolve_dcn_shape(dcn_shape: Sequence[int], shape: Sequence[int],
                      num_slices: int) -> tuple[int, ...]:
  """`config.mesh.dcn_shape` for `num_slices` slices: one -1 takes the remaining slices;
  each entry must divide the global mesh.shape entry (the rest of the axis is in-slice).
  ConfigError (one line naming the key): the slices are known only with the devices, so
  this is checked when the mesh is made, not by `cli.validate`."""
  dcn = tuple(int(d) for d in dcn_shape)
  if len(dcn) != len(MESH_AXES) or dcn.count(-1) > 1 or any(d == 0 or d < -1 for d in dcn):
    raise ConfigError(f"config mesh.dcn_shape={dcn}: {len(MESH_AXES)} entries {MESH_AXES}, "
                      "positive sizes and at most one -1")
  known = math.prod(d for d in dcn if d != -1)
  if -1 in dcn:
    if num_slices % known:
      raise ConfigError(f"config mesh.dcn_shape={dcn}: {num_slices} slices are not divisible "
                        f"by {known}")
    dcn = tuple(num_slices // known if d == -1 else d for d in dcn)
  if math.prod(dcn) != num_slices:
    raise ConfigError(f"config mesh.dcn_shape={dcn} spans {math.prod(dcn)} slices but the "
                      f"devices form {num_slices}")
  for axis, s, d in zip(MESH_AXES, shape, dcn):
    if s % d:
      raise ConfigError(f"config mesh.dcn_shape={dcn}: the {axis} axis has {s} devices, not "
                        f"divisible over {d} slices (mesh.shape resolves to {tuple(shape)})")
  return dcn


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
