"""The benchmark scripts run (reduced sizes on this CPU) and end with one JSON line of
figures. They are not timed here: timings live in benchmarks/RESULTS.md."""
import json
import os
import subprocess
import sys

import pytest

from conftest import CACHE_DIR, REPO


def run_script(*args, timeout=600) -> dict:
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1",
         "JAX_COMPILATION_CACHE_DIR": CACHE_DIR}
  proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_gpu_benchmark_reduced_mode_runs_every_variant_on_cpu():
  """Every figure of the one-run GPU script, on CPU (a CPU has no known peak: the MFU
  denominator is given, as `--peak_tflops` does for unlisted accelerators)."""
  out = run_script("benchmarks/gpu.py", "--reduced", "--steps", "2", "--warmup", "1",
                   "--peak_tflops", "0.001")
  assert out["platform"] == "cpu" and out["peak_tflops"] == 0.001
  assert set(out["variants"]) == {"32_scan_noremat_b4", "48_scan_dots_b4_bf16"}
  for name, v in out["variants"].items():
    assert "error" not in v, (name, v)
    assert v["step_s"] > 0 and v["host_feed_step_s"] > 0 and v["compile_s"] > 0
    assert v["examples_per_s"] == pytest.approx(v["batch"] / v["step_s"], rel=1e-2)
    assert v["model_tflops_per_s"] == pytest.approx(
        v["batch"] * v["flops_per_example"] / v["step_s"] / 1e12, rel=1e-2)
    assert v["mfu"] == pytest.approx(v["model_tflops_per_s"] / 0.001, rel=1e-2)
  best = max(out["variants"], key=lambda k: out["variants"][k]["model_tflops_per_s"])
  assert out["best"]["variant"] == best


@pytest.mark.slow
def test_compile_time_benchmark_scanned_and_unrolled():
  out = run_script("benchmarks/compile_time.py", "--config", "configs/coca.py:tiny",
                   "--batch", "2")
  for variant in ("scanned", "unrolled"):
    assert out[f"{variant}_compile_s"] > 0 and out[f"{variant}_stablehlo_chars"] > 0
  assert out["unrolled_over_scanned_total"] == pytest.approx(
      out["unrolled_total_s"] / out["scanned_total_s"], abs=0.01)


@pytest.mark.slow
def test_webdataset_build_benchmark_reduced():
  out = run_script("benchmarks/build_webdataset.py", "--shards", "2", "--per_shard", "6",
                   "--side", "64", "--workers", "1,2", "--no_tfds_writer", "--repeats", "1")
  assert set(out["variants"]) == {"folder_csv", "beam_verify_w1", "beam_verify_w2",
                                  "beam_header_w1", "beam_header_w2"}
  assert out["identical_across_workers"] == {"beam_verify": True, "beam_header": True}
  for v in out["variants"].values():
    assert v["records"] == 12 and v["wall_s"] > 0 and v["cpu_s"] > 0
  assert "AMD" in out["cpu"] or "Intel" in out["cpu"] or out["cpu"]
