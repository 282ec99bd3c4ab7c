"""Config validation: every mistake fails before any device memory is allocated or anything
is compiled, with a message naming the config key."""
import os
import sys
import time

import pytest

import helpers
from configs import pretrained
from conftest import CACHE_DIR, REPO
from helpers import run_cli, usage_error
from mmjax import cli
from mmjax.data import sources


def fails_via_cli(*overrides, devices=1):
  start = time.time()
  proc = helpers.call(helpers.command("mmjax.train", "/nonexistent/workdir",
                                      "/nonexistent/data", *overrides),
                      devices=devices, timeout=300)
  assert proc.returncode != 0, proc.stdout[-2000:]
  return proc.stderr, time.time() - start


def test_wrong_type_names_the_key():
  err, _ = fails_via_cli("--config.total_steps=ten")
  assert "total_steps" in err and "ten" in err, err[-2000:]


def test_batch_not_divisible_fails_before_compiling():
  err, seconds = fails_via_cli("--config.batch_size=12", devices=8)
  assert ("mmjax.train: error: config batch_size=12 is not divisible by the data-parallel "
          "size 8") in err, err[-2000:]
  assert "Traceback" not in err
  assert seconds < 120  # no dataset, tokenizer or compile work happened (workdir is bogus)


@pytest.mark.parametrize("overrides, devices, message", [
    ({"mesh.shape": (2, 2, 1)}, 8, r"mesh.shape=\(2, 2, 1\) has 4 devices but 8 are available"),
    ({"mesh.shape": (-1, 3, 1)}, 8, r"mesh.shape=\(-1, 3, 1\): 8 devices are not divisible by 3"),
    ({"batch_size": 12, "mesh.shape": (1, 8, 1)}, 8,
     r"batch_size=12 is not divisible by the data-parallel size 8"),
    ({"grad_accum_steps": 3}, 1, r"grad_accum_steps=3: batch_size=16"),
    ({"data.sources.labels.weight": 0.0, "data.sources.captions.weight": 0.0}, 1,
     r"data.sources.\*.weight=.*sum to a positive number"),
    ({"data.sources.labels.weight": -1.0}, 1, r"data.sources.\*.weight="),
    ({"model.remat_policy": "sometimes"}, 1, r"model.remat_policy='sometimes': choose one of"),
    ({"optimizer.name": "sgd"}, 1, r"optimizer.name='sgd'"),
    ({"model.pooler": "mean"}, 1, r"model.pooler='mean'"),
    ({"loss.name": "siglip2"}, 1, r"loss.name='siglip2': choose one of"),
    ({"loss.name": "siglip"}, 1,
     r"^config model.logit_bias=False: loss.name='siglip' needs .* set model.logit_bias=True$"),
    ({"evals.zeroshot.type": "zero_shot"}, 1, r"evals.zeroshot.type='zero_shot'"),
    ({"evals.zeroshot.prefix": "title"}, 1, r"evals.zeroshot.prefix='title'"),
    ({"evals.captioning.strategy": "nucleus"}, 1, r"evals.captioning.strategy='nucleus'"),
    ({"data.sources.captions.modality": "text"}, 1,
     r"data.sources.captions.modality='text': unimodal views need .*loss.name='flava'"),
    ({"data.tokenizer.kind": "bpe"}, 1, r"data.tokenizer.kind='bpe'"),
    ({"nonfinite_policy": "ignore"}, 1, r"nonfinite_policy='ignore'"),
    ({"checkpoint.max_to_keep": 0}, 1, r"checkpoint.max_to_keep=0"),
    ({"total_steps": 0}, 1, r"total_steps=0"),
    ({"model.remat_policy": "dots_saveable"}, 1,
     r"^config model.remat_policy='dots_saveable': choose one of \['none', 'full', .*"
     r"'save_attention_recompute_mlp'"),
    ({"loss.caption_chunk_size": -1}, 1, r"loss.caption_chunk_size=-1"),
    ({"profile.num_steps": -2}, 1, r"profile.num_steps=-2"),
    ({"model.attention_impl": "flash"}, 1,
     r"^config model.attention_impl='flash': choose one of \['xla', 'cudnn'\]$"),
    ({"model.attention_impl": "cudnn"}, 1,
     r"^config model.attention_impl='cudnn' needs model.dtype='bfloat16'"),
])
def test_validate_names_the_key(overrides, devices, message):
  with pytest.raises(cli.ConfigError, match=message):
    cli.validate(helpers.tiny_config(**overrides), num_devices=devices)


def test_captions_are_refused_for_a_model_without_a_caption_decoder():
  config = helpers.override(pretrained.get_config("openai_tiny"), **{"loss.caption_weight": 2.0})
  with pytest.raises(cli.ConfigError, match=r"^config loss.caption_weight=2.0: "
                     r"model.name='two_tower' has no captioning decoder; set "
                     r"--config.loss.caption_weight=0"):
    cli.validate(config, num_devices=1)
  assert cli.problems(helpers.override(config, **{"loss.caption_weight": 0.0}),
                      num_devices=1) == []


def test_every_problem_is_reported_one_line_each():
  config = helpers.tiny_config(**{"total_steps": 0, "model.remat_policy": "x",
                                  "evals.linear_probe.classifier": "svm"})
  with pytest.raises(cli.ConfigError) as e:
    cli.validate(config, num_devices=1)
  lines = str(e.value).splitlines()
  assert len(lines) == 3 and all(line.startswith("config ") for line in lines), lines


def test_a_source_with_weight_zero_is_off():
  config = helpers.tiny_config(**{"data.sources.labels.weight": 0.0})
  assert cli.problems(config, num_devices=1) == []
  assert sources.active_source_keys(config) == ["captions"]


def test_evaluator_schedule_below_minus_one_is_refused():
  with pytest.raises(cli.ConfigError, match=r"evals.retrieval.every_steps=-2 must be -1"):
    cli.validate(helpers.tiny_config(**{"evals.retrieval.every_steps": -2}), num_devices=1)


def test_valid_configs_have_no_problems_and_the_same_on_fewer_devices_has():
  """Each valid config yields no problem; the same config on 4 devices yields exactly the
  mesh's (so the empty list is a verdict on these configs, not a check that ran nothing)."""
  for preset, mesh in (("coca_unicl_prefix", (-1, 1, 1)), ("coca_unicl_prefix", (2, 4, 1)),
                       ("siglip", (2, 2, 2))):
    config = helpers.tiny_config(preset, **{"mesh.shape": mesh})
    assert cli.problems(config, num_devices=8) == []
  assert cli.problems(config, num_devices=4) == [
      "config mesh.shape=(2, 2, 2) has 8 devices but 4 are available"]


# --- One line, exit status 2, for every user mistake (the CLI as a user runs it) ---------
def test_unknown_config_key_is_one_line():
  line = usage_error(run_cli("mmjax.train", "--workdir=/nonexistent/w", "--config.bogus=1"))
  assert "unknown config key 'bogus' (--config.bogus=1)" in line


def test_misspelled_config_key_is_one_line_with_the_suggestion():
  line = usage_error(run_cli("mmjax.train", "--workdir=/nonexistent/w", "--config.batch_sise=8"))
  assert line == ("mmjax.train: error: unknown config key 'batch_sise' "
                  '(--config.batch_sise=8): did you mean "batch_size"?')
  line = usage_error(run_cli("mmjax.train", "--workdir=/nonexistent/w",
                         "--config.model.vison.width=8"))
  assert '(--config.model.vison.width=8): did you mean "vision"?' in line


def test_missing_config_file_is_one_line():
  line = usage_error(run_cli("mmjax.train", "--workdir=/nonexistent/w", config="configs/nope.py"))
  assert "configs/nope.py" in line and "No such file" in line


def test_data_dir_without_the_datasets_is_one_line(tmp_path):
  empty = tmp_path / "datasets"
  empty.mkdir()
  line = usage_error(run_cli("mmjax.train", f"--workdir={tmp_path / 'w'}",
                         f"--config.data_dir={empty}", config=f"{REPO}/configs/coca.py:tiny"))
  assert "tensorflow" not in line.lower()
  assert (f"dataset 'coco_captions' (config data.sources.captions.name) is not in {empty} "
          "(config data_dir; it holds no datasets)") in line
  assert "tfds build coco_captions" in line


def test_own_dataset_missing_from_data_dir_names_the_key(data_dir, tmp_path):
  line = usage_error(run_cli("mmjax.train", f"--workdir={tmp_path / 'w'}",
                         f"--config.data_dir={data_dir}",
                         "--config.data.sources.labels.name=my_pets"))
  assert "dataset 'my_pets' (config data.sources.labels.name)" in line
  assert "it holds shapes" in line and "python -m mmjax.data.build" in line


def test_evaluate_on_a_mistyped_workdir_creates_nothing(tmp_path, data_dir):
  workdir = tmp_path / "typo"
  line = usage_error(run_cli("mmjax.evaluate", f"--workdir={workdir}",
                         f"--config.data_dir={data_dir}"), "mmjax.evaluate")
  assert f"no checkpoint in {workdir}/checkpoints" in line
  assert not workdir.exists()


def test_evaluate_a_step_that_does_not_exist_lists_the_steps(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  trained = run_cli("mmjax.train", f"--workdir={workdir}", f"--config.data_dir={data_dir}",
                f"--config.compilation_cache_dir={CACHE_DIR}", "--config.total_steps=2",
                "--config.checkpoint_every_steps=1", "--config.eval_every_steps=0")
  assert trained.returncode == 0, trained.stderr[-2000:]
  line = usage_error(run_cli("mmjax.evaluate", f"--workdir={workdir}", "--step=7",
                         f"--config.data_dir={data_dir}"), "mmjax.evaluate")
  assert line.endswith(f"--step 7: no such checkpoint in {workdir}/checkpoints; it has "
                       "steps 1, 2")


def test_captions_with_more_characters_than_the_vocabulary(tmp_path, data_dir):
  import io
  import numpy as np
  import tensorflow_datasets as tfds
  from PIL import Image
  from mmjax.ingest import files as build
  alphabet = "абвгдежзийклмнопрстуфхцчшщъыьэюяαβγδεζηθικλμνξοπρστυφχψω"
  examples = []
  for i in range(8):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(buf, format="PNG")
    examples.append({"image": buf.getvalue(), "captions": [alphabet[i::2] + " " + alphabet]})
  build.write_dataset("wide_alphabet", str(tmp_path), {
      "image": tfds.features.Image(shape=(None, None, 3)),
      "captions": tfds.features.Sequence(tfds.features.Text())}, {"train": examples})
  line = usage_error(run_cli("mmjax.train", f"--workdir={tmp_path / 'w'}",
                         f"--config.data_dir={data_dir}",
                         "--config.data.sources.captions.name=wide_alphabet",
                         f"--config.data.sources.captions.data_dir={tmp_path}"))
  assert "data.tokenizer.vocab_size=64: raise data.tokenizer.vocab_size" in line
  assert "data.tokenizer.path" in line


def test_read_only_data_dir_suggests_a_tokenizer_path(tmp_path, data_dir):
  """The datasets are there but the data_dir cannot be written, so the tokenizer cannot be
  cached. Root ignores file modes: as root the data_dir is made a read-only mount (as a
  shared read-only disk would be) in a private mount namespace."""
  import shutil
  read_only = str(tmp_path / "datasets")
  shutil.copytree(os.path.join(data_dir, "shapes"), os.path.join(read_only, "shapes"))
  train = [sys.executable, "-m", "mmjax.train", f"--config={helpers.SHAPES_TINY}",
           f"--workdir={tmp_path / 'w'}", f"--config.data_dir={read_only}"]
  if os.geteuid() == 0:
    if shutil.which("unshare") is None:
      pytest.skip("running as root without unshare: no way to make a read-only data_dir")
    mount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    train = ["unshare", "--mount", "sh", "-c", mount, read_only, *train]
  else:
    for path, _, _ in os.walk(read_only):
      os.chmod(path, 0o555)
  try:
    proc = helpers.call(train)
  finally:
    for path, _, _ in os.walk(read_only):
      os.chmod(path, 0o755)
  line = usage_error(proc)
  assert f"cannot cache the trained tokenizer in {read_only}/tokenizers" in line
  assert "set data.tokenizer.path" in line
