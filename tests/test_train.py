"""End-to-end runs of the CLIs on the tiny shapes and FLAVA configs (real data, Grain, Orbax,
jit)."""
import json
import os
import shutil

import numpy as np
import pytest

import helpers
from helpers import FLAVA_TINY, metrics, run
from mmjax import checkpoint, summary, train
from mmjax.data import tokenizer as tokenizer_lib


def test_train_logs_checkpoints_evaluates_and_resumes(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  out = run("mmjax.train", workdir, data_dir).stdout
  assert "step 10/10" in out and "ETA" in out
  assert "Train step memory per device:" in out and "capacity unknown on cpu" in out
  logged = metrics(workdir)
  train = [m for m in logged if "loss" in m]
  assert [m["step"] for m in train] == [5, 10]
  for key in ("loss", "contrastive_loss", "caption_loss", "learning_rate", "logit_scale",
              "examples_per_sec", "data/skipped", "nonfinite_steps",
              "tflops_per_sec_per_device"):
    assert key in train[-1], key
  assert "mfu" not in train[-1]  # a CPU has no known peak
  evals = [m for m in logged if "retrieval/shapes_captions/i2t_r1" in m]
  assert [m["step"] for m in evals] == [10]
  # Zero-shot on the held-out classes, closed-set on the seen ones: named apart.
  assert "zeroshot/shapes_labels_unseen/top1" in evals[0]
  assert "seen_classes/shapes_labels_seen/top1" in evals[0]
  assert 0 <= evals[0]["linear_probe/shapes_labels/top1"] <= 1  # the probe runs on CoCa too
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "5"]
  assert os.listdir(os.path.join(workdir, "eval")) == ["samples_10.png"]  # as mmjax.evaluate
  assert os.listdir(os.path.join(workdir, "tensorboard"))

  out = run("mmjax.train", workdir, data_dir, "--config.total_steps=15",
            "--config.peak_tflops_per_device=0.5").stdout
  assert "Resumed" in out and "at step 10" in out
  train = [m for m in metrics(workdir) if "loss" in m]
  assert [m["step"] for m in train] == [5, 10, 15]
  # MFU = model FLOP/s per device / peak, from the summary's FLOPs formula.
  flops = summary.model_flops_per_example(helpers.tiny_config())
  assert train[-1]["tflops_per_sec_per_device"] == pytest.approx(
      train[-1]["examples_per_sec"] * flops / 1e12)
  assert train[-1]["mfu"] == pytest.approx(train[-1]["tflops_per_sec_per_device"] / 0.5)


def test_checkpoint_from_8_devices_evaluates_on_1_with_the_same_numbers(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  run("mmjax.train", workdir, data_dir, "--config.mesh.shape=(2,4,1)", devices=8)
  trained = [m for m in metrics(workdir) if "retrieval/shapes_captions/i2t_r1" in m][-1]
  out = run("mmjax.evaluate", workdir, data_dir, devices=1).stdout
  assert "zeroshot/shapes_labels_unseen/top1" in out
  with open(os.path.join(workdir, "eval", "step_10.json")) as f:
    evaluated = json.load(f)
  for key, value in evaluated.items():
    if key != "step":
      assert value == pytest.approx(trained[key], abs=1e-6), key


def test_a_copied_workdir_evaluates_with_its_own_tokenizer(tmp_path, data_dir, tiny_workdir):
  """Self-contained checkpoints: the workdir copied elsewhere, evaluated against a data_dir
  without the trained tokenizer cache, reads the tokenizer stored with the checkpoint."""
  checkpointer = checkpoint.Checkpointer(tiny_workdir, helpers.tiny_config())
  stored = checkpointer.restore_assets(10)
  checkpointer.close()
  trained = tokenizer_lib.get_tokenizer(helpers.tiny_config(data_dir=data_dir))
  assert stored == {"tokenizer.model": trained.model_proto}
  moved, bare = tmp_path / "elsewhere", tmp_path / "data"
  shutil.copytree(tiny_workdir, moved)
  shutil.copytree(data_dir, bare, ignore=shutil.ignore_patterns("tokenizers"))
  out = run("mmjax.evaluate", str(moved), str(bare), "--config.evals.linear_probe.num_examples=0",
            "--config.evals.captioning.num_examples=0").stdout
  assert "zeroshot/shapes_labels_unseen/top1" in out
  assert not (bare / "tokenizers").exists()  # nothing was retrained from the data


def test_skipped_records_are_counted_exactly_across_resumes(tmp_path, data_dir):
  """A label source of 12 records of which 2 are undecodable; 8 label examples per step
  (50/50 mix, batch 16) for 12 steps = 8 epochs = 16 bad draws, 16 records skipped. A run
  preempted at step 4 and at step 8 and resumed twice reports exactly the uninterrupted
  run's cumulative counts at every step."""
  folder_dir = str(tmp_path / "datasets")
  helpers.write_bad_folder("pets", folder_dir)
  flags = ("--config.total_steps=12", "--config.log_every_steps=1",
           "--config.checkpoint_every_steps=0", "--config.eval_every_steps=0",
           "--config.data.sources.labels.name=pets",
           f"--config.data.sources.labels.data_dir={folder_dir}")
  reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")
  run("mmjax.train", reference, data_dir, *flags)
  for stop in (4, 8):
    out = run("mmjax.train", resumed, data_dir, *flags, expect=42,
              env={"MMJAX_DEBUG_SIGTERM_AT_STEP": str(stop)}).stdout
    assert f"saved step {stop}" in out
  assert "at step 8" in run("mmjax.train", resumed, data_dir, *flags).stdout
  data = lambda workdir: [{k: v for k, v in m.items() if k.startswith("data/") or k == "step"}
                          for m in metrics(workdir)]
  assert data(resumed) == data(reference)
  last = data(reference)[-1]
  assert last["step"] == 12 and last["data/skipped"] == last["data/skipped/labels"] == 16
  assert last["data/skipped/captions"] == 0
  assert last["data/read/labels"] == 96 + 16 and last["data/read/captions"] == 96


def test_a_source_past_max_skip_fraction_stops_with_one_line(tmp_path, data_dir):
  """1 in 6 draws of the label source is bad; against a 5% limit the evidence is in after
  about 54 draws (7 steps of 8): the run stops naming the source, its counts and the key."""
  folder_dir = str(tmp_path / "datasets")
  helpers.write_bad_folder("pets", folder_dir)
  proc = run("mmjax.train", str(tmp_path / "run"), data_dir, "--config.total_steps=40",
             "--config.eval_every_steps=0", "--config.data.sources.labels.name=pets",
             f"--config.data.sources.labels.data_dir={folder_dir}",
             "--config.data.max_skip_fraction=0.05", expect=1)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith("mmjax.train: error: source 'labels' (pets): ")
  assert "examples drew an undecodable image" in lines[0]
  assert "above config data.max_skip_fraction=0.05 with 99.99% confidence" in lines[0]
  assert "step 40/40" not in proc.stdout


@pytest.mark.slow
def test_evaluate_cli_on_a_flava_checkpoint(tmp_path, data_dir):
  """Train 2 steps (checkpoint + in-loop evaluation), then `python -m mmjax.evaluate` on the
  checkpoint: zero-shot, retrieval and linear probe run and give the trainer's numbers."""
  workdir = str(tmp_path / "flava")
  small = ["--config.total_steps=2", "--config.batch_size=8", "--config.log_every_steps=1",
           "--config.checkpoint_every_steps=2", "--config.eval_every_steps=2",
           "--config.loss.unimodal_steps=1", "--config.eval_batch_size=32",
           "--config.evals.zeroshot.num_examples=32", "--config.evals.retrieval.num_examples=32",
           "--config.evals.seen_classes.num_examples=32",
           "--config.evals.linear_probe.num_train=128",
           "--config.evals.linear_probe.num_examples=32"]
  run("mmjax.train", workdir, data_dir, *small, config=FLAVA_TINY)
  trained = [m for m in metrics(workdir) if "linear_probe/shapes_labels/top1" in m][-1]
  out = run("mmjax.evaluate", workdir, data_dir, *small, config=FLAVA_TINY).stdout
  with open(os.path.join(workdir, "eval", "step_2.json")) as f:
    evaluated = json.load(f)
  for key in ("zeroshot/shapes_labels_unseen/top1", "seen_classes/shapes_labels_seen/top1",
              "retrieval/shapes_captions/i2t_r10",
              "linear_probe/shapes_labels/top1"):
    assert key in evaluated and key in out, key
  for key, value in evaluated.items():
    if key != "step":
      assert value == pytest.approx(trained[key], abs=1e-6), key


def test_profile_window_writes_a_trace_of_those_steps(tmp_path, data_dir):
  """--config.profile.* writes a jax.profiler trace (the files TensorBoard's profile plugin
  reads) whose step markers are exactly the requested steps."""
  from jax.profiler import ProfileData
  workdir = str(tmp_path / "run")
  run("mmjax.train", workdir, data_dir, "--config.total_steps=5", "--config.eval_every_steps=0",
      "--config.profile.start_step=2", "--config.profile.num_steps=2")
  runs = os.listdir(os.path.join(workdir, "profile", "plugins", "profile"))
  assert len(runs) == 1
  files = os.listdir(os.path.join(workdir, "profile", "plugins", "profile", runs[0]))
  xplanes = [f for f in files if f.endswith(".xplane.pb")]
  assert len(xplanes) == 1 and any(f.endswith(".trace.json.gz") for f in files), files
  trace = ProfileData.from_file(
      os.path.join(workdir, "profile", "plugins", "profile", runs[0], xplanes[0]))
  steps = sorted(dict(event.stats)["step_num"] for plane in trace.planes
                 for line in plane.lines for event in line.events if event.name == "train")
  assert steps == [2, 3]


def test_each_evaluator_runs_on_its_own_schedule():
  """evals.<key>.every_steps: 0 follows eval_every_steps, -1 only the last step, N every N;
  every evaluator runs at the last step."""
  config = helpers.tiny_config(**{"eval_every_steps": 4, "total_steps": 10,
                                  "evals.captioning.every_steps": 3,
                                  "evals.retrieval.every_steps": 0})
  assert config.evals.linear_probe.every_steps == -1  # the shapes configs' probe: final only
  steps = {key: [s for s in range(1, 11)
                 if train.is_due(s, train.evaluation_interval(config.evals[key], config), 10)]
           for key in ("retrieval", "captioning", "linear_probe")}
  assert steps == {"retrieval": [4, 8, 10], "captioning": [3, 6, 9, 10], "linear_probe": [10]}


@pytest.mark.parametrize("preset", ["coca", "flava"])
def test_poisoned_batch_makes_the_step_nonfinite(preset):
  """MMJAX_DEBUG_NAN_AT_STEP's fault (`train.poison_batches`; uint8 pixels hold no NaN):
  only the batch of that update changes, in its first text column, and under either
  objective its loss is non-finite and the real train step's guard skips it."""
  if preset == "flava":
    config = helpers.flava_config(batch_size=8, **{"mesh.shape": (1, 1, 1)})
    batch = helpers.flava_batch(config)
  else:
    config = helpers.tiny_config(**{"mesh.shape": (1, 1, 1)})
    batch = helpers.synthetic_batch(config)
  out = list(train.poison_batches(iter([batch, batch, batch]), start_step=4, nan_at_step=6))
  assert out[0] is batch and out[2] is batch
  poisoned = out[1]
  assert (poisoned["text"][:, 0] == train.POISON_TOKEN_ID).all()
  np.testing.assert_array_equal(poisoned["text"][:, 1:], batch["text"][:, 1:])
  assert all(poisoned[k] is batch[k] for k in batch if k != "text")
  rt, state = helpers.step_setup(config, 1)
  with rt.activate():
    _, metrics = rt.jit_train_step()(state, rt.global_batch(poisoned))
  assert not np.isfinite(float(metrics["loss"])) and not bool(metrics["finite"])
  assert int(metrics["nonfinite_steps"]) == 1


def test_evaluating_with_another_architecture_is_one_line(data_dir, tiny_workdir):
  proc = run("mmjax.evaluate", tiny_workdir, data_dir, "--config.model.text.width=48",
             expect=2)
  line = helpers.usage_error(proc, "mmjax.evaluate")
  assert "does not match the config at params/" in line and "pass the --config" in line
