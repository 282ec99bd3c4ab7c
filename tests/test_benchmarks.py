"""The benchmark scripts run (reduced sizes on this CPU) and end with one JSON line of
figures. They are not timed here: timings live in benchmarks/RESULTS.md."""
import json
import os
import sys

import numpy as np
import pytest

import helpers
from conftest import CACHE_DIR, REPO


def run_script(*args, timeout=600) -> dict:
  proc = helpers.call([sys.executable, *args], env={"JAX_COMPILATION_CACHE_DIR": CACHE_DIR},
                      timeout=timeout)
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


def test_ablation_summary_means_spreads_and_paired_differences():
  """benchmarks/ablation_shapes.py's table from given per-run results (no training): mean
  and sample std over seeds per arm, differences paired by seed."""
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import ablation_shapes as ab
  unseen, probe = "zeroshot/shapes_labels_unseen/top1", "linear_probe/shapes_labels/top1"
  runs = [{"preset": "clip", "seed": s, "caption": {unseen: u, probe: 0.5}}
          for s, u in ((0, 0.2), (1, 0.4), (2, 0.3))]
  runs += [{"preset": "unicl_prefix", "seed": s, "caption": {unseen: u},
            "label": {unseen: u - 0.1}} for s, u in ((0, 0.5), (1, 0.4))]  # seed 2 failed
  summary = ab.summarize(runs, ["clip", "unicl_prefix"])
  clip = summary["arms"]["clip/caption"][unseen]
  assert clip["n"] == 3 and clip["mean"] == pytest.approx(0.3)
  assert clip["std"] == pytest.approx(0.1)  # ddof=1
  assert set(summary["arms"]) == {"clip/caption", "unicl_prefix/caption", "unicl_prefix/label"}
  diff = summary["paired_differences"]["unicl_prefix/caption - clip/caption"][unseen]
  assert diff["seeds"] == [0, 1] and diff["mean"] == pytest.approx(0.15)  # (0.3 + 0.0) / 2
  assert diff["std"] == pytest.approx(np.std([0.3, 0.0], ddof=1))
  prefix = summary["paired_differences"]["unicl_prefix/caption - unicl_prefix/label"][unseen]
  assert prefix["mean"] == pytest.approx(0.1) and prefix["std"] == pytest.approx(0.0, abs=1e-12)
  table = ab.format_tables(summary)
  assert "| clip/caption | 3 | 0.300 ± 0.100 |" in table
  assert "| unicl_prefix/caption - clip/caption | 2 | +0.150 ± 0.212 |" in table


@pytest.mark.slow
def test_patch_dropout_step_time_runs_both_variants_interleaved():
  """benchmarks/patch_dropout.py time on the tiny shapes model: every round times both
  variants; the ratios are those of the recorded steps."""
  out = run_script("benchmarks/patch_dropout.py", "time", "--config",
                   "configs/shapes.py:coca_unicl_prefix,tiny", "--rounds", "3")
  steps = out["step_seconds"]
  assert set(steps) == {"0.0", "0.5"} and all(len(v) == 3 and min(v) > 0 for v in steps.values())
  assert out["step_time_ratio"] == pytest.approx(
      np.median(steps["0.5"]) / np.median(steps["0.0"]))
  assert out["step_time_ratio_paired_median"] == pytest.approx(
      np.median(np.asarray(steps["0.5"]) / np.asarray(steps["0.0"])))
  assert out["cpu"] and len(out["load_average_start"]) == 3


def test_patch_dropout_shapes_summary_pairs_seeds():
  """benchmarks/patch_dropout_shapes.py's summary from given runs (no training): mean and
  sample std per arm, dropout minus none paired by seed over the seeds both arms have."""
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import patch_dropout_shapes as pds
  unseen = pds.HELD_OUT
  runs = [{"fraction": 0.0, "seed": s, "metrics": {unseen: u}}
          for s, u in ((0, 0.6), (1, 0.7), (2, 0.8))]
  runs += [{"fraction": 0.5, "seed": s, "metrics": {unseen: u}} for s, u in ((0, 0.5), (1, 0.8))]
  summary = pds.summarize(runs, (0.0, 0.5))
  none, dropped = summary["arms"]["0.0"][unseen], summary["arms"]["0.5"][unseen]
  assert (none["n"], none["mean"], none["std"]) == (3, pytest.approx(0.7), pytest.approx(0.1))
  assert (dropped["n"], dropped["mean"]) == (2, pytest.approx(0.65))
  diff = summary["paired_difference"][unseen]
  assert diff["seeds"] == [0, 1] and diff["mean"] == pytest.approx(0.0)  # (-0.1 + 0.1) / 2
  assert diff["std"] == pytest.approx(np.std([-0.1, 0.1], ddof=1))


@pytest.mark.slow
def test_ablation_script_trains_every_arm_and_seed(tmp_path, data_dir):
  """Two seeds of a prefix arm, tiny, 2 steps: trained, evaluated with both test prefixes on
  the same checkpoint, a finished run not repeated on a rerun."""
  args = ("benchmarks/ablation_shapes.py", "--presets", "unicl_prefix", "--seeds", "0,1",
          "--steps", "2", "--tiny", "--workdir", str(tmp_path), "--nice", "0",
          f"--config.data_dir={data_dir}", f"--config.compilation_cache_dir={CACHE_DIR}")
  out = run_script(*args, timeout=1200)
  assert [(r["preset"], r["seed"]) for r in out["runs"]] == [("unicl_prefix", 0),
                                                              ("unicl_prefix", 1)]
  for run in out["runs"]:
    assert "error" not in run, run
    for prefix in ("caption", "label"):
      assert 0 <= run[prefix]["zeroshot/shapes_labels_unseen/top1"] <= 1
      assert "seen_classes/shapes_labels_seen/top1" in run[prefix]
    assert "retrieval/shapes_captions/i2t_r1" not in run["label"]  # zero-shot only
  assert out["arms"]["unicl_prefix/label"]["zeroshot/shapes_labels_unseen/top1"]["n"] == 2
  assert out["cpu"] and out["steps"] == 2
  again = run_script(*args, timeout=600)  # finished runs are read back, not retrained
  assert again["runs"] == out["runs"]


def test_remat_policies_table_rows_and_section_replacement(tmp_path, monkeypatch):
  """benchmarks/remat_policies.py's rows from given mmjax.aot reports (no compile): host
  memory of an offload policy, collective bytes summed over kinds, a failed compile's error;
  --write replaces only its target's section of RESULTS.md."""
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import aot_presets
  import remat_policies as rp
  gib = 2**30
  train = {"memory_analysis": {"host_temp": 3 * gib},
           "collectives": {"all-gather": {"count": 4, "bytes": gib},
                           "all-reduce": {"count": 2, "bytes": gib // 2}}}
  report = dict(variant="base", policy="offload_qkv_proj", micro_batch_per_device=512.0,
                memory_per_device_bytes=10 * gib, device_memory_bytes=80 * gib, fits=True,
                headroom_fraction=0.875, flops_ratio=1.1234, lower_s=1.0, compile_s=9.0,
                programs={"train": train})
  assert rp.row(report) == ("| base | offload_qkv_proj | 512 | 10.00 / 80.00 | 87.5% | 3.00 | "
                            "1.12 | 1.50 | 10 s |")
  failed = rp.row(dict(variant="giant", policy="none", error="RESOURCE_EXHAUSTED"))
  assert failed.startswith("| giant | none | error: RESOURCE_EXHAUSTED")
  assert failed.count("|") == rp.row(report).count("|")
  results = tmp_path / "RESULTS.md"
  begin, end = rp.markers("h100x8")
  results.write_text(f"intro\n\n{begin}\nold\n{end}\n\nkept\n")
  monkeypatch.setattr(aot_presets, "RESULTS", str(results))
  rp.write("h100x8", rp.section("h100x8", [rp.row(report)], {"jax": "0"}))
  text = results.read_text()
  assert "old" not in text and text.startswith("intro\n\n") and text.endswith("\n\nkept\n")
  assert text.count(begin) == 1 and "| base | offload_qkv_proj |" in text
  rp.write("v5p-128", rp.section("v5p-128", [failed], {}))  # no section yet: appended
  assert results.read_text().rstrip().endswith(rp.markers("v5p-128")[1])
  flags = rp.command_flags("v5p-128", "giant", "full,none", 256)
  assert flags == "--target v5p-128 --variants giant --policies full,none --per_device_batch 256"
  rp.write("v5p-128", rp.section("v5p-128", [rp.row(report)], {}, 256, flags), 256)
  text = results.read_text()  # a --per_device_batch table is a section of its own
  assert text.count("<!-- remat_policies v5p-128") == 4 and "| giant | none | error" in text
  assert "v5p-128, 256 examples per device (`benchmarks/remat_policies.py --target v5p-128 " \
         "--per_device_batch 256`)" in text
  assert f"`PYTHONPATH=. python benchmarks/remat_policies.py {flags} --write`" in text


def test_aot_presets_row_reports_summed_collective_bytes():
  """benchmarks/aot_presets.py's row from a given mmjax.aot report (no compile)."""
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import aot_presets
  gib = 2**30
  report = dict(memory_per_device_bytes=24 * gib, device_memory_bytes=32 * gib, fits=True,
                headroom_fraction=0.25, flops_ratio=1.2449, platform="tpu", num_devices=16,
                device_kind="TPU v4", micro_batch_per_device=256.0, grad_accum_steps=16,
                remat_policy="dots_with_no_batch_dims", lower_s=100.0, compile_s=358.0,
                programs={"train": {"collectives": {"all-gather": {"count": 9, "bytes": gib},
                                                    "reduce-scatter": {"count": 3,
                                                                       "bytes": 3 * gib}}}})
  line = aot_presets.row("configs/coca.py:base,v4_32", "v4-32", report)
  assert line.startswith("| `coca.py:base,v4_32` | v4-32 (16 x TPU v4) | 256 x 16 | "
                         "dots_with_no_batch_dims | 24.00 / 32.00 | 25.0% | yes | 1.24 | 4.00 "
                         "| dropped | 458 s | ")
  header = aot_presets.section({}, {}).splitlines()
  columns = next(l for l in header if l.startswith("| preset")).count("|")
  assert line.count("|") == columns
  failed = aot_presets.row("configs/flava.py:full", "h100x8", {"error": "RESOURCE_EXHAUSTED"})
  assert failed.count("|") == columns


def test_readme_figures_splits_the_first_runs_wall_time(tmp_path, monkeypatch):
  """benchmarks/readme_figures.py's split from a run's timestamped output and metrics.jsonl:
  the "Built" lines, each logged interval's examples/s, and the output after a step line
  before the next one (its evaluation); the rest is start-up and compile."""
  monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
  import readme_figures as rf
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for step, rate in ((10, 64.0), (20, 32.0)):
      f.write(json.dumps({"step": step, "loss": 1.0, "examples_per_sec": rate}) + "\n")
    f.write(json.dumps({"step": 20, "zeroshot/x/top1": 0.5}) + "\n")
  built = "Built shapes/{} (4500 generated images, nothing downloaded) into D in {} s"
  lines = [(5.0, built.format("captions", 7)), (6.0, built.format("labels_seen", 3)),
           (40.0, "step 10/20  loss 1.0  ex/s 64.0  ETA 0m10s"),
           (70.0, "step 20/20  loss 1.0  ex/s 32.0  ETA 0m00s"),
           (80.0, "zeroshot/x/top1  0.5000"), (95.0, "caption/x/cider  0.1000")]
  split = rf.split_wall_time(100.0, lines, str(tmp_path), batch_size=16)
  # training: 10 steps x 16 / 64 + 10 x 16 / 32 = 2.5 + 5 s; evaluation: 95 - 70 s
  assert split == {"wall_s": 100.0, "data_build_s": 10.0, "train_steps_s": 7.5,
                   "eval_s": 25.0, "rest_s": 57.5}


def test_checkpoint_tiers_benchmark_times_both_tiers(tmp_path):
  out = run_script("benchmarks/checkpoint_tiers.py", "--config",
                   "configs/shapes.py:coca_unicl_prefix,tiny", "--saves", "1",
                   "--workdir", str(tmp_path / "work"), "--local_dir", str(tmp_path / "local"))
  assert out["processes"] == 1 and out["global_state_mib"] > 0
  for tier in ("persistent", "local", "local_write_only"):
    assert 0 < out[f"{tier}_blocking_s"] <= out[f"{tier}_committed_s"], tier
  assert sorted(os.listdir(tmp_path / "local" / "process_0" / "own")) == ["2"]


@pytest.mark.slow  # two TPU compiles: a minute on 2 cores
def test_locked_towers_compiles_both_variants_and_the_lock_saves():
  """The tiny CoCa compiled for v4-8 by the TPU compiler, trained and with its ViT locked."""
  out = run_script("benchmarks/locked_towers.py", "--batch", "8",
                   "--case", "configs/coca.py:tiny=vision/.*", timeout=900)
  row = out["configs"]["configs/coca.py:tiny"]
  assert row["flops_ratio"] < 0.9 and row["memory_ratio"] < 1
  trained, locked = row["trained"]["memory_parts_bytes"], row["locked"]["memory_parts_bytes"]
  assert locked["params"] == trained["params"]
  assert locked["optimizer_state"] < trained["optimizer_state"]
