"""mmjax.aot: the real train step compiled for a TPU slice without the hardware.

CI compiles configs/coca.py:tiny for a v4-8 (libtpu, the `test` extra: ~35 s to install in
a fresh venv, ~1 min to compile here) and an over-budget variant for one v5e chip; every
preset on its target is `-m slow` (minutes to tens of minutes each).
"""
import importlib.util
import json
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from conftest import REPO
from mmjax import aot, cli, summary, topologies

TINY = os.path.join(REPO, "configs/coca.py") + ":tiny"
REQUIRED = ("fits", "memory_per_device_bytes", "device_memory_bytes", "topology", "num_devices",
            "compile_s", "compiled_flops_per_device", "model_flops_per_device")


def _run(config, topology, capsys, num_slices=1):
  status = aot.run(config, "tiny", topology, num_slices, ("train",), 0, False)
  out = capsys.readouterr().out
  return status, out, json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def tiny_report(capsys):
  return _run(cli.load_config(TINY), "v4-8", capsys)


def test_tiny_on_v4_report_is_consistent(tiny_report):
  status, out, report = tiny_report
  assert status == 0 and report["fits"]
  for key in REQUIRED:
    assert report[key] is not None, key
  assert (report["topology"], report["num_devices"], report["device_kind"]) == (
      "v4-8", 4, "TPU v4")
  train = report["programs"]["train"]
  memory = train["memory"]
  # Total = parts; the parts' compiler categories = the compiler's own accounting.
  assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
  assert memory["total"] == report["memory_per_device_bytes"]
  # The compiler's accounting: its dumped buffer assignment, whose sum is the total of its
  # memory-usage report; memory_analysis() agrees on the arguments.
  dumped = train["buffer_assignment"]
  assert memory["total"] == dumped["total"] == dumped["usage_report_total"]
  assert memory["temporaries"] == dumped["temp"]
  arguments = sum(memory[k] for k in ("params", "optimizer_state", "other_state", "batch",
                                      "argument_adjustment"))
  assert arguments == dumped["argument"] == train["memory_analysis"]["argument"]
  # Capacity: the TPU compiler's figure; fits and headroom follow from it.
  capacity = topologies.tpu_available_hbm(topologies.parse("v4-8"))
  assert report["device_memory_bytes"] == capacity
  assert report["fits"] == (report["memory_per_device_bytes"] <= capacity)
  assert report["headroom_fraction"] == pytest.approx(
      (capacity - report["memory_per_device_bytes"]) / capacity)
  # The shard sizes: 16 examples over 4 devices, parameters replicated (mesh 4x1x1); a row
  # is a uint8 image, int32 tokens and 7 int32 flags (label ... paired).
  config = cli.load_config(TINY)
  size = config.data.image_size
  per_device = 4 * (size * size * 3 + config.data.max_text_len * 4 + 7 * 4)
  assert memory["batch"] == per_device
  # remat none, one micro-batch: the compiled matmuls are the model's FLOPs (the formula's
  # contrastive-loss term aside, < 0.1%) plus the fused caption head's padding: its
  # max_text_len - 1 = 15 positions in chunks of loss.caption_chunk_size = 8 compute 16,
  # the extra one forward and backward (3 matmuls of 2 x rows x text width x vocab).
  model = summary.model_flops_per_example(config) * config.batch_size / 4
  assert report["model_flops_per_device"] == model
  positions, chunk = config.data.max_text_len - 1, config.loss.caption_chunk_size
  padding = -(-positions // chunk) * chunk - positions
  head = (3 * 2 * (config.batch_size // 4) * padding * config.model.text.width
          * config.model.text.vocab_size)
  assert (padding, head) == (1, 3 * 2**20)
  assert report["compiled_flops_per_device"] == pytest.approx(model + head, rel=1e-3)
  # The cost model's estimate, when kept, is no faster than the FLOPs at the chip's peak.
  if report["estimated_step_s"] is not None:
    assert report["estimated_step_s"] >= report["compiled_flops_per_device"] / 275e12
  assert "fits: yes" in out and "memory per device" in out


def test_over_budget_is_reported_not_fitting(capsys):
  """One v5e chip (15.75 GiB) and a batch of 32768 tiny examples: the compiler refuses the
  program; the report says by how much, which buffers and which keys to turn."""
  config = aot.with_overrides(cli.load_config(TINY), {"batch_size": 32768})
  status, out, report = _run(config, "v5e-1", capsys)
  assert status == 1 and not report["fits"]
  train = report["programs"]["train"]
  assert "RESOURCE_EXHAUSTED" in train["compiler_error"]
  need, have = report["memory_per_device_bytes"], report["device_memory_bytes"]
  assert need > have == topologies.tpu_available_hbm(topologies.parse("v5e-1"))
  # The report's total is the compiler's exact accounting; its message rounds to 0.01 GiB.
  figure = re.search(r"HLO temporaries \(([\d.]+)G\)", train["compiler_error"])
  assert need == train["memory"]["total"] == pytest.approx(float(figure[1]) * 2**30,
                                                           abs=0.006 * 2**30)
  assert train["peak_buffers"] and train["peak_buffers"][0]["bytes"] > 2**30
  assert any("grad_accum_steps" in a for a in report["advice"])
  assert "fits: NO, short by" in out


def test_unknown_topology_is_one_line_and_exit_2():
  proc = subprocess.run([sys.executable, "-m", "mmjax.aot", f"--config={TINY}",
                         "--topology=v9-8"], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("mmjax.aot: error: unknown topology 'v9-8'")
  assert "v5p-" in lines[0] and "Traceback" not in proc.stderr


def test_config_that_cannot_run_on_the_target_is_one_line_and_exit_2():
  """The v4_32 preset's mesh needs 16 devices; a v4-8 has 4."""
  proc = subprocess.run([sys.executable, "-m", "mmjax.aot",
                         f"--config={os.path.join(REPO, 'configs/coca.py')}:tiny,v4_32",
                         "--topology=v4-8"], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "mesh.shape" in lines[0], proc.stderr


def _fake_report(**kw):
  report = dict(micro_batch_per_device=256.0, grad_accum_steps=16, remat_policy="dots",
                mesh=dict(data=4, fsdp=16, tensor=1), memory_per_device_bytes=40 * 2**30,
                device_memory_bytes=32 * 2**30, memory=dict(temporaries=36 * 2**30))
  report.update(kw)
  return report


def test_suggestion_candidates_follow_the_memory_split():
  """Fixed 4 GiB + 36 GiB temporaries on 32 GiB: temporaries must fall to 24.8 GiB (10%
  headroom), a factor 1.45 -> 2x the micro-batch steps first, then 4x, remat, mesh."""
  config = ml_collections.ConfigDict(dict(batch_size=65536, grad_accum_steps=16,
                                          model=dict(remat_policy="dots")))
  candidates = aot.suggestion_candidates(config, _fake_report(), 64)
  assert candidates == [{"grad_accum_steps": 32}, {"grad_accum_steps": 64},
                        {"model.remat_policy": "full"}, {"mesh.shape": (1, -1, 1)}]


def test_knob_advice_names_config_keys():
  advice = aot.knob_advice(_fake_report())
  assert advice[0].startswith("--config.grad_accum_steps=32")
  assert advice[1].startswith("--config.model.remat_policy=full")
  assert advice[2].startswith("--config.mesh.shape='(1,64,1)'")


def _presets() -> list[tuple[str, str]]:
  """benchmarks/aot_presets.py's list: every mesh preset and its target."""
  spec = importlib.util.spec_from_file_location(
      "aot_presets", os.path.join(REPO, "benchmarks", "aot_presets.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.PRESETS, module


@pytest.mark.slow
@pytest.mark.parametrize("spec, target", _presets()[0])
def test_every_preset_fits_its_target_with_10_percent_headroom(spec, target):
  """Minutes to tens of minutes each on 2 cores; GPU targets need the `gpu-aot` extra."""
  if target.startswith(("h100", "h200", "a100")) and not any(
      importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
    pytest.skip(f"{target} needs the CUDA compiler plugin: pip install -e '.[gpu-aot]'")
  report = _presets()[1].run_one(spec, target, timeout_s=7200)
  assert "error" not in report, report
  assert report["fits"] and report["headroom_fraction"] >= aot.HEADROOM_TARGET, (
      report["memory_per_device_bytes"], report["device_memory_bytes"])
