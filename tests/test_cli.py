"""Config validation: every mistake fails before any device memory is allocated or anything
is compiled, with a message naming the config key."""
import subprocess
import time

import pytest

import helpers
from mmjax import cli
from test_train import REPO, command, environment


def fails_via_cli(*overrides, devices=1):
  start = time.time()
  proc = subprocess.run(command("mmjax.train", "/nonexistent/workdir", "/nonexistent/data",
                                *overrides), cwd=REPO, env=environment(devices),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0, proc.stdout[-2000:]
  return proc.stderr, time.time() - start


def test_unknown_key_suggests_the_right_one():
  err, _ = fails_via_cli("--config.batch_sise=8")
  assert "batch_sise" in err and "Did you mean" in err and "batch_size" in err, err[-2000:]


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
    ({"loss.nonfinite_policy": "ignore"}, 1, r"loss.nonfinite_policy='ignore'"),
    ({"checkpoint.max_to_keep": 0}, 1, r"checkpoint.max_to_keep=0"),
    ({"total_steps": 0}, 1, r"total_steps=0"),
    ({"model.remat_policy": "dots_saveable"}, 1,
     r"^config model.remat_policy='dots_saveable': choose one of none, full, .*"
     r"save_attention_recompute_mlp"),
    ({"loss.caption_chunk_size": -1}, 1, r"loss.caption_chunk_size=-1"),
    ({"profile.num_steps": -2}, 1, r"profile.num_steps=-2"),
])
def test_validate_names_the_key(overrides, devices, message):
  with pytest.raises(cli.ConfigError, match=message):
    cli.validate(helpers.tiny_config(**overrides), num_devices=devices)


def test_valid_configs_pass():
  cli.validate(helpers.tiny_config(), num_devices=1)
  cli.validate(helpers.tiny_config(**{"mesh.shape": (2, 4, 1)}), num_devices=8)
