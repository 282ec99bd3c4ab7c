"""mmjax.topologies: accelerator-type names -> abstract devices, and their memory capacity.

TPU devices come from libtpu (the `test` extra); GPU ones need the CUDA plugin (`gpu-aot`
extra, 4.4 GB, not in CI) and skip without it.
"""
import importlib.util

import pytest

from configs import coca
from mmjax import topologies

needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec("jax_cuda12_plugin") is None,
    reason="needs the CUDA plugin: pip install -e '.[gpu-aot]'")


@pytest.mark.parametrize("name, devices, topology, kind", [
    ("v4-8", 4, "v4:2x2x1", "TPU v4"),  # TensorCores: 2 per chip, one device per chip
    ("v4-32", 16, "v4:2x2x4", "TPU v4"),
    ("v5p-128", 64, "v5p:4x4x4", "TPU v5"),
    ("v5e-16", 16, "v5e:4x4", "TPU v5 lite"),  # chips
    ("v5litepod-16", 16, "v5e:4x4", "TPU v5 lite"),
    ("v6e-8", 8, "v6e:2x4", "TPU v6 lite"),
])
def test_tpu_names(name, devices, topology, kind):
  target = topologies.parse(name)
  assert (target.platform, target.num_devices, target.topology) == ("tpu", devices, topology)
  abstract = target.devices()
  assert len(abstract) == devices and abstract[0].device_kind == kind


def test_largest_slices_parse():
  assert topologies.parse("v4-2048").num_devices == 1024
  assert topologies.parse("v5p-2048").num_devices == 1024
  assert topologies.parse("v6e-256").num_devices == 256


def test_multislice_devices_carry_their_slice():
  target = topologies.parse("v5p-8", num_slices=2)
  devices = target.devices()
  assert target.num_devices == len(devices) == 8
  assert sorted({d.slice_index for d in devices}) == [0, 1]


@pytest.mark.parametrize("name", ["v4-12", "v4-7", "v9-8", "v5e-3", "h100", "b200x8",
                                  "h100x16", "h100x0", "tpu"])
def test_unknown_names_list_the_known_ones(name):
  with pytest.raises(topologies.UnknownTopologyError) as e:
    topologies.parse(name)
  assert "\n" not in str(e.value)
  if "x" not in name or name.startswith("b200"):
    assert "v4-" in str(e.value) and "h100x8" in str(e.value)


def test_num_slices_is_for_tpus():
  with pytest.raises(topologies.UnknownTopologyError, match="h100x8x4"):
    topologies.parse("h100x8x2", num_slices=2)


@pytest.mark.parametrize("generation, name", [("v4", "v4-8"), ("v5e", "v5e-1"),
                                              ("v5p", "v5p-8"), ("v6e", "v6e-1")])
def test_tpu_capacity_is_the_compilers_figure_below_the_datasheet(generation, name):
  """The compiler's available HBM (measured with libtpu 0.0.42.1: v4 30.75, v5e 15.75, v5p
  95.74, v6e 31.25 GiB) is within 10% below the datasheet capacity (runtime reserve)."""
  available, source = topologies.parse(name).device_memory_bytes()
  datasheet = topologies.TPU_GENERATIONS[generation].datasheet_hbm_bytes
  assert 0.9 * datasheet < available <= datasheet
  assert "compiler" in source


@needs_cuda_plugin
@pytest.mark.parametrize("name, devices, kind", [
    ("h100x8", 8, "NVIDIA H100 80GB HBM3"), ("h200x8", 8, "NVIDIA H200 141GB HBM3e"),
    ("a100x8", 8, "NVIDIA A100-SXM4-80GB"), ("a100-40gbx8", 8, "NVIDIA A100-SXM4-40GB"),
    ("h100x8x4", 32, "NVIDIA H100 80GB HBM3")])
def test_gpu_nodes(name, devices, kind):
  target = topologies.parse(name)
  abstract = target.devices()
  assert len(abstract) == devices == target.num_devices
  assert abstract[0].device_kind == kind


def test_gpu_capacity_follows_the_allocator_fraction(monkeypatch):
  total = topologies.gpu_device_memory_size("h100")
  assert total == 84942979072  # XLA's h100_sxm spec
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  assert topologies.parse("h100x8").device_memory_bytes()[0] == int(0.9 * total)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
  assert topologies.parse("h100x8").device_memory_bytes()[0] == int(0.75 * total)


@pytest.mark.parametrize("kind, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5", 459),
    ("TPU v5p", 459), ("TPU v6 lite", 918), ("cpu", None)])
def test_peak_flops_by_device_kind(kind, tflops):
  peak = topologies.peak_flops_per_device(kind)
  assert (peak is None if tflops is None else peak == tflops * 1e12)
  assert topologies.peak_flops_per_device(kind, override_tflops=123.0) == 123e12


@pytest.mark.parametrize("preset", list(coca.MESH_PRESETS))
def test_every_mesh_preset_has_its_targets_device_count(preset):
  """configs/coca.py's mesh presets are written for one target each (v4_32 -> v4-32)."""
  _, devices = coca.MESH_PRESETS[preset]
  assert topologies.parse(topologies.preset_target(preset)).num_devices == devices


def test_the_tpu_name_pattern_is_the_generations_table():
  for name in [*topologies.TPU_GENERATIONS, *topologies.TPU_ALIASES]:
    count = 8 if name in ("v4", "v5p") else 4
    assert topologies.parse(f"{name}-{count}").platform == "tpu"
  with pytest.raises(topologies.UnknownTopologyError):
    topologies.parse("v7-8")


def test_a_kind_without_a_compiler_target_is_no_topology():
  with pytest.raises(topologies.UnknownTopologyError, match="unknown topology 'h100-pciex8'"):
    topologies.parse("h100-pciex8")
