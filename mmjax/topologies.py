"""Named compile targets: TPU slices and GPU nodes as users type them, as abstract devices.

Names (what `python -m mmjax.aot --topology NAME` accepts):
  TPU   accelerator types as `gcloud` and launch/tpu_vm.sh spell them:
        v4-N, v5p-N   N counts TensorCores, 2 per chip; one JAX device per chip (megacore),
                      so v4-32 is 16 devices. N in 8, 16, 32, ..., 4096 (v5p up to 12288).
        v5e-N (= v5litepod-N), v6e-N   N counts chips, one JAX device each; N in 1, 4, 8,
                      16, ..., 256.
        `num_slices` > 1: that many identical slices joined over the data-centre network
        (multislice); devices carry `slice_index`.
  GPU   KINDxG[xN]: N nodes (default 1) of G GPUs each, e.g. h100x8, h200x8, a100x8,
        a100-40gbx8, h100x8x4 (4 nodes of 8 H100s = 32 devices).

Per-device memory capacity
  TPU: the compiler's own figure, read from the RESOURCE_EXHAUSTED message of a probe
  program that needs more than any chip has (`tpu_available_hbm`): what it will actually
  allow a program. Measured with libtpu 0.0.42.1: v4 30.75 GiB, v5e 15.75 GiB, v5p
  95.74 GiB, v6e 31.25 GiB (datasheets: v4 32 GiB, v5e "16 GB", v5p 95 GiB user-allocatable
  of 96 GiB physical, v6e "32 GB"; cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}; the v5e/v6e
  "GB" are binary: the compiler allows more than 16e9 / 32e9 bytes).
  GPU: `device_memory_size` of the target config (mmjax/gpu_targets/*.txtpb, values from
  XLA's xla/backends/gpu/target_config/specs/) times the fraction JAX's allocator may use,
  XLA_PYTHON_CLIENT_MEM_FRACTION: launch/gpu.sh and launch/slurm.sbatch set 0.90 (JAX's own
  default is 0.75). The GPU compiler does not refuse an over-budget program.
"""
import dataclasses
import functools
import importlib.resources
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies as jax_topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmjax.errors import UsageError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  """One TPU generation: how its slices are named and laid out, and what a chip holds and
  computes. Peak FLOP/s: dense bfloat16 per JAX device (one chip), the MFU denominator
  (cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e})."""
  libtpu_name: str  # get_topology_desc's topology-name prefix
  chip_config: str  # "megacore": both TensorCores of a chip are one JAX device
  units_per_chip: int  # what the accelerator-type number counts: 2 = TensorCores, 1 = chips
  shapes: dict[int, str]  # chips -> physical topology (cloud.google.com tables)
  datasheet_hbm_bytes: int  # physical HBM per chip
  device_kinds: tuple[str, ...]  # substrings of the lower-cased jax device_kind
  peak_flops: float


_CUBE_SHAPES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
                256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}
_PLANE_SHAPES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
                 256: "16x16"}
TPU_GENERATIONS = {
    "v4": TpuGeneration("v4", "megacore", 2, _CUBE_SHAPES, 32 * GiB, ("tpu v4",), 275e12),
    "v5p": TpuGeneration("v5p", "megacore", 2,
                         {**_CUBE_SHAPES, 4096: "16x16x16", 6144: "16x16x24"}, 96 * GiB,
                         ("tpu v5",), 459e12),
    "v5e": TpuGeneration("v5e", "default", 1, _PLANE_SHAPES, 16 * GiB,
                         ("tpu v5 lite", "tpu v5e"), 197e12),
    "v6e": TpuGeneration("v6e", "default", 1, _PLANE_SHAPES, 32 * GiB,
                         ("tpu v6 lite", "tpu v6e"), 918e12),  # Trillium
}
TPU_ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class GpuKind:
  """One GPU: its compiler target and what it computes. Peak FLOP/s: dense bfloat16 (vendor
  spec sheets), the MFU denominator. A kind without a spec file is no compile target (its
  peak is for MFU on the real device only)."""
  spec_file: str  # package data in mmjax/gpu_targets/; "" = not a compile target
  device_kind: str  # what jax reports as device_kind on the real GPU
  device_kinds: tuple[str, ...]  # substrings of the lower-cased jax device_kind
  peak_flops: float


GPU_KINDS = {
    "h100": GpuKind("h100_sxm.txtpb", "NVIDIA H100 80GB HBM3", ("h100",), 989e12),  # SXM
    "h100-pcie": GpuKind("", "NVIDIA H100 PCIe", ("h100 pcie",), 756e12),
    "h200": GpuKind("h200.txtpb", "NVIDIA H200 141GB HBM3e", ("h200",), 989e12),
    "a100": GpuKind("a100_sxm_80.txtpb", "NVIDIA A100-SXM4-80GB", ("a100",), 312e12),
    "a100-40gb": GpuKind("a100_sxm_40.txtpb", "NVIDIA A100-SXM4-40GB", ("a100",), 312e12),
}
GPU_MEM_FRACTION_DEFAULT = 0.90  # what launch/gpu.sh and launch/slurm.sbatch set


class UnknownTopologyError(UsageError, ValueError):
  """A topology name or slice count mmjax does not know; the message lists the known ones."""


@dataclasses.dataclass(frozen=True)
class Target:
  """A compile target: `devices()` gives its abstract devices (no hardware needed)."""
  name: str  # as typed, plus "x{num_slices} slices" when > 1
  platform: str  # "tpu" | "gpu"
  num_devices: int  # JAX devices over all slices / nodes
  num_slices: int  # TPU slices joined over DCN; GPU: 1 (nodes are processes)
  topology: str  # libtpu topology ("v4:2x2x4") or the GPU "slices x hosts x devices"
  chip_config: str = ""  # TPU only
  host_bounds: tuple[int, int, int] = (1, 1, 1)  # TPU chips per host
  gpu_kind: str = ""  # GPU only

  def devices(self) -> list[Any]:
    """The target's abstract devices (compile-only: no array can live on them)."""
    if self.platform == "tpu":
      # libtpu looks for a local TPU when it loads and prints screens of warnings without
      # these; the compile-only topology below is explicit, so they change nothing else.
      os.environ.setdefault("TPU_ACCELERATOR_TYPE", self.name.split()[-1])
      os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
      # libtpu takes /tmp/libtpu_lockfile (one process per TPU host); compiling needs no
      # TPU, so several compiles (tests in parallel, a benchmark) may run at once.
      os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
      return list(jax_topologies.get_topology_desc(
          platform="tpu", topology_name=self.topology, chip_config_name=self.chip_config,
          chips_per_host_bounds=self.host_bounds, num_slices=self.num_slices).devices)
    return list(jax_topologies.get_topology_desc(
        self.gpu_kind, "cuda", target_config=gpu_target_config(self.gpu_kind),
        topology=self.topology).devices)

  def device_memory_bytes(self) -> tuple[int, str]:
    """(usable bytes per device, where the figure comes from)."""
    if self.platform == "tpu":
      return tpu_available_hbm(self), "TPU compiler's available HBM"
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                    GPU_MEM_FRACTION_DEFAULT))
    total = gpu_device_memory_size(self.gpu_kind)
    return int(total * fraction), (f"{total / GiB:.2f} GiB x XLA_PYTHON_CLIENT_MEM_FRACTION "
                                   f"{fraction:g}")


def peak_flops_per_device(device_kind: str, override_tflops: float = 0.0) -> float | None:
  """Dense bf16 peak FLOP/s of one device: `override_tflops` x 1e12 when > 0, else looked up
  by `device_kind` (e.g. "NVIDIA H100 80GB HBM3") in the tables above, the longest matching
  pattern first ("tpu v5 lite" before "tpu v5"); None when unknown (CPUs)."""
  if override_tflops > 0:
    return override_tflops * 1e12
  kind = device_kind.lower()
  patterns = sorted(((p, g.peak_flops) for g in [*TPU_GENERATIONS.values(), *GPU_KINDS.values()]
                     for p in g.device_kinds), key=lambda item: -len(item[0]))
  return next((peak for pattern, peak in patterns if pattern in kind), None)


def preset_target(mesh_preset: str) -> str:
  """The topology a config's mesh preset is written for: configs spell targets with "_"
  (`configs/coca.py:base,v4_32`, a config argument), topologies with "-" (v4-32)."""
  return mesh_preset.replace("_", "-")


def known_names() -> str:
  """One line listing the accepted names."""
  tpu = []
  for gen, g in TPU_GENERATIONS.items():
    counts = sorted(c * g.units_per_chip for c in g.shapes)
    tpu.append(f"{gen}-{{{','.join(map(str, counts))}}}")
  gpu = "|".join(k for k, g in GPU_KINDS.items() if g.spec_file)
  return (f"TPU {' '.join(tpu)} (v5litepod-N = v5e-N; --num_slices for multislice); "
          f"GPU {{{gpu}}}xG[xNODES], e.g. h100x8, h100x8x4")


def parse(name: str, num_slices: int = 1) -> Target:
  """`name` (e.g. "v4-32", "h100x8x2") -> Target; UnknownTopologyError with the known names."""
  name = name.strip().lower()
  if num_slices < 1:
    raise UnknownTopologyError(f"--num_slices={num_slices} must be >= 1")
  tpu = re.fullmatch(rf"({'|'.join([*TPU_GENERATIONS, *TPU_ALIASES])})-(\d+)", name)
  if tpu:
    return _tpu_target(name, TPU_ALIASES.get(tpu[1], tpu[1]), int(tpu[2]), num_slices)
  gpu = re.fullmatch(r"([a-z0-9-]+?)x(\d+)(?:x(\d+))?", name)
  if gpu and gpu[1] in GPU_KINDS and GPU_KINDS[gpu[1]].spec_file:
    per_node, nodes = int(gpu[2]), int(gpu[3] or 1)
    if num_slices != 1:
      raise UnknownTopologyError(f"--num_slices is for TPU slices; for {nodes * num_slices} "
                                 f"GPU nodes name them: {gpu[1]}x{per_node}x{nodes * num_slices}")
    if not 1 <= per_node <= 8 or nodes < 1:
      raise UnknownTopologyError(f"topology {name!r}: 1 to 8 GPUs per node, >= 1 node")
    return Target(name=name, platform="gpu", num_devices=per_node * nodes, num_slices=1,
                  topology=f"1x{nodes}x{per_node}", gpu_kind=gpu[1])
  raise UnknownTopologyError(f"unknown topology {name!r}; known: {known_names()}")


def _tpu_target(name: str, gen_name: str, count: int, num_slices: int) -> Target:
  gen = TPU_GENERATIONS[gen_name]
  chips = count // gen.units_per_chip
  if count % gen.units_per_chip or chips not in gen.shapes:
    raise UnknownTopologyError(f"unknown topology {name!r}; known: {known_names()}")
  shape = gen.shapes[chips]
  dims = [int(d) for d in shape.split("x")] + [1]
  # Hosts: 4 chips (2x2x1) on v4/v5p; v5e/v6e hosts hold 8 (2x4), or the whole small slice.
  if gen.units_per_chip == 2:
    bounds = (2, 2, 1) if chips >= 4 else (dims[0], dims[1], 1)
  else:
    bounds = (2, 4, 1) if chips >= 8 else (dims[0], dims[1], 1)
  label = name if num_slices == 1 else f"{num_slices}x {name}"
  return Target(name=label, platform="tpu", num_devices=chips * num_slices,
                num_slices=num_slices, topology=f"{gen.libtpu_name}:{shape}",
                chip_config=gen.chip_config, host_bounds=bounds)


def gpu_target_config(kind: str) -> str:
  """The GPU target-config text proto (stream_executor.GpuTargetConfigProto) of `kind`."""
  return importlib.resources.files("mmjax").joinpath(
      "gpu_targets", GPU_KINDS[kind].spec_file).read_text()


def gpu_device_memory_size(kind: str) -> int:
  return int(re.search(r"device_memory_size:\s*(\d+)", gpu_target_config(kind))[1])


_HBM_MESSAGE = re.compile(r"exceeds available HBM \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_gib_figure(value: str, unit: str) -> int:
  """libtpu prints binary units with a single letter ("30.75G" = 30.75 GiB)."""
  return int(float(value) * _UNITS[unit])


@functools.lru_cache(maxsize=None)
def tpu_available_hbm(target: Target) -> int:
  """Bytes of HBM per device the TPU compiler lets a program use, from the RESOURCE_EXHAUSTED
  message of a one-device probe program needing ~1 TiB (compiles in about a second)."""
  device = target.devices()[0]
  sharding = NamedSharding(Mesh(np.array([device]), ("d",)), PartitionSpec())
  n = 2**38  # float32 elements: 1 TiB
  probe = jax.jit(lambda x: jnp.cumsum(jnp.sin(jnp.arange(n, dtype=jnp.float32) + x))[::n // 8])
  try:
    probe.lower(jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding)).compile()
  except Exception as e:  # JaxRuntimeError; the message is what we want
    match = _HBM_MESSAGE.search(str(e))
    if match:
      return parse_gib_figure(*match.groups())
    raise RuntimeError(f"unexpected TPU compiler message for the HBM probe: {e}") from e
  raise RuntimeError("the TPU compiler accepted a 1 TiB program: cannot read its HBM size")
